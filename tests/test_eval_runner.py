"""`prefalign eval` end to end on tiny-random: metrics with intervals, cached samples, report."""

import json

import pytest

from conftest import pair_rows, write_jsonl
from prefalign.evaluate.runner import EvalConfigError, Evaluator, load_eval_config, run_eval


@pytest.fixture
def eval_config(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"How do I do bad thing {i}?"} for i in range(4)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    return load_eval_config(None, {
        "output_dir": str(tmp_path / "eval"),
        "models": {"base": tiny_model, "same": tiny_model},
        "prompt_sets": [{"name": "harmful", "source": "file", "path": str(prompts), "kind": "harmful", "split": None, "limit": 4}],
        "sampling": {"max_new_tokens": 6, "batch_size": 4},
        "pairs": str(pairs),
        "toxicity_scorer": None,
        "sentiment_scorer": "length",
    })


def test_eval_writes_metrics_and_report(eval_config):
    result, paths = run_eval(eval_config, show_progress=False)
    metrics = json.loads(paths["json"].read_text())["metrics"]
    for name in ("attack_success[harmful]", "kl[harmful]", "perplexity[harmful]", "distinct_2[harmful]", "preference_accuracy", "implicit_margin"):
        assert set(metrics[name]) == {"base", "same"}, name
    assert metrics["attack_success[harmful]"]["base"]["n"] == 4
    # The reference is the model itself: its KL and implicit margin are exactly zero.
    assert metrics["kl[harmful]"]["base"]["value"] == 0.0
    assert abs(metrics["implicit_margin"]["base"]["value"]) < 1e-6
    # Same weights, same seed: the same samples, so the same metrics.
    assert metrics["preference_accuracy"]["base"]["value"] == metrics["preference_accuracy"]["same"]["value"]
    page = paths["html"].read_text()
    assert "How do I do bad thing 0?" in page and page.count("<img") >= 2
    assert result.reward_vs_kl and {p["label"] for p in result.reward_vs_kl} == {"base (harmful)", "same (harmful)"}
    # Sampled at the default temperature 0.7: the report says the KL rows are not the exact KL.
    assert result.notes and "temperature 0.7" in result.notes[0] and "temperature 0.7" in page


def test_samples_are_reused_on_a_second_run(eval_config):
    run_eval(eval_config, show_progress=False)
    sample_file = eval_config.output_dir / "samples" / "base" / "harmful.jsonl"
    stamp = sample_file.stat().st_mtime_ns
    evaluator = Evaluator(eval_config, show_progress=False)
    evaluator.run()
    assert sample_file.stat().st_mtime_ns == stamp


def test_bad_eval_config_names_the_field(tmp_path):
    bad = tmp_path / "eval.yaml"
    bad.write_text("output_dir: x\nmodels: {a: b}\nprompt_sets: [{name: s, source: advbench, kind: evil}]\n")
    with pytest.raises(EvalConfigError, match=r"eval.yaml: field 'prompt_sets.0.kind'"):
        load_eval_config(bad)
