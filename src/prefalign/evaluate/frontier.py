"""Reward-vs-KL curves compared at the same KL: the ODPO paper's comparison (Amini et al. 2024,
arXiv:2402.10571, Fig. 2: ODPO's frontier lies above DPO's).

Each method is trained at several β (or for several steps); each trained model is one point
(KL to the reference, mean reward). Two methods' points never share a KL, so one curve is read at
the other's KL values: the second curve is linearly interpolated between its two neighbouring
points. A KL outside the second curve's range is not compared (no extrapolation), and counted
apart, so "at or above at k of n points" never rests on a guess. The base model (KL 0 to itself as
the reference) may start the second curve, as β → ∞ keeps any method there; a model on both
curves is a config error (it would be compared with itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


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


def interpolate(points: Sequence[CurvePoint], kl: float) -> float | None:
    """The curve's reward at ``kl``, linear between the neighbouring points sorted by KL; None
    outside [min KL, max KL]."""
    pts = sorted(points, key=lambda p: p.kl)
    if not pts or kl < pts[0].kl or kl > pts[-1].kl:
        return None
    for left, right in zip(pts, pts[1:]):
        if left.kl <= kl <= right.kl:
            if right.kl == left.kl:
                return max(left.reward, right.reward)
            t = (kl - left.kl) / (right.kl - left.kl)
            return left.reward + t * (right.reward - left.reward)
    return pts[0].reward  # a single point, at exactly its KL


def compare_curves(first: Sequence[CurvePoint], second: Sequence[CurvePoint], names: tuple[str, str]) -> CurveComparison:
    """Each point of ``first`` against ``second`` read at the same KL."""
    out = []
    for p in sorted(first, key=lambda q: q.kl):
        other = interpolate(second, p.kl)
        out.append(PointComparison(p.label, p.kl, p.reward, other, None if other is None else p.reward >= other))
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
