"""A Bradley-Terry reward-model step (``prefalign train-rm``) in its four forms: one padded row per
(prompt, response) or the responses of a prompt sharing it (``score.rm_model.exchange_rewards``),
each in fp32 and under bf16 autocast.

Each form runs the same batches (forward over chosen and rejected, backward of the summed rewards),
interleaved with the others so a change in load hits every form; the table prints seconds per step
(median over the repeats), tokens the model reads per step, and the largest reward difference to
the fp32 one-row form (shared scoring is exact up to rounding; bf16 is not).

    python benchmarks/train_rm_step.py --pairs runs/rdpo-sycophancy/pairs/train.jsonl \\
        --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="preference pairs (JSONL: prompt, chosen, rejected)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="backbone (a registry name or a folder)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="batches per form and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefalign.models.registry import resolve_model
    from prefalign.score import rm_model as rm

    folder = resolve_model(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rm.prepare_tokenizer(tokenizer, model)
    model.train()

    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    batches = [rows[i : i + args.batch_size] for i in range(0, args.steps * args.batch_size, args.batch_size)]

    def inputs(batch):
        return [r["prompt"] for r in batch] * 2, [r["chosen"] for r in batch] + [r["rejected"] for r in batch]

    def rewards(prompts, responses, shared):
        if shared:
            return rm.exchange_rewards(model, tokenizer, prompts, responses, max_length=args.max_length)
        return rm.reward_logits(model, rm.encode_pairs(tokenizer, prompts, responses, max_length=args.max_length))

    def tokens(prompts, responses, shared):
        plain = rm.encode_pairs(tokenizer, prompts, responses, max_length=args.max_length)["input_ids"].numel()
        if not shared:
            return plain
        built = rm._shared_prompt_batch(model, tokenizer, prompts, responses, args.max_length, "auto")
        if built is None:
            return plain
        batch, _, _, alone = built
        rest = rm.encode_pairs(tokenizer, [prompts[i] for i in alone], [responses[i] for i in alone],
                               max_length=args.max_length)["input_ids"].numel() if alone else 0
        return batch.input_ids.numel() + rest

    forms = [(shared, dtype) for dtype in ("float32", "bfloat16") for shared in (False, True)]
    times = {f: [] for f in forms}
    with torch.no_grad():
        reference = [rewards(*inputs(b), False) for b in batches]
    gaps = {}
    for shared, dtype in forms:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            got = [rewards(*inputs(b), shared).float() for b in batches]
        gaps[(shared, dtype)] = max(float((g - r).abs().max()) for g, r in zip(got, reference))
    for _ in range(args.repeats):
        for form in forms:
            shared, dtype = form
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
            start = time.perf_counter()
            for b in batches:
                with autocast:
                    out = rewards(*inputs(b), shared)
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)
            times[form].append((time.perf_counter() - start) / len(batches))

    print(machine())
    print(f"{len(batches)} batches of {args.batch_size} pairs from {args.pairs}, max_length {args.max_length}, "
          f"{args.repeats} repeats, backbone {args.model}")
    base = statistics.median(times[(False, "float32")])
    print(f"{'layout':<24}{'dtype':<10}{'s/step':>8}{'speed-up':>10}{'tokens/step':>13}{'max |Δ reward|':>16}")
    for form in forms:
        shared, dtype = form
        seconds = statistics.median(times[form])
        per_step = statistics.mean(tokens(*inputs(b), shared) for b in batches)
        layout = "prompt shared" if shared else "one row per exchange"
        print(f"{layout:<24}{dtype:<10}{seconds:>8.2f}{base / seconds:>9.2f}x{per_step:>13.0f}{gaps[form]:>16.2e}")


if __name__ == "__main__":
    main()
