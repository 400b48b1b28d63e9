"""Where one prefalign DPO training step spends its time: a torch.profiler operator table.

The same model and pairs as ``train_vs_trl.py`` (prompts ~200 tokens, responses 64, batch 4). One
warm-up step, then one profiled step; prints the operators by self CPU time, the matmuls' share of
the step and their FLOP rate against a matmul peak measured in the same run.

    python benchmarks/profile_step.py
    python benchmarks/profile_step.py --compile-layer   # also: one decoder layer eager vs torch.compile
    python benchmarks/profile_step.py --dtype bfloat16  # the step under bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, matmul_peak_flops, synthetic_pairs  # noqa: E402


def make_trainer(args, workdir: Path):
    from prefalign.models.loading import load_tokenizer
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import Trainer

    pairs = synthetic_pairs(load_tokenizer(args.model), args.batch_size * 2, args.prompt_tokens, args.response_tokens, 0)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = TrainConfig(
        model=args.model, data=data, output_dir=workdir / "out", loss="dpo", lr=1e-5, schedule="constant",
        warmup_steps=0, batch_size=args.batch_size, max_steps=2, max_length=1024, max_prompt_length=768,
        chat_template="never", shuffle=False, group_by_length=False, seed=0, save_every=10_000,
        ref_cache_dir=workdir / "refcache", max_grad_norm=1.0, dtype=args.dtype,
    )
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    return trainer


def profile_step(trainer, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer.train_step()  # warm-up: optimizer state, allocator
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        started = time.perf_counter()
        trainer.train_step()
        seconds = time.perf_counter() - started
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55))
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
    mm_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    mm_flops = sum(e.flops for e in mm)
    attention_s = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    # the matmuls run in bf16 under autocast: their roofline is the bf16 peak
    bf16 = trainer.dtype == "bfloat16"
    peak = matmul_peak_flops(dtype=torch.bfloat16 if bf16 else torch.float32)
    print(f"step {seconds:.2f} s (profiled ops {total:.2f} s); matmuls {mm_s:.2f} s = {100 * mm_s / total:.0f}% "
          f"at {mm_flops / mm_s / 1e9:.1f} GFLOP/s ({100 * mm_flops / mm_s / peak:.0f}% of the {peak / 1e9:.1f} GFLOP/s "
          f"{'bf16' if bf16 else 'fp32'} matmul peak); attention {attention_s:.2f} s = {100 * attention_s / total:.0f}%; everything else "
          f"{total - mm_s - attention_s:.2f} s")


def compile_check(trainer, repeats: int = 10) -> None:
    """One decoder layer, forward + backward at the step's shapes: eager vs torch.compile."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    layer = model.get_decoder().layers[0]
    batch, width, hidden = trainer.config.batch_size, 331, model.config.hidden_size
    x = torch.randn(batch, width, hidden, requires_grad=True)
    positions = torch.arange(width).expand(batch, width)
    embeddings = model.get_decoder().rotary_emb(x, positions)
    mask = torch.zeros(batch, 1, width, width).masked_fill_(
        ~torch.ones(width, width, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)

    def run(module):
        out = module(x, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    for name, module in (("eager", layer), ("torch.compile", torch.compile(layer))):
        started = time.perf_counter()
        run(module)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(repeats):
            run(module)
        print(f"one decoder layer fwd+bwd, {name:<13}: first call {first:6.1f} s, then {(time.perf_counter() - started) / repeats * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--compile-layer", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="training precision (bfloat16: autocast, fp32 weights)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"model {args.model}; dtype {args.dtype}; batch {args.batch_size}; prompt ~{args.prompt_tokens} tokens, responses ~{args.response_tokens}\n")
    trainer = make_trainer(args, Path(tempfile.mkdtemp(prefix="bench-profile-")))
    profile_step(trainer, args.rows)
    if args.compile_layer:
        compile_check(trainer)


if __name__ == "__main__":
    main()
