"""Estimates with their sample size and a 95% interval: every number in a report carries both.

Differences between models are paired: the same prompts (or pairs, or texts) in the same order for
every model, resampled together (a paired bootstrap with a fixed seed, so a re-run prints the same
interval)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int
    stderr: float | None = None
    # "mean" (normal interval), "share" (Wilson score interval), "pooled" (a pooled statistic with a
    # bootstrap percentile interval), "difference" (paired difference of means, bootstrap
    # percentile interval) or "relative" (ratio − 1 to a baseline, bootstrap percentile interval)
    kind: str = "mean"

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"

    def excludes_zero(self) -> bool:
        """The 95% interval lies entirely above or below 0 (for a difference: not noise at 5%)."""
        return self.n > 0 and not math.isnan(self.low) and (self.low > 0 or self.high < 0)


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


# ----------------------------------------------------------------------------- paired bootstrap

N_BOOT = 2000
BOOTSTRAP_SEED = 0
_MAX_CELLS = 4_000_000  # resample indices drawn per block (int64: 32 MB)


def bootstrap_indices(n: int, *, seed: int = BOOTSTRAP_SEED, n_boot: int = N_BOOT) -> Iterator[np.ndarray]:
    """Blocks of resampled item indices, ``[rows, n]`` each, ``n_boot`` rows in all, from
    ``numpy.random.default_rng(seed)``. When ``n_boot * n`` fits one block (up to 4M indices) this
    is exactly ``default_rng(seed).integers(0, n, size=(n_boot, n))``."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // max(n, 1))
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, seed: int = BOOTSTRAP_SEED,
              n_boot: int = N_BOOT) -> np.ndarray:
    """``statistic(idx)`` for every resample: ``idx`` is a ``[rows, n]`` block of indices and the
    statistic returns one value per row. All resamples, ``[n_boot]``."""
    return np.concatenate([np.asarray(statistic(idx), dtype=np.float64) for idx in bootstrap_indices(n, seed=seed, n_boot=n_boot)])


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _paired(*arrays: Sequence[float]) -> list[np.ndarray]:
    """Aligned float arrays with the items where any of them is NaN dropped (an unscored response
    leaves out its prompt for every model, so the pairs stay pairs)."""
    xs = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    if len({len(x) for x in xs}) > 1:
        raise ValueError(f"paired values need the same items in the same order; got lengths {[len(x) for x in xs]}")
    keep = np.ones(len(xs[0]), dtype=bool)
    for x in xs:
        keep &= ~np.isnan(x)
    return [x[keep] for x in xs]


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = BOOTSTRAP_SEED, n_boot: int = N_BOOT) -> Estimate:
    """mean(a) − mean(b) over paired items (``a[i]`` and ``b[i]`` measure the same prompt), with a
    95% percentile interval from ``n_boot`` paired bootstrap resamples of the items. Items where
    either value is NaN are left out. Deterministic for a given ``seed``."""
    a, b = _paired(a, b)
    n = len(a)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, None, "difference")
    d = a - b
    value = float(d.mean())
    if n == 1:
        return Estimate(value, float("nan"), float("nan"), 1, None, "difference")
    boot = bootstrap(lambda idx: d[idx].mean(axis=1), n, seed=seed, n_boot=n_boot)
    low, high = percentile_interval(boot)
    return Estimate(value, low, high, n, float(boot.std(ddof=1)), "difference")


def pooled_perplexity_of(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(math.exp(float(np.sum(nll)) / max(float(np.sum(tokens)), 1.0)))


def pooled_perplexity(nll: Sequence[float], tokens: Sequence[float], *, seed: int = BOOTSTRAP_SEED,
                      n_boot: int = N_BOOT) -> Estimate:
    """exp(Σ NLL / Σ tokens) over texts (``nll[i]``: the summed negative log-likelihood of text i,
    ``tokens[i]``: its token count), with a 95% bootstrap percentile interval over texts."""
    nll, tokens = _paired(nll, tokens)
    n = len(nll)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, None, "pooled")
    value = pooled_perplexity_of(nll, tokens)
    if n == 1:
        return Estimate(value, float("nan"), float("nan"), 1, None, "pooled")
    boot = bootstrap(lambda idx: np.exp(nll[idx].sum(axis=1) / np.maximum(tokens[idx].sum(axis=1), 1.0)), n,
                     seed=seed, n_boot=n_boot)
    low, high = percentile_interval(boot)
    return Estimate(value, low, high, n, float(boot.std(ddof=1)), "pooled")


def paired_perplexity_change(nll_a: Sequence[float], tokens_a: Sequence[float], nll_b: Sequence[float],
                             tokens_b: Sequence[float], *, seed: int = BOOTSTRAP_SEED, n_boot: int = N_BOOT) -> Estimate:
    """Relative change of pooled perplexity, ppl(a) / ppl(b) − 1, over the same texts, with a 95%
    paired bootstrap percentile interval (each resample recomputes both pooled perplexities on the
    same resampled texts)."""
    nll_a, tokens_a, nll_b, tokens_b = _paired(nll_a, tokens_a, nll_b, tokens_b)
    n = len(nll_a)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, None, "relative")
    # In log space: log ppl(a) − log ppl(b), so huge perplexities do not overflow the ratio.
    value = float(math.expm1(nll_a.sum() / max(tokens_a.sum(), 1.0) - nll_b.sum() / max(tokens_b.sum(), 1.0)))
    if n == 1:
        return Estimate(value, float("nan"), float("nan"), 1, None, "relative")

    def ratio(idx):
        log_a = nll_a[idx].sum(axis=1) / np.maximum(tokens_a[idx].sum(axis=1), 1.0)
        log_b = nll_b[idx].sum(axis=1) / np.maximum(tokens_b[idx].sum(axis=1), 1.0)
        return np.expm1(log_a - log_b)

    boot = bootstrap(ratio, n, seed=seed, n_boot=n_boot)
    low, high = percentile_interval(boot)
    return Estimate(value, low, high, n, float(boot.std(ddof=1)), "relative")
