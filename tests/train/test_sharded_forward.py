"""Training's log-prob passes and D²O's anchor sampling on a model whose weights are sharded.

Under FSDP and ZeRO-3 a process holds only a shard of each weight; the engine gathers the whole
weights inside the model's forward pass. Calling the inner decoder alone or reading the LM head's
weight (the fast path on one process) would skip that, so on a sharded model the log-probs must go
through the model's own forward, and sampling must see gathered weights. accelerate refuses FSDP
on a machine without a GPU, but torch's own FSDP runs on CPU over gloo, FSDP2 (``fully_shard``)
and FSDP1 (``FullyShardedDataParallel``, each decoder layer a unit as accelerate's
TRANSFORMER_BASED_WRAP makes them): these tests shard a tiny model with each across two processes
(``torchrun``) and compare with one process.
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
# and anchors sampled from the policy, from a model sharded over the processes (2: fully_shard,
# FSDP1 or ZeRO-3, as argv[3] says) or whole (1). With argv[4] == "lora" the model is a LoRA policy
# (adapters made non-zero) and the `disable-adapters` reference scores it too, through the engine.
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
from prefalign.train.sequences import collate, distributed_wrapper, sequence_logps, supports_packing

model_dir, out, engine, lora = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "lora"
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model, tok = load_model(model_dir), load_tokenizer(model_dir)
if lora:
    from prefalign.models.lora import LoraSettings, apply_lora
    model = apply_lora(model, LoraSettings(r=4))
    with torch.no_grad():  # trained adapters: switched off, they must make a difference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
policy = model
whole = sum(p.numel() for p in model.parameters())
if accelerator.num_processes > 1 and engine == "fully_shard":
    from torch.distributed.fsdp import fully_shard
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    assert any(p.to_local().numel() < p.numel() for p in model.parameters()), "nothing sharded"
elif accelerator.num_processes > 1 and engine == "fsdp1":
    import functools
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    layer = type(model.get_decoder().layers[0])
    model = FullyShardedDataParallel(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer}),
                                     device_id=torch.device("cpu"), use_orig_params=True)
    assert sum(p.numel() for p in model.parameters()) < whole, "nothing sharded"
elif accelerator.num_processes > 1 and engine == "zero3":
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}}
    model, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    assert sum(p.ds_tensor.numel() for p in model.module.parameters()) < whole, "nothing sharded"
records = [
    PreferenceRecord(prompt="Hi", chosen="Hello there, friend.", rejected="Go away", anchors=["a", "b c d"]),
    PreferenceRecord(prompt="A longer prompt with several more words in it", chosen="Ok", rejected="A long rejected answer", anchors=["x y", "z"]),
    PreferenceRecord(prompt="Yo", chosen="k", rejected="no", anchors=["m", "n"]),
]
groups = ("chosen", "rejected", "anchors")
examples = [tokenize_record(r, i, tok, groups, TokenizeSettings()) for i, r in enumerate(records)]
# The trainer packs only where the decoder may be called alone (not on a sharded model).
report = {"wrapper": distributed_wrapper(model), "packing": supports_packing(model), "logps": {}}
# The accelerator as the engine's run would describe it (accelerate itself shards on a GPU only), for
# the divergence check's norm of the whole weights on every process, taken between steps where every
# weight is a shard (FSDP2 keeps the root's gathered after a forward), and for sampling.
state = {"fully_shard": {"fsdp_plugin": types.SimpleNamespace(reshard_after_forward=True)},
         "fsdp1": {"fsdp_plugin": types.SimpleNamespace(reshard_after_forward=True)},
         "zero3": {"deepspeed_plugin": types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})}}[engine]
described = types.SimpleNamespace(
    distributed_type=DistributedType.DEEPSPEED if engine == "zero3" else DistributedType.FSDP,
    num_processes=accelerator.num_processes, device=accelerator.device, reduce=accelerator.reduce,
    unwrap_model=accelerator.unwrap_model, state=types.SimpleNamespace(**state))
if accelerator.num_processes == 1:
    described = accelerator
norm = weight_norm(list(model.parameters()), described)
report["weight_norms"] = [None] * accelerator.num_processes
dist.all_gather_object(report["weight_norms"], norm) if dist.is_initialized() else report.update(weight_norms=[norm])
model.eval()
layouts = {"pairs": {}, "shared": {"share_prompt": True}, "packed": {"pack": True}}
for layout, options in list(layouts.items())[: 3 if report["packing"] else 2]:
    batch = collate(examples, groups, tok.pad_token_id, **options)
    with torch.no_grad():
        report["logps"][layout] = sequence_logps(model, batch).tolist()
if lora:
    from prefalign.train.reference import ModelScorer, ScoredReference, score_through_engine
    reference = ScoredReference(ModelScorer(policy, tok.pad_token_id, policy.disable_adapter), ("chosen", "rejected"))
    reference = score_through_engine(reference, policy, model)
    report["adapters_off"] = {k: v.tolist() for k, v in reference.logps(examples).items()}
with weights_for_generation(described, model) as sampler:
    report["anchors"] = sample_anchor_ids(sampler, [ex.prompt_ids for ex in examples], 2, pad_id=tok.pad_token_id,
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


def run(processes: int, tiny_model: str, tmp: Path, engine: str = "fully_shard", model: str = "plain") -> dict:
    script, out = tmp / "sharded.py", tmp / f"report-{processes}-{engine}-{model}.json"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(free_port()), str(script), tiny_model, str(out), engine, model]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def deepspeed_runs() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def fully_shard_runs() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


# DeepSpeed runs ZeRO-3 on CPU over gloo by itself (accelerate will not): where it is installed.
ENGINES = ["fully_shard", "fsdp1",
           pytest.param("zero3", marks=pytest.mark.skipif(not deepspeed_runs(), reason="deepspeed is not installed"))]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not fully_shard_runs(), reason="this torch has no gloo backend or no fully_shard")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_sharded_model_gives_one_process_logps_and_anchors(tmp_path, tiny_model, engine):
    wrapper = {"fully_shard": "FSDP (fully_shard)", "fsdp1": "FullyShardedDataParallel", "zero3": "DeepSpeed"}[engine]
    one, two = run(1, tiny_model, tmp_path), run(2, tiny_model, tmp_path, engine)
    assert one["wrapper"] is None and two["wrapper"] == wrapper
    assert one["packing"] and not two["packing"]  # packing would call the decoder outside the engine
    assert set(one["logps"]) == {"pairs", "shared", "packed"} and set(two["logps"]) == {"pairs", "shared"}
    for layout, logps in two["logps"].items():
        logps_one = one["logps"][layout]
        assert len(logps) == len(logps_one)
        assert max(abs(a - b) for a, b in zip(logps_one, logps)) < 1e-4, layout
    assert two["anchors"] == one["anchors"]  # the same tokens: the sampling saw the whole weights
    # Each process's norm is the whole model's, so their divergence checks decide alike.
    (whole,) = one["weight_norms"]
    assert len(two["weight_norms"]) == 2 and all(abs(n - whole) < 1e-4 * whole for n in two["weight_norms"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not fully_shard_runs(), reason="this torch has no gloo backend or no fully_shard")
@pytest.mark.parametrize("engine", ENGINES)
def test_the_adapters_off_reference_scores_a_sharded_lora_policy_as_one_process(tmp_path, tiny_model, engine):
    """`--reference disable-adapters` on a sharded engine: the LoRA policy's own weights with the
    adapters off, scored through the engine's forward (``score_through_engine``)."""
    one, two = run(1, tiny_model, tmp_path, model="lora"), run(2, tiny_model, tmp_path, engine, model="lora")
    for group, logps in one["adapters_off"].items():
        assert max(abs(a - b) for a, b in zip(logps, two["adapters_off"][group])) < 1e-4, group
    # The adapters were off: the reference differs from the policy, which has them on.
    on = one["logps"]["pairs"]
    off = [x for pair in zip(one["adapters_off"]["chosen"], one["adapters_off"]["rejected"]) for x in pair]
    assert len(on) >= len(off) and max(abs(a - b) for a, b in zip(on, off)) > 1e-2
    assert max(abs(a - b) for a, b in zip(on, two["logps"]["pairs"])) < 1e-4


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
