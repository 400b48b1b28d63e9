"""Held-out preference accuracy: how often a model gives the chosen response a higher summed
log-probability than the rejected one, and by how much on average."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings, tokenize_record
from prefalign.evaluate.logps import response_logps
from prefalign.evaluate.stats import wilson_interval


@dataclass
class PreferenceScore:
    n: int
    share: float  # share of pairs with logp(chosen) > logp(rejected)
    share_ci95: tuple[float, float]  # Wilson score interval
    mean_gap: float  # mean of logp(chosen) - logp(rejected), nats
    gap_stderr: float
    wins: list[bool] | None = None  # per pair: logp(chosen) > logp(rejected) (for paired differences)

    def as_dict(self) -> dict:
        return asdict(self)


def pair_logps(model, tokenizer, records: Sequence[PreferenceRecord], settings: TokenizeSettings, batch_size: int = 8):
    """Summed response log-probs of chosen and rejected for each record: two [N] tensors."""
    examples = [tokenize_record(r, i, tokenizer, ("chosen", "rejected"), settings) for i, r in enumerate(records)]
    scores = response_logps(model, examples, ("chosen", "rejected"), tokenizer.pad_token_id, batch_size=batch_size)
    return scores["chosen"], scores["rejected"]


def preference_score(model, tokenizer, records, settings: TokenizeSettings | None = None, batch_size: int = 8) -> PreferenceScore:
    chosen, rejected = pair_logps(model, tokenizer, records, settings or TokenizeSettings(), batch_size)
    gaps = chosen - rejected
    wins = int((gaps > 0).sum())
    n = len(gaps)
    stderr = float(gaps.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return PreferenceScore(n, wins / n, wilson_interval(wins, n), float(gaps.mean()), stderr, (gaps > 0).tolist())
