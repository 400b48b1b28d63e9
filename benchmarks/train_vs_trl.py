"""prefalign train vs TRL's DPOTrainer on the same DPO work, in alternating A/B runs.

Same model (fp32), same synthetic pairs (fixed token lengths, fixed seed), same batch size, lr,
optimizer (AdamW), constant schedule, grad clipping, steps, data order (sequential). Each run is
its own process, so peak RSS is that run's alone. Prints samples/s, tokens/s, peak RSS, achieved
FLOP/s (each trainer's own matmul work over its time) as a share of an fp32 matmul peak measured in
the same run, and the per-step losses of
both: if they disagree by more than 1e-3 on the first steps the comparison is void.

    python benchmarks/train_vs_trl.py                       # SmolLM2-135M-Instruct, 8 steps
    python benchmarks/train_vs_trl.py --model tiny-random --steps 3 --pairs 12   # smoke run
    python benchmarks/train_vs_trl.py --dtype bfloat16      # bf16 autocast on both sides (fp32 weights)

On a CUDA machine both trainers run on the GPU (TRL as its Trainer places the model, prefalign
through accelerate), the peak is the GPU's matmul peak in the run's dtype, and the memory column
is the GPU's peak allocation. In bf16 both sides autocast (TRL's ``bf16=True``, prefalign's
``--dtype bfloat16``) over fp32 weights, so the losses agree to bf16's rounding, not to 1e-3.

Needs ``pip install trl`` (an optional benchmark dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_peak_flops, peak_rss_mib, synthetic_pairs, write_json  # noqa: E402

LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}
COMPARED_STEPS = 3


def matmul_flops_per_token(model) -> tuple[float, float]:
    """Forward matmul FLOPs of one token: (decoder body, LM head), 2 x their parameters."""
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 2.0 * body, 2.0 * head.numel()


def matmul_work(model, pairs_tokens: list[tuple[int, int, int]]) -> dict[str, float]:
    """Each trainer's matmul work on the pairs (attention scores left out): policy forward and
    backward (3 forwards) plus one reference forward. TRL runs prompt+chosen and prompt+rejected
    with the LM head at every position; prefalign runs the prompt once, the head on responses only."""
    body, head = matmul_flops_per_token(model)
    trl = sum(4 * (2 * p + c + r) * (body + head) for p, c, r in pairs_tokens)
    ours = sum(4 * ((p + c + r) * body + (c + r) * head) for p, c, r in pairs_tokens)
    return {"trl": trl, "prefalign": ours}


def run_prefalign(args, data: Path, workdir: Path) -> dict:
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import Trainer

    config = TrainConfig(
        model=args.model, data=data, output_dir=workdir / "out", loss="dpo", beta=args.beta, lr=args.lr,
        schedule="constant", warmup_steps=0, batch_size=args.batch_size, max_steps=args.steps, max_length=1024,
        max_prompt_length=768, chat_template="never", shuffle=False, group_by_length=False, seed=args.seed,
        save_every=10_000, ref_cache_dir=workdir / "refcache", max_grad_norm=1.0, dtype=args.dtype,
    )
    trainer = Trainer(config, show_progress=False)
    start = time.perf_counter()
    trainer.setup()  # loads model and data, then precomputes the reference log-probs (part of the work)
    setup_s = time.perf_counter() - start
    losses = []
    train_start = time.perf_counter()
    while trainer.step < trainer.total_steps:
        losses.append(trainer.train_step()["loss"])
    synchronize()
    train_s = time.perf_counter() - train_start
    return {"losses": losses, "load_s": setup_s - trainer.reference_seconds, "reference_s": trainer.reference_seconds,
            "train_s": train_s, "share_prompt": trainer.share_prompt}


def synchronize() -> None:
    """Wait for the GPU's queued kernels, so a clock read after a run counts them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trl(args, data: Path, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefalign.models.loading import load_model, load_tokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    start = time.perf_counter()
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    cfg = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, beta=args.beta, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed, train_sampling_strategy="sequential", save_strategy="no",
        max_length=1024, max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0, disable_dropout=True,
        optim="adamw_torch",
        # TRL's configs default to bf16 mixed precision (bf16=True unless fp16 is set), even on a CPU;
        # it follows --dtype explicitly, as prefalign does.
        bf16=args.dtype == "bfloat16", fp16=False,
        # TRL defaults to gradient checkpointing, which only costs time on CPU; off, as in prefalign.
        gradient_checkpointing=False,
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            synchronize()
            self.end = time.perf_counter()

    clock = Clock()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    load_s = time.perf_counter() - start  # model, tokenizer, dataset tokenization
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # TRL's reference forward runs inside its steps, so its reference time is part of train_s.
    return {"losses": losses, "load_s": load_s, "reference_s": 0.0, "train_s": clock.end - clock.start}


def worker(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{args.worker}-"))
    runner = {"prefalign": run_prefalign, "trl": run_trl}[args.worker]
    result = runner(args, Path(args.data), workdir)
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    write_json(Path(args.result), result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(LOSS_TOLERANCE), default="float32",
                        help="float32, or bfloat16 autocast on both sides (on a GPU, or a CPU with native bf16)")
    parser.add_argument("--repeats", type=int, default=1, help="A/B rounds (prefalign, trl, prefalign, trl, ...)")
    parser.add_argument("--worker", choices=["prefalign", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from prefalign.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    pairs = synthetic_pairs(tokenizer, args.pairs, args.prompt_tokens, args.response_tokens, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    used = pairs[: args.steps * args.batch_size]
    for p in used:  # TRL tokenizes prompt+completion together, prefalign each part alone: same ids
        for key in ("chosen", "rejected"):
            apart = tokenizer(p["prompt"])["input_ids"] + tokenizer(p[key], add_special_tokens=False)["input_ids"]
            if apart != tokenizer(p["prompt"] + p[key])["input_ids"]:
                sys.exit(f"pair {p['id']}: {key} tokenizes differently alone and after its prompt; the runs would differ")
    lengths = [
        (len(tokenizer(p["prompt"])["input_ids"]), len(tokenizer(p["chosen"], add_special_tokens=False)["input_ids"]) + 1,
         len(tokenizer(p["rejected"], add_special_tokens=False)["input_ids"]) + 1)
        for p in used
    ]
    work = matmul_work(load_model(args.model), lengths)
    tokens = sum(2 * p + c + r for p, c, r in lengths)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_flops(dtype=getattr(torch, args.dtype), device=device)
    memory = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    tolerance = LOSS_TOLERANCE[args.dtype]

    runs: dict[str, list[dict]] = {"prefalign": [], "trl": []}
    for round_ in range(args.repeats):
        for name in ("prefalign", "trl"):
            out = tmp / f"{name}-{round_}.json"
            cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--result", str(out),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in {"worker", "data", "result", "repeats"}]]
            subprocess.run(cmd, check=True)
            runs[name].append(json.loads(out.read_text()))
            print(f"round {round_ + 1}: {name} done", flush=True)

    samples = len(used)
    print(f"\nmachine: {machine()}; {args.dtype} matmul peak on {device} {peak / 1e9:.1f} GFLOP/s")
    print(f"model {args.model}; {samples} pairs ({args.steps} steps x batch {args.batch_size}); "
          f"prompt ~{args.prompt_tokens} tokens, responses ~{args.response_tokens}; {tokens} DPO tokens")
    print(f"matmul work (forward+backward+reference): TRL {work['trl'] / 1e12:.2f} TFLOP, prefalign "
          f"{work['prefalign'] / 1e12:.2f} TFLOP ({work['trl'] / work['prefalign']:.2f}x less)\n")
    header = f"{'trainer':<10} {'run':>3} {'load s':>7} {'ref s':>6} {'train s':>8} {'samples/s':>10} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7} {memory:>13}"
    print(header)
    print("-" * len(header))
    best = {}
    for name, results in runs.items():
        for i, r in enumerate(results):
            # Loading (model, tokenizer, tokenization) is not DPO work and is left out on both
            # sides; prefalign's reference precompute is, so it counts (TRL's is inside its steps).
            seconds = r["reference_s"] + r["train_s"]
            rate = samples / seconds
            best[name] = max(best.get(name, 0.0), rate)
            print(f"{name:<10} {i + 1:>3} {r['load_s']:>7.1f} {r['reference_s']:>6.1f} {r['train_s']:>8.1f} {rate:>10.3f} {tokens / seconds:>9.0f} "
                  f"{work[name] / seconds / 1e9:>8.1f} {100 * work[name] / seconds / peak:>6.1f}% {r['peak_gpu_mib' if device == 'cuda' else 'peak_rss_mib']:>13.0f}")
    print(f"\nspeed-up (best prefalign samples/s / best TRL samples/s): {best['prefalign'] / best['trl']:.2f}x")
    print("  (time = reference precompute + training steps; TRL computes its reference inside its steps;\n"
          "   loading the model and tokenizing the data are left out on both sides)")
    trl_seconds = samples / best["trl"]
    needed = 3 * work["prefalign"] / trl_seconds
    print(f"  3x TRL's best needs prefalign's matmul work done at {needed / 1e9:.1f} GFLOP/s, {100 * needed / peak:.0f}% of "
          "the matmul peak,\n  with attention, norms, activations and the optimizer on top")
    warm = max(samples / r["train_s"] for r in runs["prefalign"])
    print(f"with the reference log-probs already cached (a re-run or a beta/lr sweep on the same data): "
          f"{warm / best['trl']:.2f}x")
    print("\nper-step loss")
    a, b = runs["prefalign"][0]["losses"], runs["trl"][0]["losses"]
    worst = 0.0
    for step, (x, y) in enumerate(zip(a, b), start=1):
        print(f"  step {step:>2}: prefalign {x:.6f}  trl {y:.6f}  |diff| {abs(x - y):.2e}")
        if step <= COMPARED_STEPS:
            worst = max(worst, abs(x - y))
    verdict = "MATCH" if worst <= tolerance else "VOID (losses differ: the comparison does not hold)"
    print(f"losses over the first {COMPARED_STEPS} steps agree within {tolerance} ({args.dtype}): {verdict} (max |diff| {worst:.2e})")


if __name__ == "__main__":
    main()
