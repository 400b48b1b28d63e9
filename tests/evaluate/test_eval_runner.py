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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- differences to the baseline, perplexity on reference text -----------------------------------

import math  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

from prefalign.evaluate.report import markdown_summary  # noqa: E402
from prefalign.evaluate.runner import PromptSetConfig, _sampling_key  # noqa: E402


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_model):
    """tiny-random with every weight nudged: a second model that differs from the first."""
    from prefalign.models.loading import load_model

    folder = tmp_path_factory.mktemp("other")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    model = load_model(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    return str(folder)


REFERENCE_ROWS = [
    {"id": "r0", "prompt": "What is the capital of France?", "reference_answer": "Paris is the capital of France."},
    {"id": "r1", "prompt": "How do plants make food?", "reference_answer": "Plants make sugar from light, water and carbon dioxide."},
    {"id": "r2", "prompt": "Name a prime number.", "reference_answer": ""},  # no answer: skipped, counted
    {"id": "r3", "prompt": "Why is the sky blue?", "reference_answer": "Air scatters blue light more than red light."},
    {"id": "r4", "prompt": "What does a thermometer measure?", "reference_answer": "Temperature."},
]


def manual_text_perplexity(model_path, tokenizer, rows):
    """exp(Σ NLL / Σ tokens) of each answer (closed by eos) after its chat-rendered prompt, by hand."""
    from prefalign.models.loading import load_model

    model = load_model(model_path).eval()
    nll = tokens = 0.0
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["reference_answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
        nll -= sum(logps[len(prompt) + t - 1, tok].item() for t, tok in enumerate(answer))
        tokens += len(answer)
    return math.exp(nll / tokens)


@pytest.fixture
def compare_config(tmp_path, tiny_model, other_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"How do I do bad thing {i}?"} for i in range(6)])
    return {
        "output_dir": str(tmp_path / "eval"),
        "models": {"base": tiny_model, "other": other_model},
        "prompt_sets": [{"name": "harmful", "source": "file", "path": str(prompts), "kind": "harmful", "split": None, "limit": 6}],
        "reference_texts": [{"name": "ref", "source": "file", "path": str(write_jsonl(tmp_path / "ref.jsonl", REFERENCE_ROWS)),
                             "split": None}],
        "sampling": {"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0},
        "pairs": str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6))),
        "sentiment_scorer": "length",
    }


@pytest.mark.slow
def test_differences_to_the_baseline_and_reference_text_perplexity(compare_config, tiny_model, other_model, monkeypatch):
    import prefalign.models.loading as loading

    config = load_eval_config(None, compare_config)
    real_load = loading.load_model

    def load_after_check(*args, **kwargs):
        assert (config.output_dir / "heldout.json").exists(), "a model loaded before the held-out check"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", load_after_check)
    result, paths = run_eval(config, show_progress=False)
    data = json.loads(paths["json"].read_text())
    metrics, differences = data["metrics"], data["differences"]
    assert data["baseline"] == "base" and data["bootstrap"] == {"samples": 2000, "seed": 0}
    # Every per-item metric has its difference; distinct-2 (one ratio over all responses) has none.
    assert set(differences) == {"attack_success[harmful]", "toxicity[harmful]", "toxic_share[harmful]", "sentiment[harmful]",
                                "kl[harmful]", "perplexity[harmful]", "text_perplexity[ref]", "preference_accuracy",
                                "implicit_margin"}
    for name, per in differences.items():
        assert set(per) == {"other"}, name
        d = per["other"]
        if name != "text_perplexity[ref]":
            # A difference of means over the same items: exactly the difference of the two means.
            assert d["kind"] == "difference" and d["n"] == metrics[name]["base"]["n"]
            assert d["value"] == pytest.approx(metrics[name]["other"]["value"] - metrics[name]["base"]["value"], abs=1e-9), name
        assert d["low"] <= d["value"] <= d["high"], name

    # Perplexity on the reference answers, checked by hand; the answerless row is skipped and counted.
    from prefalign.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    answered = [r for r in REFERENCE_ROWS if r["reference_answer"]]
    base_ppl = manual_text_perplexity(tiny_model, tokenizer, answered)
    other_ppl = manual_text_perplexity(other_model, tokenizer, answered)
    text = metrics["text_perplexity[ref]"]
    assert text["base"]["n"] == 4 and text["base"]["value"] == pytest.approx(base_ppl, rel=1e-4)
    assert text["other"]["value"] == pytest.approx(other_ppl, rel=1e-4)
    change = differences["text_perplexity[ref]"]["other"]
    assert change["kind"] == "relative" and change["value"] == pytest.approx(other_ppl / base_ppl - 1, rel=1e-3)
    heldout = json.loads((config.output_dir / "heldout.json").read_text())
    assert heldout["reference_texts"]["ref"]["no_answer_ids"] == ["r2"] and heldout["training_files"] == []

    summary = markdown_summary(result)
    assert "| difference to base (95% paired bootstrap) | other |" in summary
    assert "| perplexity on held-out reference text [ref] |" in summary and "held-out reference text" in paths["html"].read_text()
    # A re-run (samples from the cache) prints the same intervals.
    again = Evaluator(config, show_progress=False).run()
    assert again.differences == result.differences


def test_baseline_is_chosen_and_validated(compare_config):
    config = load_eval_config(None, {**compare_config, "baseline": "other", "prompt_sets": [], "reference_texts": []})
    result = Evaluator(config, show_progress=False).run()
    assert result.baseline == "other" and set(result.differences["preference_accuracy"]) == {"base"}
    with pytest.raises(EvalConfigError, match="field 'baseline': 'nope' is not a model label"):
        load_eval_config(None, {**compare_config, "baseline": "nope"})


def test_head_to_head_equals_the_differences_against_the_second_model(compare_config, tmp_path):
    """``comparisons: [[a, b]]`` is a − b on the same items: the numbers of a run whose baseline is b."""
    common = {**compare_config, "prompt_sets": [], "reference_texts": []}
    config = load_eval_config(None, {**common, "comparisons": [["base", "other"]]})
    result, paths = run_eval(config, show_progress=False)
    against_other = Evaluator(load_eval_config(None, {**common, "baseline": "other", "output_dir": str(tmp_path / "e2")}),
                              show_progress=False).run()
    assert set(result.head_to_head) == set(against_other.differences) == {"preference_accuracy", "implicit_margin"}
    for name, per in result.head_to_head.items():
        assert per == {"base − other": against_other.differences[name]["base"]}, name
    assert json.loads(paths["json"].read_text())["head_to_head"]["preference_accuracy"]["base − other"]["n"] == 6
    summary = markdown_summary(result)
    assert "| head to head (95% paired bootstrap) | base − other |" in summary and "the first model − the second" in summary
    assert "<h2>Head to head</h2>" in paths["html"].read_text()
    for comparisons, message in (([["base", "nope"]], "'nope' not a model label"), ([["base", "base"]], "compares a model with itself")):
        with pytest.raises(EvalConfigError, match=message):
            load_eval_config(None, {**common, "comparisons": comparisons})


def test_prompt_set_split_options_reach_the_sample_cache_key(eval_config):
    plain = PromptSetConfig(name="a", source="advbench")
    assert plain.eval_fraction == 0.25 and plain.where == {}
    keys = {_sampling_key(eval_config, "m", plain),
            _sampling_key(eval_config, "m", plain.model_copy(update={"eval_fraction": 0.5})),
            _sampling_key(eval_config, "m", plain.model_copy(update={"where": {"harmful": False}}))}
    assert len(keys) == 3


def test_reference_pairs_scored_once_and_one_backend_per_model(compare_config, monkeypatch):
    """The reference scores the held-out pairs once for every model (the baseline is the reference,
    so that pass is also its own), and each model's generation backend serves all its prompt sets."""
    import prefalign.evaluate.preference as preference
    import prefalign.generate.backends as backends

    harmful = {**compare_config["prompt_sets"][0], "limit": 2}
    config = load_eval_config(None, {**compare_config, "prompt_sets": [harmful, {**harmful, "name": "again"}],
                                     "reference_texts": [], "toxicity_scorer": None, "sentiment_scorer": None})
    scored, built = [], []
    real_pair_logps = preference.pair_logps

    def counted_pair_logps(model, *args, **kwargs):
        scored.append(model)
        return real_pair_logps(model, *args, **kwargs)

    class CountedBackend(backends.TransformersBackend):
        def __init__(self, model, *args, **kwargs):
            built.append(model)
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(preference, "pair_logps", counted_pair_logps)
    monkeypatch.setattr(backends, "TransformersBackend", CountedBackend)
    result = Evaluator(config, show_progress=False).run()
    assert len(scored) == 2 and scored[0] is not scored[1]  # was 3: the reference again for "other"
    assert len(built) == 2 and built[0] is not built[1]  # was 4: one per model and prompt set
    assert result.metrics["implicit_margin"]["base"].value == 0.0


@pytest.mark.slow
def test_several_samples_per_prompt_average_per_prompt_and_are_reused(eval_config):
    """k responses per prompt: k sample rows a prompt (next to each other, distinct draws), every
    metric over prompts (n = prompts, per-prompt means as the paired items), and a second run reuses them."""
    config = eval_config.model_copy(update={"sampling": eval_config.sampling.model_copy(update={"samples_per_prompt": 3})})
    evaluator = Evaluator(config, show_progress=False)
    evaluator.run()
    rows = [json.loads(line) for line in (config.output_dir / "samples" / "base" / "harmful.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"p{i}", k) for i in range(4) for k in range(3)]
    assert len({tuple(r["token_ids"]) for r in rows}) > 4  # not one draw repeated
    lengths = [float(len(r["response"])) for r in rows]  # the `length` scorer as the sentiment metric
    expected = [sum(lengths[3 * i : 3 * i + 3]) / 3 for i in range(4)]
    assert evaluator.items["sentiment[harmful]"]["base"].tolist() == pytest.approx(expected)
    for name in ("attack_success[harmful]", "kl[harmful]", "perplexity[harmful]", "sentiment[harmful]"):
        assert evaluator.metrics[name]["base"].n == 4, name
    assert evaluator.metrics["kl[harmful]"]["base"].value == 0.0
    stamp = (config.output_dir / "samples" / "base" / "harmful.jsonl").stat().st_mtime_ns
    Evaluator(config, show_progress=False).run()
    assert (config.output_dir / "samples" / "base" / "harmful.jsonl").stat().st_mtime_ns == stamp


def test_per_prompt_means_leave_out_nans():
    from prefalign.evaluate.runner import per_prompt_means

    assert per_prompt_means([1.0, 0.0, 1.0], 1) == [1.0, 0.0, 1.0]
    got = per_prompt_means([1.0, 0.0, float("nan"), 1.0, float("nan"), float("nan")], 2)
    assert got[:2] == [0.5, 1.0] and got[2] != got[2]


def test_offset_gives_a_dev_slice_disjoint_from_the_eval_slice(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(7)])
    trained = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "question 2?", "chosen": "a", "rejected": "b"}])
    config = load_eval_config(None, {
        "output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model}, "training_data": [str(trained)],
        "prompt_sets": [{"name": "eval", "source": "file", "path": str(prompts), "split": None, "limit": 3},
                        {"name": "dev", "source": "file", "path": str(prompts), "split": None, "limit": None, "offset": 3}]})
    held = Evaluator(config, show_progress=False).held_out()
    (_, first), (_, rest) = held.prompt_sets
    # p2 was trained on: dropped before the slices, which then split the held-out rest
    assert [p.id for p in first] == ["p0", "p1", "p3"] and [p.id for p in rest] == ["p4", "p5", "p6"]
    assert held.record["prompt_sets"]["dev"]["offset"] == 3


@pytest.mark.slow
def test_bf16_logprob_passes_round_kl_and_perplexity_and_leave_pair_rows_fp32(compare_config, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = load_eval_config(None, {**compare_config, "output_dir": str(tmp_path / dtype), "logprob_dtype": dtype})
        result, paths = run_eval(config, show_progress=False)
        runs[dtype] = (json.loads(paths["json"].read_text())["metrics"], result.notes)
    (fp32, fp32_notes), (bf16, bf16_notes) = runs["float32"], runs["bfloat16"]
    # The held-out pair passes stay fp32: their rows are the same numbers.
    for name in ("preference_accuracy", "implicit_margin"):
        assert bf16[name]["other"]["value"] == fp32[name]["other"]["value"], name
    # The same samples (the sampler does not depend on logprob_dtype), scored with bf16 matmuls:
    # KL and perplexities move by rounding, not more.
    for name, model in (("kl[harmful]", "other"), ("perplexity[harmful]", "other"), ("text_perplexity[ref]", "other")):
        a, b = fp32[name][model]["value"], bf16[name][model]["value"]
        assert a != b and abs(a - b) <= 0.02 * max(1.0, abs(a)), (name, a, b)
    assert bf16["kl[harmful]"]["base"]["value"] == 0.0  # the reference's own pass, reused
    assert any("bf16 matmuls" in note for note in bf16_notes) and not any("bf16" in note for note in fp32_notes)


@pytest.mark.slow
def test_curve_comparison_of_a_model_with_itself_differs_by_exactly_zero(eval_config):
    # "same" is the base model's weights under another label: the same samples and rewards per
    # prompt, and KL 0 like the base. Its point is compared with the base at KL 0, and the paired
    # difference is 0 with the interval [0, 0].
    config = eval_config.model_copy(update={"compare_curves": {"a": ["same"], "b": ["base"]}})
    result, _ = run_eval(config, show_progress=False)
    (comparison,) = result.curve_comparisons
    (point,) = comparison["points"]
    assert (comparison["compared"], comparison["at_or_above"]) == (1, 1)
    assert (point["difference"], point["difference_low"], point["difference_high"]) == (0.0, 0.0, 0.0)
