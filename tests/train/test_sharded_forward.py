"""Training's log-prob passes and D²O's anchor sampling on a model whose weights are sharded.

Under FSDP and ZeRO-3 a process holds only a shard of each weight; the engine gathers the whole
weights inside the model's forward pass. Calling the inner decoder alone or reading the LM head's
weight (the fast path on one process) would skip that, so on a sharded model the log-probs must go
through the model's own forward, and sampling must see gathered weights. accelerate refuses FSDP
on a machine without a GPU, but torch's own FSDP (``fully_shard``) runs on CPU over gloo: these
tests shard a tiny model with it across two processes (``torchrun``) and compare with one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from prefalign.train.distributed import fill_deepspeed_micro_batch, weight_norm, weights_for_generation
from prefalign.train.sequences import distributed_wrapper

TIMEOUT = 600

# Run under torchrun with 1 or 2 processes: log-probs of three records in the three batch layouts,
# and anchors sampled from the policy, from a model fully_shard-ed over the processes (2) or whole (1).
SCRIPT = r"""
import gc, json, sys, types, torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings, tokenize_record
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.train.distributed import weight_norm, weights_for_generation
from prefalign.train.online_anchors import sample_anchor_ids
from prefalign.train.sequences import collate, distributed_wrapper, sequence_logps

model_dir, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model, tok = load_model(model_dir), load_tokenizer(model_dir)
if accelerator.num_processes > 1:
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert any(p.to_local().numel() < p.numel() for p in model.parameters()), "nothing sharded"
records = [
    PreferenceRecord(prompt="Hi", chosen="Hello there, friend.", rejected="Go away", anchors=["a", "b c d"]),
    PreferenceRecord(prompt="A longer prompt with several more words in it", chosen="Ok", rejected="A long rejected answer", anchors=["x y", "z"]),
    PreferenceRecord(prompt="Yo", chosen="k", rejected="no", anchors=["m", "n"]),
]
groups = ("chosen", "rejected", "anchors")
examples = [tokenize_record(r, i, tok, groups, TokenizeSettings()) for i, r in enumerate(records)]
report = {"wrapper": distributed_wrapper(model), "logps": {}}
# The trainer's divergence check, as FSDP would run it: the norm of the whole weights on every process,
# taken between steps, where every weight is a shard (FSDP2 keeps the root's gathered after a forward).
fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=accelerator.num_processes,
                             device=accelerator.device, reduce=accelerator.reduce,
                             state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(reshard_after_forward=True)))
norm = weight_norm(list(model.parameters()), fsdp if accelerator.num_processes > 1 else accelerator)
report["weight_norms"] = [None] * accelerator.num_processes
dist.all_gather_object(report["weight_norms"], norm) if dist.is_initialized() else report.update(weight_norms=[norm])
model.eval()
for layout, options in {"pairs": {}, "shared": {"share_prompt": True}, "packed": {"pack": True}}.items():
    batch = collate(examples, groups, tok.pad_token_id, **options)
    with torch.no_grad():
        report["logps"][layout] = sequence_logps(model, batch).tolist()
with weights_for_generation(accelerator, model) as policy:
    report["anchors"] = sample_anchor_ids(policy, [ex.prompt_ids for ex in examples], 2, pad_id=tok.pad_token_id,
                                          eos_id=tok.eos_token_id, max_new_tokens=6, temperature=1.0, seed=5,
                                          max_response_tokens=6)
if accelerator.is_main_process:
    with open(out, "w") as f:
        json.dump(report, f)
del model
gc.collect()
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, tiny_model: str, tmp: Path) -> dict:
    script, out = tmp / "sharded.py", tmp / f"report-{processes}.json"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(free_port()), str(script), tiny_model, str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def fully_shard_runs() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not fully_shard_runs(), reason="this torch has no gloo backend or no fully_shard")
def test_a_sharded_model_gives_one_process_logps_and_anchors(tmp_path, tiny_model):
    one, two = run(1, tiny_model, tmp_path), run(2, tiny_model, tmp_path)
    assert one["wrapper"] is None and two["wrapper"] == "FSDP (fully_shard)"
    for layout, logps in one["logps"].items():
        assert len(two["logps"][layout]) == len(logps)
        assert max(abs(a - b) for a, b in zip(logps, two["logps"][layout])) < 1e-4, layout
    assert two["anchors"] == one["anchors"]  # the same tokens: the sampling saw the whole weights
    # Each process's norm is the whole model's, so their divergence checks decide alike.
    (whole,) = one["weight_norms"]
    assert len(two["weight_norms"]) == 2 and all(abs(n - whole) < 1e-4 * whole for n in two["weight_norms"])


def test_every_engine_that_shards_or_wraps_the_model_is_recognised():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert distributed_wrapper(model) is None
    DeepSpeedEngine = type("DeepSpeedEngine", (torch.nn.Module,), {})  # deepspeed is not a dependency
    PipelineEngine = type("PipelineEngine", (DeepSpeedEngine,), {})  # its subclasses too
    assert distributed_wrapper(DeepSpeedEngine()) == distributed_wrapper(PipelineEngine()) == "DeepSpeed"


def test_a_deepspeed_config_gets_the_per_process_batch_only_where_accelerate_left_it_to_fill():
    auto = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}
    fill_deepspeed_micro_batch(auto, 4)
    assert auto["train_micro_batch_size_per_gpu"] == 4
    missing: dict = {}
    fill_deepspeed_micro_batch(missing, 2)
    assert missing == {"train_micro_batch_size_per_gpu": 2}
    chosen = {"train_micro_batch_size_per_gpu": 8}
    fill_deepspeed_micro_batch(chosen, 2)
    assert chosen["train_micro_batch_size_per_gpu"] == 8  # the user's number stays


def test_one_process_generates_from_the_model_as_it_is():
    from accelerate.utils import DistributedType

    model = torch.nn.Linear(2, 2)
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.NO, unwrap_model=lambda m: m,
                                        state=types.SimpleNamespace())
    with weights_for_generation(accelerator, model) as policy:
        assert policy is model


def test_the_weight_norm_is_the_whole_weights_norm_where_nothing_is_sharded():
    from accelerate.utils import DistributedType

    params = [torch.randn(3, 4), torch.randn(5)]
    ddp = types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2, state=types.SimpleNamespace())
    expected = torch.cat([p.flatten() for p in params]).norm().item()
    assert abs(weight_norm(params, ddp) - expected) < 1e-5  # whole copies: not summed over processes
