"""Cost of a D²O step with K anchors relative to a DPO step on the same prompts.

With prompt sharing the prompt is encoded once per example, not once per response, so D²O with
K=4 anchors (5 responses behind each prompt) should cost far less than 2.5 DPO steps. Prints the
median step time of each (after a warm-up step) and the ratio, with prompt sharing on and off.

    python benchmarks/d2o_vs_dpo.py                  # SmolLM2-135M-Instruct
    python benchmarks/d2o_vs_dpo.py --model tiny-random
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, synthetic_pairs  # noqa: E402


def step_times(model: str, data: Path, loss: str, share_prompt: bool, batch_size: int, steps: int) -> list[float]:
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import Trainer

    workdir = Path(tempfile.mkdtemp(prefix=f"d2o-{loss}-"))
    config = TrainConfig(
        model=model, data=data, output_dir=workdir / "out", loss=loss, lr=1e-6, batch_size=batch_size,
        max_steps=steps + 1, chat_template="never", max_length=1024, max_prompt_length=768, shuffle=False,
        group_by_length=False, share_prompt=share_prompt, ref_cache_dir=workdir / "ref", save_every=10_000,
    )
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    times = [trainer.train_step()["step_time_s"] for _ in range(steps + 1)]
    return times[1:]  # the first step pays one-off allocation costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--response-tokens", type=int, default=64)
    args = parser.parse_args()

    from prefalign.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    n = args.batch_size * (args.steps + 1)
    rows = synthetic_pairs(tokenizer, n * (args.k + 1), args.prompt_tokens, args.response_tokens, seed=0)
    data = Path(tempfile.mkdtemp(prefix="d2o-")) / "data.jsonl"
    with data.open("w") as f:
        for i in range(n):
            base = rows[i]
            anchors = [rows[n + i * args.k + j]["chosen"] for j in range(args.k)]
            f.write(json.dumps({"prompt": base["prompt"], "chosen": base["chosen"], "rejected": base["rejected"], "anchors": anchors}) + "\n")

    print(f"machine: {machine()}")
    print(f"model {args.model}; batch {args.batch_size}; prompt ~{args.prompt_tokens} tokens; responses ~{args.response_tokens}; K={args.k}\n")
    header = f"{'prompt sharing':<15} {'DPO step s':>11} {'D2O step s':>11} {'D2O / DPO':>10}"
    print(header)
    print("-" * len(header))
    for share in (True, False):
        dpo = statistics.median(step_times(args.model, data, "dpo", share, args.batch_size, args.steps))
        d2o = statistics.median(step_times(args.model, data, "d2o", share, args.batch_size, args.steps))
        print(f"{'on' if share else 'off':<15} {dpo:>11.2f} {d2o:>11.2f} {d2o / dpo:>9.2f}x")
    print(f"\ntarget: D2O with K={args.k} below 2.5x a DPO step (prompt sharing on)")


if __name__ == "__main__":
    main()
