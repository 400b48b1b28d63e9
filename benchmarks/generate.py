"""Generation throughput of the transformers backend at batch 1, 8 and 32, against a naive loop
that calls ``model.generate`` on one prompt at a time.

Same model, prompts (AdvBench, as chat), sampling settings and seed for every row. New tokens
are counted up to each response's end (EOS or the limit), so padding a finished sequence carries
in a batch is not counted as work. Each row runs once after a short warm-up.

    python benchmarks/generate.py                                    # SmolLM2-135M-Instruct, 32 prompts
    python benchmarks/generate.py --model tiny-random --prompts 8    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, peak_rss_mib  # noqa: E402


def naive_loop(model, tokenizer, conversations, max_new_tokens: int, temperature: float, seed: int) -> tuple[int, float]:
    """What a first script does: one prompt at a time, no batching."""
    import torch

    torch.manual_seed(seed)
    new_tokens, start = 0, time.perf_counter()
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature,
                                 top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        generated = out[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        new_tokens += len(generated)
    return new_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from prefalign.data.prompts import load_prompts
    from prefalign.generate.backends import SamplingParams, TransformersBackend
    from prefalign.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    prompts = load_prompts("advbench", limit=args.prompts, split=None)
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)

    # Warm-up: first calls pay for lazy initialisation that no row should be charged with.
    TransformersBackend(model, tokenizer, batch_size=2, show_progress=False).generate(conversations[:2], SamplingParams(max_new_tokens=4))

    rows = []
    tokens, seconds = naive_loop(model, tokenizer, conversations, args.max_new_tokens, args.temperature, args.seed)
    rows.append(("naive loop (1 prompt per generate call)", tokens, seconds))
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        backend = TransformersBackend(model, tokenizer, batch_size=batch_size, show_progress=False)
        backend.generate(conversations, params)
        stats = backend.last_stats
        rows.append((f"transformers backend, batch {batch_size}", stats.new_tokens, stats.seconds))

    base = rows[0][1] / rows[0][2]
    print(f"\nmachine: {machine()}")
    print(f"model {args.model}; {len(prompts)} AdvBench prompts; max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, seed {args.seed}; peak RSS {peak_rss_mib():.0f} MiB\n")
    header = f"{'run':<42} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9} {'vs naive':>9}"
    print(header)
    print("-" * len(header))
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{name:<42} {tokens:>10} {seconds:>8.1f} {rate:>9.1f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
