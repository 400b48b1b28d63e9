"""The ``score`` stage of a recipe (``prefalign run``): it writes every record with its rewards,
keeps the fields it does not score, and is cached by its inputs like every other stage."""

import json

import yaml

from conftest import pair_rows, write_jsonl
from prefalign.pipeline import plan_recipe, run_recipe, stage_state


def score_recipe(tmp_path, unit: str):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(5))
    recipe = {"name": "s", "output_dir": str(tmp_path / "run"), "stages": {
        "pairs": {"kind": "merge", "inputs": [str(data)]},
        "score": {"kind": "score", "input": "${pairs.output}", "scorer": "length", "config": {"unit": unit}},
        "eval": {"kind": "eval", "models": {"base": "x"}, "refusal_scorer": None, "toxicity_scorer": None},
    }}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_score_stage_writes_rewards_and_is_cached(tmp_path):
    path = score_recipe(tmp_path, "words")
    run_recipe(path, only=["pairs", "score"], show_progress=False, echo=lambda _: None)
    score = next(s for s in plan_recipe(path) if s.name == "score")
    assert stage_state(score) == "done" and score.outputs["output"] == str(tmp_path / "run" / "score" / "scored.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "run" / "score" / "scored.jsonl").read_text().splitlines()]
    source = pair_rows(5)
    assert [r["meta"]["id"] for r in rows] == [s["id"] for s in source]  # every record, in order; unknown keys go to meta
    for row in rows:
        assert row["reward_chosen"] == len(row["chosen"].split())
        assert row["reward_rejected"] == len(row["rejected"].split())
        assert row["anchors"] and row["toxic"]  # groups it does not score travel through
    lines = []
    run_recipe(path, only=["pairs", "score"], show_progress=False, echo=lines.append)
    assert any(line.startswith("[score] cached") for line in lines)
    # Another scorer config is another stage key: the stage runs again with the new rewards.
    path = score_recipe(tmp_path, "chars")
    lines.clear()
    run_recipe(path, only=["pairs", "score"], show_progress=False, echo=lines.append)
    assert any(line.startswith("[score] config changed") for line in lines)
    rows = [json.loads(line) for line in (tmp_path / "run" / "score" / "scored.jsonl").read_text().splitlines()]
    assert all(r["reward_chosen"] == len(r["chosen"]) for r in rows)
