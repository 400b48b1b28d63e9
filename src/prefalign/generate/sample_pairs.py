"""``sample-pairs``: ODPO-style pairs (Amini, Vieira, Cotterell 2024, "Direct Preference
Optimization with an Offset", arXiv:2402.10571). ``n`` responses are sampled per prompt and scored
by a scorer (``texts -> floats``); pairs are built by score with a minimum gap, and the scores are
written as ``reward_chosen``/``reward_rejected`` (higher is better, negated when
``higher_is_better`` is false), ready for ``rdpo``/``odpo``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field

from prefalign.data.prompts import Prompt
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, complete, normalise, stripped, user
from prefalign.generate.scoring import resolve_scorer, score_texts


class SamplePairsConfig(StrategyConfig):
    """Sampled pairs ranked by a scorer."""

    n: int = Field(4, ge=2, le=64, description="responses sampled per prompt")
    scorer: str | None = Field(
        None, description="a prefalign scorer (sentiment, toxicity, profanity, ...) or module:function; required"
    )
    higher_is_better: bool = Field(True, description="false for scores like toxicity (rewards are then negated)")
    min_gap: float = Field(0.0, ge=0, description="smallest reward gap for a pair (the gap must also be > 0)")
    pairing: Literal["best-worst", "disjoint"] = Field(
        "best-worst",
        description="best-worst: one pair per prompt; disjoint: best with worst, 2nd best with 2nd worst, ...",
    )


def rank_pairs(texts: Sequence[str], rewards: Sequence[float], min_gap: float, pairing: str) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs by reward; texts are assumed distinct and non-empty."""
    order = sorted(range(len(texts)), key=lambda i: (-rewards[i], i))
    pairs = []
    top, bottom = 0, len(order) - 1
    while top < bottom:
        c, r = order[top], order[bottom]
        gap = rewards[c] - rewards[r]
        if gap > 0 and gap >= min_gap:
            pairs.append((c, r))
        if pairing == "best-worst":
            break
        top, bottom = top + 1, bottom - 1
    return pairs


def distinct_samples(texts: Sequence[str]) -> tuple[list[str], int, int]:
    """Non-empty, distinct samples (first kept), with the counts of empty and duplicate ones."""
    seen, kept, empty, dup = set(), [], 0, 0
    for t in texts:
        t = stripped(t)
        if not t:
            empty += 1
        elif normalise(t) in seen:
            dup += 1
        else:
            seen.add(normalise(t))
            kept.append(t)
    return kept, empty, dup


class SamplePairs(Strategy):
    name: ClassVar[str] = "sample-pairs"
    Config = SamplePairsConfig
    description = "ODPO: n samples per prompt, scored; pairs with a minimum reward gap, rewards written"

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.scorer = ctx.scorer or resolve_scorer(self.config.scorer, what="sample-pairs")

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: SamplePairsConfig = self.config
        samples = complete(self.backend, [[user(p.prompt)] for p in prompts], self.ctx.params(seed, "samples", n=cfg.n))
        distinct = [distinct_samples(texts) for texts in samples]
        flat = [t for kept, _, _ in distinct for t in kept]
        scores = iter(score_texts(self.scorer, flat))
        sign = 1.0 if cfg.higher_is_better else -1.0
        out = []
        for p, (kept, empty, dup) in zip(prompts, distinct):
            raw = [next(scores) for _ in kept]
            rewards = [sign * s for s in raw]
            meta = {"samples": kept, "sample_scores": raw, "empty_samples": empty, "duplicate_samples": dup}
            if len(kept) < 2:
                out.append([Candidate.drop(self.name, "too_few_distinct_samples", meta)])
                continue
            pairs = rank_pairs(kept, rewards, cfg.min_gap, cfg.pairing)
            if not pairs:
                out.append([Candidate.drop(self.name, "no_pair_with_min_gap", meta)])
                continue
            out.append([
                Candidate.keep(self.name, {**meta, "pair": [c, r]}, prompt=p.prompt, chosen=kept[c], rejected=kept[r],
                               reward_chosen=rewards[c], reward_rejected=rewards[r])
                for c, r in pairs
            ])
        return out
