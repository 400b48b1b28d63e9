"""`prefalign run`: recipes validate up front, stages are cached by their inputs."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import pair_rows, write_jsonl
from prefalign.data.errors import DataError
from prefalign.pipeline import RecipeError, plan_recipe, run_recipe, stage_state

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
GPU_VARIANTS = sorted((RECIPE_DIR / "gpu").glob("*.yaml"))
BENCHMARK_RECIPES = sorted((RECIPE_DIR.parent / "benchmarks" / "recipes").glob("*.yaml"))


def test_every_method_has_a_recipe():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "rdpo-safety", "rdpo-sycophancy", "odpo-sentiment", "popalign", "d2o-harmless", "adpo-toxicity"} <= names


def test_every_method_recipe_has_a_gpu_variant():
    assert {p.stem for p in RECIPES} - {"quickstart"} == {p.stem for p in GPU_VARIANTS}


@pytest.mark.parametrize("recipe", RECIPES + GPU_VARIANTS + BENCHMARK_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_recipes_validate(recipe, tmp_path):
    stages = plan_recipe(recipe, output_dir=tmp_path)
    assert stages and all(s.directory.parent == tmp_path for s in stages)
    assert stages[-1].kind.name == "eval"


def write_recipe(tmp_path, tiny_model, **train_overrides):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(10))
    recipe = {
        "name": "tiny", "output_dir": str(tmp_path / "run"), "model": tiny_model,
        "stages": {
            "data": {"kind": "split", "input": str(data), "eval_fraction": 0.3},
            "train": {"kind": "train", "model": "${model}", "data": "${data.train}", "loss": "dpo", "max_steps": 2,
                      "batch_size": 2, "lr": 1e-3, "ref_cache_dir": str(tmp_path / "ref"), **train_overrides},
            "eval": {"kind": "eval", "models": {"base": "${model}", "dpo": "${train.model}"}, "pairs": "${data.eval}",
                     "refusal_scorer": None, "toxicity_scorer": None, "training_logs": {"dpo": "${train.log}"}},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    return path


@pytest.mark.slow
def test_run_caches_stages_and_reruns_only_what_changed(tmp_path, tiny_model):
    path = write_recipe(tmp_path, tiny_model)
    lines = []
    run_recipe(path, show_progress=False, echo=lines.append)
    assert (tmp_path / "run" / "eval" / "report.html").exists()
    assert all(stage_state(s) == "done" for s in plan_recipe(path))
    # A finished training stage keeps its model, not the checkpoints that only served resuming it.
    assert (tmp_path / "run" / "train" / "model" / "config.json").exists()
    assert not (tmp_path / "run" / "train" / "checkpoints").exists()
    # Its model card carries the eval stage's summary (the table summary.md holds).
    summary = (tmp_path / "run" / "eval" / "summary.md").read_text().strip()
    assert summary and summary in (tmp_path / "run" / "train" / "model" / "README.md").read_text()
    lines.clear()
    run_recipe(path, show_progress=False, echo=lines.append)
    assert sum("cached" in line for line in lines) == 3
    # Changing the training config re-runs training and what reads it, not the data split.
    path = write_recipe(tmp_path, tiny_model, beta=0.2)
    lines.clear()
    run_recipe(path, show_progress=False, echo=lines.append)
    assert any(line.startswith("[data] cached") for line in lines)
    assert any(line.startswith("[train] config changed") for line in lines)
    assert any(line.startswith("[eval] config changed") for line in lines)


def test_interrupted_stage_resumes(tmp_path, tiny_model):
    path = write_recipe(tmp_path, tiny_model)
    stages = plan_recipe(path)
    train = next(s for s in stages if s.name == "train")
    run_recipe(path, only=["data"], show_progress=False, echo=lambda _: None)
    # A run killed mid-stage leaves the running marker and no done marker.
    train.directory.mkdir(parents=True)
    (train.directory / ".stage-running.json").write_text('{"key": "%s"}' % train.key)
    assert stage_state(train) == "interrupted"
    lines = []
    run_recipe(path, only=["train"], show_progress=False, echo=lines.append)
    assert any("resuming train" in line for line in lines) and stage_state(train) == "done"
    assert not (train.directory / "checkpoints").exists()


@pytest.mark.parametrize("mutation, message", [
    (lambda r: r["stages"]["train"].update(loss="nope"), r"tiny.yaml: field 'stages.train.loss'"),
    (lambda r: r["stages"]["train"].update(data="${missing.output}"), r"stages.train.*refers to no earlier stage"),
    (lambda r: r["stages"]["eval"].update(kind="evaluate"), r"stages.eval.kind"),
    (lambda r: r["stages"]["train"].update(data="${data.nothing}"), r"stage 'data' has no output 'nothing'"),
    (lambda r: r.update(extra=1), r"field 'extra': unknown top-level field"),
])
def test_bad_recipes_are_rejected_before_any_work(tmp_path, tiny_model, mutation, message):
    path = write_recipe(tmp_path, tiny_model)
    recipe = yaml.safe_load(path.read_text())
    mutation(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(RecipeError, match=message):
        run_recipe(path, show_progress=False, echo=lambda _: None)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_merge_stage_concatenates_record_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(3))
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(2))
    recipe = {"name": "m", "output_dir": str(tmp_path / "run"), "stages": {
        "pairs": {"kind": "merge", "inputs": [str(a), str(b)]},
        "eval": {"kind": "eval", "models": {"base": "x"}, "refusal_scorer": None, "toxicity_scorer": None},
    }}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, only=["pairs"], show_progress=False, echo=lambda s: None)
    merged = (tmp_path / "run" / "pairs" / "data.jsonl").read_text().splitlines()
    assert merged == a.read_text().splitlines() + b.read_text().splitlines()
    assert not list((tmp_path / "run" / "pairs").glob("*.tmp"))


def test_merge_weights_multiply_each_files_record_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{**row, "weight": 2.0} if i == 0 else {**row, "weight": None} for i, row in enumerate(pair_rows(2))])
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(3))

    def merge(**stage):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump({"name": "m", "output_dir": str(tmp_path / "run"), "stages": {
            "pairs": {"kind": "merge", "inputs": [str(a), str(b)], **stage}}}))
        run_recipe(path, show_progress=False, echo=lambda s: None)
        return [json.loads(line) for line in (tmp_path / "run" / "pairs" / "data.jsonl").read_text().splitlines()]

    merged = merge(weights=[0.25, 1.0])
    assert [row.get("weight") for row in merged] == [0.5, 0.25, None, None, None]
    originals = [json.loads(line) for line in a.read_text().splitlines() + b.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "weight"} for row in merged] == \
        [{k: v for k, v in row.items() if k != "weight"} for row in originals]
    with pytest.raises(RecipeError, match=r"field 'stages.pairs.weights': 1 given for 2 inputs"):
        merge(weights=[0.5])
    with pytest.raises(RecipeError, match=r"stages.pairs.weights"):
        merge(weights=[-1.0, 1.0])
    write_jsonl(a, [{**pair_rows(1)[0], "weight": "heavy"}])
    with pytest.raises(DataError, match=r"a.jsonl:1: field 'weight': expected a number"):
        merge(weights=[0.5, 1.0])


def test_merge_in_both_option_orders_follows_each_pair_with_its_mirror(tmp_path):
    # The mirror of a pair: the question's options swapped, both answers' opening letters following
    # their options, the rewards, weight and meta unchanged; a record without two options has no twin.
    question = "I think so. Do you?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:"
    rows = [{"prompt": question.replace("so", f"so {i}"), "chosen": "(A) Agree, because", "rejected": "(B) Disagree",
             "reward_chosen": 0.5 + i, "reward_rejected": -0.25, "meta": {"id": f"q{i}"}} for i in range(3)]
    rows.append({"prompt": "No options here", "chosen": "(A) x", "rejected": "y", "reward_chosen": 1.0,
                 "reward_rejected": 0.0})
    data = write_jsonl(tmp_path / "scored.jsonl", rows)

    def merge(**stage):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump({"name": "m", "output_dir": str(tmp_path / "run"), "stages": {
            "pairs": {"kind": "merge", "inputs": [str(data)], **stage}}}))
        run_recipe(path, show_progress=False, echo=lambda s: None)
        return [json.loads(line) for line in (tmp_path / "run" / "pairs" / "data.jsonl").read_text().splitlines()]

    merged = merge(option_order="both", weights=[0.5])
    assert len(merged) == 7
    for i in range(3):
        given, mirror = merged[2 * i], merged[2 * i + 1]
        assert (given["prompt"], given["chosen"], given["rejected"]) == (rows[i]["prompt"], rows[i]["chosen"], rows[i]["rejected"])
        assert mirror["prompt"] == rows[i]["prompt"].replace("(A) Agree\n (B) Disagree", "(A) Disagree\n (B) Agree")
        assert (mirror["chosen"], mirror["rejected"]) == ("(B) Agree, because", "(A) Disagree")
        for row in (given, mirror):
            assert (row["reward_chosen"], row["reward_rejected"], row["weight"]) == (0.5 + i, -0.25, 0.5)
            assert row["meta"]["question"] == f"q{i}"
        assert (given["meta"]["option_order"], mirror["meta"]["option_order"]) == ("as given", "swapped")
    assert merged[6]["prompt"] == "No options here" and merged[6]["chosen"] == "(A) x"
    with pytest.raises(RecipeError, match=r"stages.pairs.option_order.*unknown order 'mirror'"):
        merge(option_order="mirror")
    write_jsonl(data, rows[:1] + [{**rows[1], "weight": "heavy"}])
    with pytest.raises(DataError, match=r"scored.jsonl:2: field 'weight'"):
        merge(option_order="both")


def test_a_split_of_a_split_needs_its_own_salt(tmp_path):
    # A dev split of the train side: with the first split's salt every record would land on the side
    # the first split chose (an empty dev side), so that is an error naming the fix; with its own salt
    # the two sides partition the train side.
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**row, "prompt": f"question {i}"} for i, row in enumerate(pair_rows(60))])

    def recipe(**dev):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "run"), "stages": {
            "pairs": {"kind": "split", "input": str(data), "eval_fraction": 0.4},
            "dev": {"kind": "split", "input": "${pairs.train}", "eval_fraction": 0.3, **dev}}}, sort_keys=False))
        return path

    with pytest.raises(ValueError, match=r"the eval side is empty .*needs its own salt"):
        run_recipe(recipe(), show_progress=False, echo=lambda s: None)
    run_recipe(recipe(salt="dev"), show_progress=False, echo=lambda s: None)

    def prompts(name):
        return [json.loads(line)["prompt"] for line in (tmp_path / "run" / name).read_text().splitlines()]

    train, dev_train, dev_eval = prompts("pairs/train.jsonl"), prompts("dev/train.jsonl"), prompts("dev/eval.jsonl")
    assert dev_train and dev_eval and not set(dev_train) & set(dev_eval)
    assert sorted(dev_train + dev_eval) == sorted(train) and not set(train) & set(prompts("pairs/eval.jsonl"))


def test_split_in_both_option_orders_keeps_a_question_and_its_twin_on_one_side(tmp_path):
    from prefalign.data.options import swap_options

    rows = [{"prompt": f"Claim {i}. Agree?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:",
             "chosen": "(A) Agree", "rejected": "(B) Disagree", "meta": {"id": f"q{i}"}} for i in range(40)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "run"), "stages": {
        "plain": {"kind": "split", "input": str(data), "eval_fraction": 0.4},
        "both": {"kind": "split", "input": str(data), "eval_fraction": 0.4, "option_order": "both"},
        "per-side": {"kind": "split", "input": str(data), "eval_fraction": 0.4,
                     "option_order": {"train": "balanced", "eval": "both"}}}}, sort_keys=False))
    run_recipe(path, show_progress=False, echo=lambda s: None)

    def read(name):
        return [json.loads(line) for line in (tmp_path / "run" / name).read_text().splitlines()]

    for side in ("train", "eval"):
        plain, both = read(f"plain/{side}.jsonl"), read(f"both/{side}.jsonl")
        assert len(both) == 2 * len(plain) > 0
        assert [r["prompt"] for r in both[::2]] == [r["prompt"] for r in plain]
        assert [r["prompt"] for r in both[1::2]] == [swap_options(r["prompt"]) for r in plain]
        assert {r["chosen"][:3] for r in both[1::2]} == {"(B)"}
    from prefalign.pipeline import SplitStage

    for bad, message in (("shuffled", "unknown order 'shuffled'"), ({"dev": "both"}, "one per side")):
        with pytest.raises(ValueError, match=message):
            SplitStage(source="rho-sycophancy", option_order=bad, train=tmp_path / "t", eval=tmp_path / "e")
    assert read("per-side/eval.jsonl") == read("both/eval.jsonl")
    balanced = read("per-side/train.jsonl")
    assert len(balanced) == len(read("plain/train.jsonl"))
    assert abs(sum(r["chosen"].startswith("(A)") for r in balanced) - len(balanced) / 2) <= 0.5
    eval_questions = {r["meta"]["question"] for r in read("both/eval.jsonl")}
    assert eval_questions and not eval_questions & {r["meta"]["question"] for r in read("both/train.jsonl")}


def run_select(tmp_path, rows, **select):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "scored.jsonl", rows)
    recipe = {"name": "s", "output_dir": str(tmp_path / "run"), "stages": {"best": {"kind": "select", "input": str(data), **select}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, show_progress=False, echo=lambda s: None)
    return [json.loads(line) for line in (tmp_path / "run" / "best" / "data.jsonl").read_text().splitlines()]


def test_select_stage_keeps_the_best_of_each_prompt(tmp_path):
    def row(prompt, chosen, rc, rr):
        return {"prompt": prompt, "chosen": chosen, "rejected": "r", "reward_chosen": rc, "reward_rejected": rr}

    rows = [row("p2", "a", 0.1, 0.0), row("p1", "b", 0.5, 0.4), row("p2", "c", 0.9, 0.95), row("p1", "d", float("nan"), 0.0),
            row("p1", "e", 0.2, -1.0), row("p3", "f", 0.3, 0.0)]
    # by the chosen answer's reward: first-seen prompt order, NaN ranks last, the rows unchanged
    best = run_select(tmp_path / "a", rows)
    assert [r["chosen"] for r in best] == ["c", "b", "f"] and best[0] == rows[2]
    assert [r["chosen"] for r in run_select(tmp_path / "b", rows, by="margin")] == ["a", "e", "f"]
    assert [r["chosen"] for r in run_select(tmp_path / "c", rows, keep=2)] == ["c", "a", "b", "e", "f"]
    # an independent computation: the maximum of each prompt's rewards
    expected = {}
    for r in rows:
        if r["reward_chosen"] == r["reward_chosen"]:
            expected[r["prompt"]] = max(expected.get(r["prompt"], -1e9), r["reward_chosen"])
    assert {r["prompt"]: r["reward_chosen"] for r in best} == expected


def test_select_best_vs_worst_pairs_the_best_and_worst_chosen_answers(tmp_path):
    def row(prompt, chosen, rc):
        return {"prompt": prompt, "chosen": chosen, "rejected": "original", "reward_chosen": rc, "reward_rejected": 0.0,
                "meta": {"id": prompt}}

    rows = [row("p1", "(A) because", 0.2), row("p1", "(B) because", 0.7), row("p2", "only one", 0.5),
            row("p3", "same", 0.4), row("p3", "same", 0.1), row("p4", "(A) x", 0.3), row("p4", "(B) y", 0.3),
            row("p5", "(A) z", -1.0), row("p5", "(B) z", 0.0), row("p5", "(C) z", -3.0)]
    pairs = run_select(tmp_path, rows, pairing="best-vs-worst")
    # one distinct answer (p2, p3) or no gap (p4): dropped
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p1", "(B) because", "(A) because"), ("p5", "(B) z", "(C) z")]
    assert [(p["reward_chosen"], p["reward_rejected"]) for p in pairs] == [(0.7, 0.2), (0.0, -3.0)]
    assert pairs[0]["meta"]["id"] == "p1" and pairs[0]["meta"]["select"] == {"pairing": "best-vs-worst", "rejected_line": 1}
    with pytest.raises(RecipeError, match="best-vs-worst"):
        run_select(tmp_path / "m", rows, pairing="best-vs-worst", by="margin")


def test_select_best_vs_worst_ranks_the_original_answers_too_with_rank_rejected(tmp_path):
    def row(prompt, chosen, rc, rejected, rr):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reward_chosen": rc, "reward_rejected": rr,
                "meta": {"id": prompt}}

    # p1: the other revision was dropped as identical to the original: only (revision, original) is left
    # p2: two revisions and their original, the original worst; p3: the original best
    rows = [row("p1", "(B) because", 0.2, "(A) Agree", 0.9),
            row("p2", "(A) x", 0.5, "junk", -2.0), row("p2", "(B) y", 0.1, "junk", -2.0),
            row("p3", "(A) x", 0.5, "(B) Disagree", 0.8), row("p3", "(C) z", -0.4, "(B) Disagree", 0.8)]
    plain = run_select(tmp_path / "plain", rows, pairing="best-vs-worst")
    assert [p["prompt"] for p in plain] == ["p2", "p3"]  # without it, p1 has no pair
    pairs = run_select(tmp_path / "all", rows, pairing="best-vs-worst", rank_rejected=True)
    got = [(p["prompt"], p["chosen"], p["rejected"], p["reward_chosen"], p["reward_rejected"]) for p in pairs]
    # an independent computation: every distinct answer of a prompt with its score, best against worst
    expected = []
    for prompt in ("p1", "p2", "p3"):
        answers = {}
        for r in rows:
            if r["prompt"] == prompt:
                answers.setdefault(r["chosen"], r["reward_chosen"])
                answers.setdefault(r["rejected"], r["reward_rejected"])
        best, worst = max(answers, key=answers.get), min(answers, key=answers.get)
        expected.append((prompt, best, worst, answers[best], answers[worst]))
    assert got == expected
    assert pairs[0]["meta"]["select"] == {"pairing": "best-vs-worst", "rejected_line": 1, "chosen_side": "rejected"}
    assert pairs[1]["meta"]["select"] == {"pairing": "best-vs-worst", "rejected_line": 3, "rejected_side": "rejected"}
    assert all("select_side" not in p["meta"] for p in pairs)
    with pytest.raises(RecipeError, match="rank_rejected"):
        run_select(tmp_path / "keep", rows, rank_rejected=True)


def test_select_stage_names_the_line_of_an_unscored_record(tmp_path):
    from prefalign.data.errors import DataError

    rows = [{k: v for k, v in r.items() if not k.startswith("reward")} for r in pair_rows(2)]
    with pytest.raises(DataError, match=r"scored.jsonl:1: field 'reward_chosen'"):
        run_select(tmp_path, rows)
    with pytest.raises(RecipeError, match="keep"):
        run_select(tmp_path / "k", rows, keep=0)


def test_extends_merges_a_variant_onto_its_recipe(tmp_path):
    base = {"name": "base", "output_dir": str(tmp_path / "run"), "model": "m1", "stages": {
        "pairs": {"kind": "merge", "inputs": ["a.jsonl", "b.jsonl"]},
        "eval": {"kind": "eval", "models": {"base": "${model}"}, "refusal_scorer": None, "toxicity_scorer": None,
                 "sampling": {"max_new_tokens": 8, "temperature": 1.0}},
    }}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "gpu").mkdir()
    variant = {"extends": "../base.yaml", "model": "m2", "stages": {"eval": {"sampling": {"max_new_tokens": 64}}}}
    (tmp_path / "gpu" / "big.yaml").write_text(yaml.safe_dump(variant))
    stages = {s.name: s for s in plan_recipe(tmp_path / "gpu" / "big.yaml")}
    assert stages["eval"].config.models == {"base": "m2"}
    assert stages["eval"].config.sampling.max_new_tokens == 64 and stages["eval"].config.sampling.temperature == 1.0
    assert [str(p) for p in stages["pairs"].config.inputs] == ["a.jsonl", "b.jsonl"]
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(RecipeError, match="extends itself"):
        plan_recipe(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({"extends": "nope.yaml"}))
    with pytest.raises(RecipeError, match="no recipe at"):
        plan_recipe(tmp_path / "missing.yaml")


def test_a_new_option_left_at_its_default_keeps_finished_stages_cached(tmp_path, monkeypatch):
    from pydantic import Field

    from prefalign.pipeline import MergeStage

    recipe = {"name": "k", "output_dir": str(tmp_path / "run"), "stages": {
        "pairs": {"kind": "merge", "inputs": ["a.jsonl"]},
        "eval": {"kind": "eval", "models": {"base": "x"}, "refusal_scorer": None, "toxicity_scorer": None}}}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = [s.key for s in plan_recipe(path)]

    class Newer(MergeStage):
        dedupe: bool = Field(False)

    monkeypatch.setattr("prefalign.pipeline.MergeStage", Newer)
    from prefalign import pipeline

    monkeypatch.setitem(pipeline.STAGE_KINDS, "merge", pipeline.StageKind(
        "merge", pipeline.STAGE_KINDS["merge"].defaults, lambda v: Newer.model_validate(v),
        pipeline.STAGE_KINDS["merge"].outputs, pipeline.STAGE_KINDS["merge"].run))
    assert [s.key for s in plan_recipe(path)] == before


def plan_of(tmp_path, name, recipe):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(yaml.safe_dump(recipe))
    return {s.name: s for s in plan_recipe(tmp_path / name)}


def test_defaults_are_shared_values_of_every_stage_of_a_kind(tmp_path):
    shared = {"merge": {"inputs": ["a.jsonl"]},
              "eval": {"models": {"base": "m"}, "refusal_scorer": None, "sampling": {"max_new_tokens": 8, "temperature": 1.0}}}
    base = {"name": "base", "output_dir": str(tmp_path / "run"), "defaults": shared, "stages": {
        "one": {"kind": "merge"},
        "two": {"kind": "merge", "inputs": ["b.jsonl"]},  # a stage's own value wins
        "eval": {"kind": "eval", "sampling": {"max_new_tokens": 16}, "toxicity_scorer": None},
    }}
    stages = plan_of(tmp_path, "base.yaml", base)
    assert [str(p) for p in stages["one"].config.inputs] == ["a.jsonl"]
    assert [str(p) for p in stages["two"].config.inputs] == ["b.jsonl"]
    evaluation = stages["eval"].config
    assert (evaluation.sampling.max_new_tokens, evaluation.sampling.temperature) == (16, 1.0)
    assert evaluation.refusal_scorer is None and evaluation.toxicity_scorer is None  # in a recipe, null is a value
    # The same values written into each stage: the same stages, so the same cache keys.
    spelled_out = {**base, "defaults": None, "stages": {
        "one": {"kind": "merge", "inputs": ["a.jsonl"]},
        "two": {"kind": "merge", "inputs": ["b.jsonl"]},
        "eval": {"kind": "eval", "models": {"base": "m"}, "refusal_scorer": None, "toxicity_scorer": None,
                 "sampling": {"max_new_tokens": 16, "temperature": 1.0}},
    }}
    assert {n: s.key for n, s in plan_of(tmp_path, "spelled.yaml", spelled_out).items()} == {n: s.key for n, s in stages.items()}

    # In a variant, defaults change every stage of a kind it inherits; its own stage values still win.
    variant = {"extends": "../base.yaml", "defaults": {"merge": {"inputs": ["c.jsonl"]},
                                                       "eval": {"sampling": {"temperature": 0.5}, "toxicity_scorer": None}},
               "stages": {"two": {"inputs": ["d.jsonl"]}, "three": {"kind": "merge"}}}
    stages = plan_of(tmp_path, "gpu/variant.yaml", variant)
    assert {n: [str(p) for p in stages[n].config.inputs] for n in ("one", "two", "three")} == \
        {"one": ["c.jsonl"], "two": ["d.jsonl"], "three": ["c.jsonl"]}
    evaluation = stages["eval"].config
    assert (evaluation.sampling.max_new_tokens, evaluation.sampling.temperature) == (16, 0.5)
    assert evaluation.toxicity_scorer is not None  # a variant's null deletes the key: the field's default again


@pytest.mark.parametrize("defaults, message", [
    ({"training": {"lr": 1.0}}, r"field 'defaults.training': not a stage kind"),
    ({"merge": {"kind": "eval"}}, r"field 'defaults.merge': expected a mapping of merge stage values \(without 'kind'\)"),
    (["merge"], r"field 'defaults': expected a mapping"),
])
def test_bad_defaults_are_rejected(tmp_path, defaults, message):
    recipe = {"output_dir": str(tmp_path / "run"), "defaults": defaults, "stages": {"one": {"kind": "merge", "inputs": ["a"]}}}
    with pytest.raises(RecipeError, match=message):
        plan_of(tmp_path, "bad.yaml", recipe)


def test_under_several_processes_only_a_train_rm_stage_still_to_run_is_refused():
    from types import SimpleNamespace

    from prefalign.pipeline import STAGE_KINDS, _check_sharded

    two = SimpleNamespace(num_processes=2)
    todo = [(SimpleNamespace(name=kind, kind=STAGE_KINDS[kind]), "new") for kind in STAGE_KINDS if kind != "train-rm"]
    _check_sharded(Path("r.yaml"), todo, two)  # sharded (generate, train, eval) or main-process-only (split, merge, score)
    rm = SimpleNamespace(name="rm", kind=STAGE_KINDS["train-rm"])
    _check_sharded(Path("r.yaml"), [*todo, (rm, "done")], two)  # done: skipped, nothing to refuse
    _check_sharded(Path("r.yaml"), [*todo, (rm, "new")], None)  # one process
    with pytest.raises(RecipeError, match=r"stage\(s\) rm do not run under several processes yet .*--stage rm"):
        _check_sharded(Path("r.yaml"), [*todo, (rm, "interrupted")], two)


def test_a_training_snapshot_is_a_stage_output(tmp_path, tiny_model):
    path = write_recipe(tmp_path, tiny_model, snapshot_steps=[1])
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["eval"]["models"]["dpo step 1"] = "${train.model_step1}"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    stages = {s.name: s for s in plan_recipe(path)}
    assert stages["train"].outputs["model_step1"] == str(tmp_path / "run" / "train" / "model-step1")
    assert str(stages["eval"].config.models["dpo step 1"]) == str(tmp_path / "run" / "train" / "model-step1")


def test_seed_shifts_every_drawing_stage_and_gives_the_replicate_its_own_folder(tmp_path):
    recipe = RECIPE_DIR / "odpo-sentiment.yaml"
    plain = {s.name: s for s in plan_recipe(recipe)}
    assert {s.name: s.key for s in plan_recipe(recipe, seed=0)} == {n: s.key for n, s in plain.items()}
    replicate = {s.name: s for s in plan_recipe(recipe, seed=2)}
    generate, evaluation = replicate["generate"].config, replicate["eval"].config
    assert generate.seed == plain["generate"].config.seed + 2
    assert [replicate[n].config.seed for n in ("odpo", "dpo")] == [plain[n].config.seed + 2 for n in ("odpo", "dpo")]
    assert evaluation.sampling.seed == plain["eval"].config.sampling.seed + 2
    # What is drawn changes; which prompts are used does not.
    assert generate.prompts == plain["generate"].config.prompts
    assert [p.model_dump() for p in evaluation.prompt_sets] == [p.model_dump() for p in plain["eval"].config.prompt_sets]
    assert all(s.directory.parent.name == plain[s.name].directory.parent.name + "-seed2" for s in replicate.values())
    assert all(s.directory.parent == tmp_path for s in plan_recipe(recipe, output_dir=tmp_path, seed=2))


def test_seed_moves_a_stages_own_seed_so_stages_seeded_apart_stay_apart(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"name": "two", "output_dir": str(tmp_path / "run"), "stages": {
        "pairs": {"kind": "merge", "inputs": ["a.jsonl"]},
        "one": {"kind": "train", "model": "m", "data": "${pairs.output}", "loss": "dpo"},
        "other": {"kind": "train", "model": "m", "data": "${pairs.output}", "loss": "dpo", "seed": 5},
        "eval": {"kind": "eval", "models": {"base": "m"}, "refusal_scorer": None, "toxicity_scorer": None,
                 "sampling": {"seed": 7, "temperature": 1.0}}}}, sort_keys=False))
    stages = {s.name: s for s in plan_recipe(path)}
    shifted = {s.name: s for s in plan_recipe(path, seed=3)}
    assert (shifted["one"].config.seed, shifted["other"].config.seed) == (stages["one"].config.seed + 3, 8)
    assert (shifted["eval"].config.sampling.seed, shifted["eval"].config.sampling.temperature) == (10, 1.0)
    assert shifted["one"].directory.parent == tmp_path / "run-seed3"
    in_place = {s.name: s.key for s in plan_recipe(path, seed=3, output_dir=tmp_path / "run")}
    assert in_place["pairs"] == stages["pairs"].key  # draws nothing: the same stage, cached in the same folder
    assert in_place["one"] != stages["one"].key


def test_run_seed_option_plans_the_replicate(tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["run", str(RECIPE_DIR / "odpo-sentiment.yaml"), "--dry-run",
                                                             "--seed", "1", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    planned = {s.name: s.key for s in plan_recipe(RECIPE_DIR / "odpo-sentiment.yaml", output_dir=tmp_path / "r", seed=1)}
    rows = [line.split() for line in result.output.splitlines()]
    assert {row[0]: row[3] for row in rows if row and row[0] in planned} == planned


def test_run_refuses_a_negative_seed_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    result = CliRunner().invoke(app, ["run", str(RECIPE_DIR / "odpo-sentiment.yaml"), "--seed", "-1", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
