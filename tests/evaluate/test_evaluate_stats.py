import math

import torch

from prefalign.evaluate.samples import distinct_n, kl_to_reference, perplexity
from prefalign.evaluate.stats import mean, share, wilson_interval


def test_wilson_interval_known_values():
    # 8 of 10: the Wilson 95% interval is [0.490, 0.943] (standard tables).
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17


def test_share_and_mean():
    s = share([True, False, True, True])
    assert s.value == 0.75 and s.n == 4 and s.low < 0.75 < s.high
    m = mean([1.0, 2.0, 3.0, float("nan")])
    assert m.n == 3 and m.value == 2.0
    assert abs(m.stderr - 1 / math.sqrt(3)) < 1e-9
    assert abs(m.high - (2 + 1.959963984540054 / math.sqrt(3))) < 1e-9
    assert mean([]).n == 0 and math.isnan(mean([]).value)


def test_kl_perplexity_distinct():
    kl = kl_to_reference(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -3.0]))
    assert abs(kl.value - 0.75) < 1e-9
    ppl = perplexity(torch.tensor([-2.0 * math.log(4)]), torch.tensor([2.0]))
    assert abs(ppl.value - 4.0) < 1e-5
    assert distinct_n(["a b a b"], 2) == 2 / 3
    assert distinct_n(["a b", "c d"], 1) == 1.0
    assert math.isnan(distinct_n(["a"], 2))


# -- paired bootstrap --------------------------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from prefalign.evaluate.stats import (  # noqa: E402
    paired_difference,
    paired_perplexity_change,
    pooled_perplexity,
)


def hand_percentile(values, q):
    """Linear interpolation between order statistics (numpy's default), written out."""
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def test_paired_difference_matches_a_hand_written_bootstrap_loop():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2, size=40).astype(float)  # e.g. attack success per prompt
    model = np.where(rng.random(40) < 0.6, 0.0, base)  # the model refuses some the base answered
    got = paired_difference(model, base, seed=3, n_boot=500)
    # The same resamples (default_rng(seed), one [n_boot, n] draw), averaged by a plain loop.
    idx = np.random.default_rng(3).integers(0, 40, size=(500, 40))
    means = []
    for row in idx:
        total = 0.0
        for i in row:
            total += model[i] - base[i]
        means.append(total / 40)
    assert got.value == pytest.approx(sum(model) / 40 - sum(base) / 40, abs=1e-12)
    assert got.low == pytest.approx(hand_percentile(means, 2.5), abs=1e-12)
    assert got.high == pytest.approx(hand_percentile(means, 97.5), abs=1e-12)
    assert got.n == 40 and got.kind == "difference" and got.low <= got.value <= got.high


def test_paired_difference_agrees_with_an_independent_resampler_and_the_normal_interval():
    gen = np.random.default_rng(0)
    base = gen.normal(0.0, 1.0, size=300)
    model = base - 0.4 + gen.normal(0.0, 0.5, size=300)  # strongly paired: the pairing narrows the interval
    got = paired_difference(model, base)
    # Python's own random module, 4000 resamples: the percentile interval agrees to Monte Carlo error.
    import random

    r = random.Random(12345)
    d = (model - base).tolist()
    means = sorted(sum(d[r.randrange(300)] for _ in range(300)) / 300 for _ in range(4000))
    assert got.low == pytest.approx(hand_percentile(means, 2.5), abs=0.01)
    assert got.high == pytest.approx(hand_percentile(means, 97.5), abs=0.01)
    # And the normal approximation of a mean of 300 paired differences.
    se = float(np.std(d, ddof=1)) / math.sqrt(300)
    assert got.low == pytest.approx(got.value - 1.96 * se, abs=0.25 * se)
    assert got.high == pytest.approx(got.value + 1.96 * se, abs=0.25 * se)
    assert got.excludes_zero() and got.high < 0
    # Unpaired, the interval would be far wider: the pairing is used.
    assert got.high - got.low < 0.5 * 2 * 1.96 * math.sqrt(np.var(model, ddof=1) / 300 + np.var(base, ddof=1) / 300)


def test_paired_difference_identical_inputs_nans_and_determinism():
    values = [0.3, 1.0, 0.0, 0.7, 0.2]
    same = paired_difference(values, list(values))
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    a, b = [1.0, 0.0, 1.0, 1.0, float("nan"), 0.0], [0.0, 0.0, 1.0, 0.0, 1.0, float("nan")]
    first, again = paired_difference(a, b, seed=0), paired_difference(a, b, seed=0)
    assert first == again  # a re-run prints the same interval
    assert first.n == 4 and first.value == pytest.approx(0.5)  # the two items with a NaN are left out, pairs stay pairs
    assert paired_difference(a, b, seed=1) != first  # the seed is what fixes it
    assert paired_difference([], []).n == 0 and math.isnan(paired_difference([], []).value)
    one = paired_difference([1.0], [0.0])
    assert one.value == 1.0 and math.isnan(one.low)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0])


def test_pooled_perplexity_and_its_paired_relative_change():
    nll_b = np.array([10.0, 4.0, 30.0, 8.0, 12.0])
    tokens = np.array([5.0, 2.0, 10.0, 4.0, 6.0])
    nll_a = nll_b * 1.1  # every text 10% more NLL
    ppl = pooled_perplexity(nll_b, tokens)
    assert ppl.value == pytest.approx(math.exp(64.0 / 27.0)) and ppl.n == 5 and ppl.low <= ppl.value <= ppl.high
    change = paired_perplexity_change(nll_a, tokens, nll_b, tokens, seed=5, n_boot=300)
    assert change.kind == "relative"
    assert change.value == pytest.approx(math.exp(70.4 / 27.0) / math.exp(64.0 / 27.0) - 1)
    idx = np.random.default_rng(5).integers(0, 5, size=(300, 5))
    ratios = []
    for row in idx:
        pa = math.exp(sum(nll_a[i] for i in row) / sum(tokens[i] for i in row))
        pb = math.exp(sum(nll_b[i] for i in row) / sum(tokens[i] for i in row))
        ratios.append(pa / pb - 1)
    assert change.low == pytest.approx(hand_percentile(ratios, 2.5), rel=1e-9)
    assert change.high == pytest.approx(hand_percentile(ratios, 97.5), rel=1e-9)
    assert change.excludes_zero() and change.low > 0
    same = paired_perplexity_change(nll_b, tokens, nll_b, tokens)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
