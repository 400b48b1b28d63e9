"""Training step time of the three batch layouts on pairs whose lengths vary a lot.

``pairs``: one [prompt | response] row per response; ``shared``: one row per prompt, prompt
encoded once (the default); ``packed``: whole (prompt, responses) blocks packed into rows, no
padding. Same data, batch, steps and lr for each; prints the median step time after a warm-up
step, the real tokens per step and the padded cells the forward pass ran over.

    python benchmarks/packing.py                   # SmolLM2-135M-Instruct
    python benchmarks/packing.py --model tiny-random --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORDS, machine  # noqa: E402

LAYOUTS = {"pairs": dict(share_prompt=False, pack=False), "shared": dict(share_prompt=True, pack=False),
           "packed": dict(share_prompt=True, pack=True)}


def varied_pairs(n: int, seed: int, prompt_range: tuple[int, int], response_range: tuple[int, int]) -> list[dict]:
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [{"prompt": words(*prompt_range) + ".", "chosen": " " + words(*response_range), "rejected": " " + words(*response_range)}
            for _ in range(n)]


def run(model: str, data: Path, layout: dict, batch_size: int, steps: int) -> tuple[list[float], int, int]:
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import Trainer

    workdir = Path(tempfile.mkdtemp(prefix="packing-"))
    config = TrainConfig(model=model, data=data, output_dir=workdir / "out", loss="dpo", lr=1e-6, batch_size=batch_size,
                         max_steps=steps + 1, chat_template="never", max_length=1024, max_prompt_length=768, shuffle=False,
                         group_by_length=False, ref_cache_dir=workdir / "ref", save_every=10_000, **layout)
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    from prefalign.train.sequences import collate

    first = trainer.upcoming_examples(1)
    batch = collate(first, trainer.spec.responses, trainer.pad_id, share_prompt=trainer.share_prompt, pack=trainer.pack)
    times = [trainer.train_step()["step_time_s"] for _ in range(steps + 1)]
    return times[1:], batch.num_tokens, batch.input_ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pairs = varied_pairs(args.batch_size * (args.steps + 1), args.seed, (10, 300), (5, 100))
    data = Path(tempfile.mkdtemp(prefix="packing-")) / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"machine: {machine()}")
    print(f"model {args.model}; batch {args.batch_size}; prompts 10-300 words, responses 5-100 words (uniform, seed {args.seed})\n")
    header = f"{'layout':<8} {'step s (median)':>16} {'real tokens':>12} {'cells run':>10} {'padding':>8}"
    print(header)
    print("-" * len(header))
    for name, layout in LAYOUTS.items():
        times, real, cells = run(args.model, data, layout, args.batch_size, args.steps)
        print(f"{name:<8} {statistics.median(times):>16.2f} {real:>12} {cells:>10} {1 - real / cells:>7.0%}")
    print("\n(real tokens / cells: of the first batch; 'pairs' counts each prompt once per response)")


if __name__ == "__main__":
    main()
