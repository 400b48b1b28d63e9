"""Estimates with their sample size and a 95% interval: every number in a report carries both."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int
    stderr: float | None = None
    kind: str = "mean"  # "mean" (normal interval) or "share" (Wilson score interval)

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def share(flags: Sequence[bool]) -> Estimate:
    """A proportion with its Wilson score interval (sound at small n and near 0 or 1)."""
    n = len(flags)
    hits = sum(bool(f) for f in flags)
    low, high = wilson_interval(hits, n)
    return Estimate(hits / n if n else float("nan"), low, high, n, None, "share")


def mean(values: Sequence[float]) -> Estimate:
    """A mean with a normal-approximation interval (mean ± 1.96 standard errors). NaNs are
    dropped, so unparsed judge scores shrink n instead of counting as zero."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = sum(xs) / n
    if n == 1:
        return Estimate(m, float("nan"), float("nan"), 1, None)
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    se = math.sqrt(var / n)
    return Estimate(m, m - Z95 * se, m + Z95 * se, n, se)
