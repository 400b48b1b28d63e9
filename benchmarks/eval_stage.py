"""The eval stage's log-prob passes, before and after ``evaluate/logps.py``.

One pass is what ``prefalign eval`` runs once per model and prompt set for the KL and perplexity
rows (and twice for a model that is not the reference: its own log-probs, then the reference's):
the summed log-prob of every sampled response after exactly its chat-rendered prompt
(``evaluate.samples.sampled_logps``). Here the prompts are AdvBench's and the responses are fixed
(English words, 10-40 tokens, seed 0, as samples that end early or at the 40-token limit), so both
paths score the same tokens.

- ``old``: the pass as it was before commit ee794f5 (kept inline below): length-sorted batches of
  8 through ``train.reference.score_examples``, torch's default intra-op thread count.
- ``new``: ``evaluate.samples.sampled_logps`` as it is: the same batches and scorer, each decoder
  layer run with the thread count ``models.threads.ThreadTuner`` picks from its timings.

Runs alternate (old, new, old, new, ...) so a change in the machine's load hits both.

    python benchmarks/eval_stage.py                       # 64 prompts, 2 runs of each
    python benchmarks/eval_stage.py --prompts 32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORDS, machine  # noqa: E402

MAX_LENGTH = 192  # the rdpo-safety recipe's eval max_length


def fixed_responses(tokenizer, n: int, seed: int, low: int = 10, high: int = 40) -> list[list[int]]:
    """``n`` responses of ``low``-``high`` tokens of plain English words (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(high))
        out.append(tokenizer(words, add_special_tokens=False)["input_ids"][: rng.randint(low, high)])
    return out


def old_sampled_logps(model, pad_id, prompt_ids, response_ids, max_length=4096, batch_size=8):
    """``evaluate.samples.sampled_logps`` before ee794f5, for this comparison only."""
    import torch

    from prefalign.data.tokenize import TokenizedExample
    from prefalign.train.reference import score_examples

    examples = []
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        response = list(response)[: max_length - 1] or [pad_id]
        prompt = list(prompt)[-(max_length - len(response)):]
        examples.append(TokenizedExample(i, prompt, {"chosen": [response]}))
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens())
    logps = torch.zeros(len(examples))
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        logps[idx] = score_examples(model, [examples[i] for i in idx], ("chosen",), pad_id)["chosen"]
    lengths = torch.tensor([len(ex.responses["chosen"][0]) for ex in examples], dtype=torch.float32)
    return logps, lengths


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from prefalign.data.prompts import load_prompts
    from prefalign.data.render import encode_prompt
    from prefalign.evaluate.samples import sampled_logps
    from prefalign.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p.prompt}])
               for p in load_prompts("advbench", limit=args.prompts)]
    responses = fixed_responses(tokenizer, len(prompts), seed=0)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    response_tokens = sum(len(r) for r in responses)
    paths = {"old": lambda: old_sampled_logps(model, tokenizer.pad_token_id, prompts, responses, MAX_LENGTH),
             "new": lambda: sampled_logps(model, tokenizer.pad_token_id, prompts, responses, MAX_LENGTH)}

    print(f"machine: {machine()}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model {args.model}; {len(prompts)} AdvBench prompts (chat-rendered), fixed responses of 10-40 tokens; "
          f"{tokens} tokens per pass, {response_tokens} of them scored; batch 8, longest first")
    rows, values = [], {}
    for run in range(1, args.repeats + 1):
        for name, fn in paths.items():
            seconds, (logps, _) = timed(fn)
            values[name] = logps
            rows.append((name, run, seconds))
            print(f"  {name} run {run}: {seconds:.1f} s", flush=True)
    best_old = min(s for name, _, s in rows if name == "old")

    print()
    header = f"{'path':6} {'run':>4} {'seconds':>8} {'sequences/s':>12} {'tokens/s':>9} {'vs best old':>12}"
    print(header)
    print("-" * len(header))
    for name, run, seconds in rows:
        print(f"{name:6} {run:>4} {seconds:>8.1f} {len(prompts) / seconds:>12.2f} {tokens / seconds:>9.0f} "
              f"{best_old / seconds:>11.2f}x")
    diff = (values["old"] - values["new"]).abs().max().item()
    scale = values["old"].abs().max().item()
    print(f"\nsummed log-probs, old vs new: max |diff| {diff:.2e} nats (largest |log-prob| {scale:.1f})")
    print(f"torch intra-op threads outside the tuner: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
