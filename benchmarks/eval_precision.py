"""The eval stage's log-prob passes in fp32 and under bf16 autocast: how much faster, how far apart.

The KL and perplexity rows of ``prefalign eval`` come from summed log-probs of sampled responses
(``evaluate.samples.sampled_logps``), today in fp32. Training and sampling already run bf16 on a
CPU with native bf16; this measures what the same passes would give and cost under bf16 autocast,
on a recipe's own samples (a trained model's responses to held-out prompts, with the exact token
ids the sampler drew), for the policy that drew them and for the reference:

- seconds per pass, fp32 and bf16 (alternating, so a change in load hits both);
- per-response |log-prob difference| (median, 95th percentile, max) for each model;
- the KL estimate (mean of policy − reference log-probs) and the mean perplexity under the
  reference, fp32 against bf16, next to the fp32 estimate's own 95% interval half-width.

Run a recipe first, then e.g.:

    python benchmarks/eval_precision.py --samples "runs/odpo-sentiment/eval/samples/odpo step 60/rtp.jsonl" \\
        --policy runs/odpo-sentiment/odpo/model --reference smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--samples", required=True, help="an eval stage's samples file (JSONL with prompt_ids, token_ids)")
    ap.add_argument("--policy", required=True, help="the model that drew the samples")
    ap.add_argument("--reference", required=True, help="the reference model (the recipe's base)")
    ap.add_argument("--limit", type=int, default=200, help="samples to score (the file's first)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import torch

    from prefalign.evaluate.samples import perplexity_items
    from prefalign.evaluate.samples import sampled_logps
    from prefalign.models.loading import load_model, load_tokenizer
    from prefalign.evaluate.stats import mean

    rows = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()][: args.limit]
    prompts, responses = [r["prompt_ids"] for r in rows], [r["token_ids"] for r in rows]
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    print(machine())
    print(f"{len(rows)} samples from {args.samples}; {tokens} tokens a pass")

    pad_id = load_tokenizer(args.reference).pad_token_id
    models = {"policy": load_model(args.policy), "reference": load_model(args.reference)}
    for model in models.values():
        model.eval()
    modes = {"fp32": nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    logps: dict[tuple[str, str], torch.Tensor] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    lengths = None
    for _ in range(args.repeats):
        for name, model in models.items():
            for mode, context in modes.items():
                start = time.perf_counter()
                with context():
                    values, lengths = sampled_logps(model, pad_id, prompts, responses)
                seconds.setdefault((name, mode), []).append(time.perf_counter() - start)
                logps[(name, mode)] = values.double()

    print(f"\n{'model':<10} {'fp32 s':>8} {'bf16 s':>8} {'speed-up':>9} {'|Δ log-prob| median':>20} {'p95':>8} {'max':>8}")
    for name in models:
        f32, b16 = min(seconds[(name, "fp32")]), min(seconds[(name, "bf16")])
        gap = (logps[(name, "fp32")] - logps[(name, "bf16")]).abs()
        print(f"{name:<10} {f32:8.1f} {b16:8.1f} {f32 / b16:8.2f}x {gap.median().item():20.4f} "
              f"{gap.quantile(0.95).item():8.4f} {gap.max().item():8.4f}")

    print("\nrow (fp32 -> bf16)          fp32     bf16   bf16 - fp32   fp32 interval half-width")
    for mode_pair in [("fp32", "bf16")]:
        kl = {m: mean((logps[("policy", m)] - logps[("reference", m)]).tolist()) for m in mode_pair}
        ppl = {m: mean(perplexity_items(logps[("reference", m)].float(), lengths)) for m in mode_pair}
        for label, est in (("KL(π‖π_ref), nats/response", kl), ("perplexity under reference", ppl)):
            a, b = est["fp32"], est["bf16"]
            print(f"{label:<27} {a.value:8.4f} {b.value:8.4f} {b.value - a.value:+12.4f} {(a.high - a.low) / 2:12.4f}")


if __name__ == "__main__":
    main()
