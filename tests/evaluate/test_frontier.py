"""Reward-vs-KL curve comparison (ODPO's frontier against DPO's at the same KL)."""

from __future__ import annotations

import pytest

from prefalign.evaluate.frontier import CurvePoint, compare_curves, curves_from_points, interpolate
from prefalign.evaluate.report import EvalResult, markdown_summary
from prefalign.evaluate.runner import EvalConfig


def _curve(*xy):
    return [CurvePoint(f"m{i}", kl, r) for i, (kl, r) in enumerate(xy)]


def test_interpolate_is_linear_between_neighbours_and_refuses_to_extrapolate():
    curve = _curve((4.0, 0.6), (0.0, 0.2), (2.0, 0.4))  # unsorted on purpose
    assert interpolate(curve, 1.0) == pytest.approx(0.3)
    assert interpolate(curve, 3.0) == pytest.approx(0.5)
    assert interpolate(curve, 2.0) == pytest.approx(0.4)
    assert interpolate(curve, -0.1) is None and interpolate(curve, 4.1) is None
    assert interpolate(_curve((1.0, 0.7)), 1.0) == pytest.approx(0.7)
    assert interpolate([], 1.0) is None


def test_compare_counts_points_at_or_above_and_leaves_out_those_outside_the_range():
    dpo = _curve((1.0, 0.30), (3.0, 0.50))
    odpo = [CurvePoint("a", 2.0, 0.45), CurvePoint("b", 2.5, 0.40), CurvePoint("c", 0.5, 0.9), CurvePoint("d", 3.0, 0.5)]
    c = compare_curves(odpo, dpo, ("odpo", "dpo"))
    by_label = {p.label: p for p in c.points}
    assert by_label["a"].other_reward == pytest.approx(0.40) and by_label["a"].at_or_above
    assert by_label["b"].other_reward == pytest.approx(0.45) and by_label["b"].at_or_above is False
    assert by_label["c"].other_reward is None and by_label["c"].at_or_above is None  # below DPO's KL range
    assert by_label["d"].at_or_above  # equal counts as at or above
    assert (c.compared, c.at_or_above) == (3, 2)
    assert [p.kl for p in c.points] == sorted(p.kl for p in c.points)


def test_curves_group_points_by_model_label():
    points = [{"label": "odpo β=0.1 (rtp)", "kl": 1.0, "reward": 0.3}, {"label": "dpo β=0.1 (rtp)", "kl": 2.0, "reward": 0.2},
              {"label": "base (rtp)", "kl": 0.0, "reward": 0.1}]
    curves = curves_from_points(points, {"odpo": ["odpo β=0.1"], "dpo": ["dpo β=0.1"]})
    assert [p.kl for p in curves["odpo"]] == [1.0] and [p.kl for p in curves["dpo"]] == [2.0]


def test_config_needs_two_curves_of_known_models(tmp_path):
    models = {"base": "tiny", "a": "x", "b": "y"}
    EvalConfig(output_dir=tmp_path, models=models, compare_curves={"A": ["a"], "B": ["b"]})
    with pytest.raises(ValueError, match="exactly two curves"):
        EvalConfig(output_dir=tmp_path, models=models, compare_curves={"A": ["a"]})
    with pytest.raises(ValueError, match="'c' not a model label"):
        EvalConfig(output_dir=tmp_path, models=models, compare_curves={"A": ["a"], "B": ["c"]})
    EvalConfig(output_dir=tmp_path, models=models, compare_curves={"A": ["a"], "B": ["base", "b"]})  # the base starts B
    with pytest.raises(ValueError, match="'a' on both curves"):
        EvalConfig(output_dir=tmp_path, models=models, compare_curves={"A": ["a"], "B": ["a", "b"]})


def test_base_model_as_the_second_curves_origin_brings_a_low_kl_point_into_range():
    odpo = [CurvePoint("odpo", 0.5, 0.25)]
    assert compare_curves(odpo, _curve((1.0, 0.30)), ("odpo", "dpo")).compared == 0
    c = compare_curves(odpo, _curve((0.0, 0.10), (1.0, 0.30)), ("odpo", "dpo"))
    assert (c.compared, c.at_or_above) == (1, 1) and c.points[0].other_reward == pytest.approx(0.20)


def test_summary_and_json_carry_the_comparison():
    comparison = {"prompt_set": "rtp", **compare_curves([CurvePoint("odpo β=0.1 (rtp)", 2.0, 0.45)],
                                                        _curve((1.0, 0.3), (3.0, 0.5)), ("odpo", "dpo")).as_dict()}
    result = EvalResult("t", ["base"], {}, {}, curve_comparisons=[comparison])
    text = markdown_summary(result)
    assert "odpo at or above dpo at 1 of 1 KL points" in text
    assert "| odpo β=0.1 (rtp) | 2.000 | 0.4500 | 0.4000 |" in text
    assert result.to_json()["curve_comparisons"][0]["at_or_above"] == 1


def test_each_compared_point_gets_a_paired_interval_over_prompts():
    # Per-prompt rewards: the second curve read at the first's KL is the same weighting of its
    # neighbours' per-prompt rewards as of their means; the interval is that of the paired
    # difference computed apart.
    import numpy as np

    from prefalign.evaluate.stats import paired_difference

    rng = np.random.default_rng(0)
    items = {label: rng.normal(mean, 0.3, size=40) for label, mean in (("odpo", 0.5), ("base", 0.1), ("dpo", 0.3))}
    mean = {label: float(v.mean()) for label, v in items.items()}
    first = [CurvePoint("odpo", 0.5, mean["odpo"]), CurvePoint("far", 9.0, 0.0)]
    second = [CurvePoint("base", 0.0, mean["base"]), CurvePoint("dpo", 2.0, mean["dpo"])]
    c = compare_curves(first, second, ("odpo", "dpo"), {**items, "far": items["odpo"]}, n_boot=500)
    point, far = c.points
    at_kl = 0.75 * items["base"] + 0.25 * items["dpo"]
    expected = paired_difference(items["odpo"], at_kl, n_boot=500)
    assert point.other_reward == pytest.approx(float(at_kl.mean()))
    assert (point.difference, point.difference_low, point.difference_high) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert point.difference == pytest.approx(point.reward - point.other_reward)
    assert point.difference_low < point.difference < point.difference_high
    assert far.difference is None  # outside the second curve's range
    assert compare_curves(first, second, ("odpo", "dpo")).points[0].difference is None  # no per-prompt rewards
    text = markdown_summary(EvalResult("t", ["base"], {}, {}, curve_comparisons=[{"prompt_set": "rtp", **c.as_dict()}]))
    assert f"{point.difference:+.3f} [{point.difference_low:+.3f}, {point.difference_high:+.3f}]" in text
