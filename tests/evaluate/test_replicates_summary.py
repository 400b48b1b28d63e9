"""benchmarks/replicates.py: totals over replicates' curve comparisons equal a count done apart."""

import json

import pytest
from conftest import load_benchmark


def load_script():
    return load_benchmark("replicates")


def point(label, difference, low, high):
    return {"label": label, "kl": 1.0, "reward": 0.5, "other_reward": 0.5 - (difference or 0),
            "at_or_above": None if difference is None else difference >= 0,
            "difference": difference, "difference_low": low, "difference_high": high}


def run_metrics(points):
    return {"baseline": "base", "metrics": {"r": {"base": {"value": 0.1}}},
            "differences": {"r": {"m": {"value": 0.2, "low": 0.1, "high": 0.3, "n": 10}}},
            "curve_comparisons": [{"prompt_set": "p", "first": "a", "second": "b", "points": points,
                                   "compared": sum(p["difference"] is not None for p in points),
                                   "at_or_above": sum(bool(p["at_or_above"]) for p in points)}]}


def test_totals_count_points_by_where_their_interval_lies(tmp_path, capsys):
    runs = [
        [point("a1", 0.05, 0.01, 0.09), point("a2", 0.0, -0.05, 0.05), point("a3", None, None, None)],
        [point("a1", -0.06, -0.11, -0.01), point("a2", 0.02, -0.01, 0.05), point("a3", 0.1, 0.05, 0.15)],
    ]
    folders = []
    for i, points in enumerate(runs):
        folder = tmp_path / f"run{i}" / "eval"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(run_metrics(points)))
        folders.append(folder)
    script = load_script()
    totals = script.comparison_totals([run_metrics(p) for p in runs])
    compared = [p for points in runs for p in points if p["difference"] is not None]
    assert totals == {"draws": 2, "compared": len(compared), "not_compared": 1,
                      "at_or_above": sum(p["difference"] >= 0 for p in compared),
                      "above": sum(p["difference_low"] > 0 for p in compared),
                      "below": sum(p["difference_high"] < 0 for p in compared)}
    script.main([str(f) for f in folders] + ["--metric", "r"])
    out = capsys.readouterr().out
    assert "4 of 5 compared points at or above (2 with the interval above 0), 1 with the interval below 0" in out
    assert out.count("outside b's KL range") == 1


def test_a_folder_without_metrics_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.json"):
        load_script().main([str(tmp_path)])
