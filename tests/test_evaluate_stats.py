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
