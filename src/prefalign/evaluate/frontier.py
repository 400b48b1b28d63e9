"""Reward-vs-KL curves compared at the same KL: the ODPO paper's comparison (Amini et al. 2024,
arXiv:2402.10571, Fig. 2: ODPO's frontier lies above DPO's).

Each method is trained at several β (or for several steps); each trained model is one point
(KL to the reference, mean reward). Two methods' points never share a KL, so one curve is read at
the other's KL values: the second curve is linearly interpolated between its two neighbouring
points. A KL outside the second curve's range is not compared (no extrapolation), and counted
apart, so "at or above at k of n points" never rests on a guess. The base model (KL 0 to itself as
the reference) may start the second curve, as β → ∞ keeps any method there; a model on both
curves is a config error (it would be compared with itself).

With each model's per-prompt rewards (the same prompts for every model), each compared point also
gets the difference "first − second at that KL" with a 95% paired bootstrap interval over
prompts: the second curve's per-prompt reward there is the same weighting of its two neighbours'
per-prompt rewards as its mean (the KL values taken as they were measured). An interval that
holds 0 says the two curves cannot be told apart at that point, whatever the count says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from prefalign.evaluate.stats import BOOTSTRAP_SEED, N_BOOT, paired_difference


@dataclass(frozen=True)
class CurvePoint:
    label: str
    kl: float
    reward: float


@dataclass(frozen=True)
class PointComparison:
    label: str  # the first curve's model
    kl: float
    reward: float
    other_reward: float | None  # the second curve interpolated at this KL; None outside its range
    at_or_above: bool | None
    # reward − other_reward with its 95% paired bootstrap interval over prompts (None without
    # per-prompt rewards or outside the range)
    difference: float | None = None
    difference_low: float | None = None
    difference_high: float | None = None


@dataclass(frozen=True)
class CurveComparison:
    first: str
    second: str
    points: tuple[PointComparison, ...]

    @property
    def compared(self) -> int:
        return sum(p.at_or_above is not None for p in self.points)

    @property
    def at_or_above(self) -> int:
        return sum(bool(p.at_or_above) for p in self.points)

    def as_dict(self) -> dict:
        return {"first": self.first, "second": self.second, "compared": self.compared,
                "at_or_above": self.at_or_above, "points": [asdict(p) for p in self.points]}


def interpolation_weights(points: Sequence[CurvePoint], kl: float) -> dict[str, float] | None:
    """The curve at ``kl`` as weights on its points' labels (the two neighbours by KL, linear
    between them; one point at exactly its KL); None outside [min KL, max KL]. The reward there is
    ``Σ weight · reward``, and so is each prompt's, which gives the comparison its paired interval."""
    pts = sorted(points, key=lambda p: p.kl)
    if not pts or kl < pts[0].kl or kl > pts[-1].kl:
        return None
    for left, right in zip(pts, pts[1:]):
        if left.kl <= kl <= right.kl:
            if right.kl == left.kl:
                best = max((left, right), key=lambda q: q.reward)
                return {best.label: 1.0}
            t = (kl - left.kl) / (right.kl - left.kl)
            return {left.label: 1.0 - t, right.label: t}
    return {pts[0].label: 1.0}  # a single point, at exactly its KL


def _weighted_reward(points: Sequence[CurvePoint], weights: dict[str, float] | None) -> float | None:
    if weights is None:
        return None
    reward = {p.label: p.reward for p in points}
    return sum(w * reward[label] for label, w in weights.items())


def interpolate(points: Sequence[CurvePoint], kl: float) -> float | None:
    """The curve's reward at ``kl``, linear between the neighbouring points sorted by KL; None
    outside [min KL, max KL]."""
    return _weighted_reward(points, interpolation_weights(points, kl))


def compare_curves(first: Sequence[CurvePoint], second: Sequence[CurvePoint], names: tuple[str, str],
                   items: Mapping[str, Sequence[float]] | None = None, *, seed: int = BOOTSTRAP_SEED,
                   n_boot: int = N_BOOT) -> CurveComparison:
    """Each point of ``first`` against ``second`` read at the same KL; with ``items`` (label ->
    per-prompt rewards, the same prompts in the same order for every model) each compared point
    also gets its paired difference and interval."""
    out = []
    for p in sorted(first, key=lambda q: q.kl):
        weights = interpolation_weights(second, p.kl)
        other = _weighted_reward(second, weights)
        point = PointComparison(p.label, p.kl, p.reward, other, None if other is None else p.reward >= other)
        if items is not None and weights is not None and p.label in items and all(label in items for label in weights):
            at_kl = sum(w * np.asarray(items[label], dtype=np.float64) for label, w in weights.items())
            d = paired_difference(items[p.label], at_kl, seed=seed, n_boot=n_boot)
            point = replace(point, difference=d.value, difference_low=d.low, difference_high=d.high)
        out.append(point)
    return CurveComparison(names[0], names[1], tuple(out))


def curves_from_points(points: Sequence[Mapping], groups: Mapping[str, Sequence[str]]) -> dict[str, list[CurvePoint]]:
    """Group the evaluation's reward-vs-KL points (``{label: "model (set)", kl, reward}``) into
    named curves: ``groups`` maps a curve name to its model labels."""
    curves: dict[str, list[CurvePoint]] = {}
    for name, models in groups.items():
        wanted = set(models)
        curves[name] = [CurvePoint(p["label"], float(p["kl"]), float(p["reward"]))
                        for p in points if p["label"].rsplit(" (", 1)[0] in wanted]
    return curves
