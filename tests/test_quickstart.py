"""The quickstart (``make demo``) is ``recipes/quickstart.yaml`` run by the recipe runner: one path,
the same split and training as the demo had, found from a checkout and from a wheel."""

import json
import tomllib
from pathlib import Path

import pytest

from prefalign.pipeline import plan_recipe, run_recipe, shipped_recipe
from prefalign.quickstart import quickstart_overrides, run_quickstart
from prefalign.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_the_quickstart_is_the_shipped_recipe(tmp_path):
    path = shipped_recipe("quickstart")
    assert path == ROOT / "recipes" / "quickstart.yaml"
    stages = {s.name: s for s in plan_recipe(path, output_dir=tmp_path, overrides=quickstart_overrides())}
    train = stages["train"].config
    # The training the demo ran before it became the recipe (quickstart_config), but for
    # save_every: it was max_steps, the default 50 saves at the same steps (only the last of 36).
    before = TrainConfig(model="smollm2-135m-instruct", data=train.data, eval_data=train.eval_data, output_dir=train.output_dir,
                         loss="dpo", beta=0.1, lr=2e-5, schedule="constant", warmup_steps=0, batch_size=8, max_steps=36,
                         max_length=320, max_prompt_length=288, seed=0)
    assert train == before
    assert stages["eval"].config.models == {"base": "smollm2-135m-instruct", "dpo": str(tmp_path / "train" / "model")}


def test_the_commands_options_are_laid_over_the_recipe(tmp_path):
    stages = {s.name: s.config for s in plan_recipe(shipped_recipe("quickstart"), output_dir=tmp_path,
                                                       overrides=quickstart_overrides("m", 3))}
    assert (stages["train"].model, stages["train"].max_steps) == ("m", 3)
    assert stages["eval"].models["base"] == "m"
    assert quickstart_overrides() == {}


def test_the_split_stage_gives_the_demos_split_with_the_option_orders(tmp_path):
    from prefalign.data.options import leading_letter, order_record_options
    from prefalign.data.sources import split_sycophancy_pairs
    from prefalign.data.validate import load_records

    (split,) = run_recipe(shipped_recipe("quickstart"), output_dir=tmp_path, only=["data"], show_progress=False,
                          echo=lambda _: None)[:1]
    train, held_out = split_sycophancy_pairs()
    assert (len(train), len(held_out)) == (146, 104)
    # The demo's questions; half the training ones swapped, every held-out one in both orders.
    for part, records in (("train", order_record_options(train, "balanced")), ("eval", order_record_options(held_out, "both"))):
        written = load_records(Path(split.outputs[part]), ("prompt", "chosen", "rejected")).records
        assert [(r.prompt, r.chosen, r.rejected) for r in written] == [(r.prompt, r.chosen, r.rejected) for r in records]
        letters = [leading_letter(r.chosen) for r in written]
        assert letters.count("A") == letters.count("B")


def test_every_recipe_goes_into_the_wheel():
    """pyproject.toml's data-files put each recipe where shipped_recipe looks in an installed wheel."""
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {path: target for target, globs in data_files.items() for g in globs for path in ROOT.glob(g)}
    for recipe in (ROOT / "recipes").rglob("*.yaml"):
        assert shipped.get(recipe) == f"share/prefalign/{recipe.parent.relative_to(ROOT).as_posix()}", recipe


@pytest.mark.slow
def test_quickstart_on_tiny_random_runs_the_recipe_and_reruns_from_its_cache(tmp_path, tiny_model):
    lines = []
    stages = run_quickstart(tmp_path / "qs", model=tiny_model, max_steps=1, show_progress=False, echo=lines.append)
    assert [s.name for s in stages] == ["data", "train", "eval"]
    assert json.loads((tmp_path / "qs" / "train" / "train_summary.json").read_text())["steps"] == 1
    metrics = json.loads((tmp_path / "qs" / "eval" / "metrics.json").read_text())
    assert {"base", "dpo"} <= set(json.dumps(metrics).split('"'))
    summary = (tmp_path / "qs" / "eval" / "summary.md").read_text()
    assert "held-out preference accuracy" in summary and "n=104" in summary
    # Again: every stage is cached, and the table is shown from the eval stage's summary.
    lines.clear()
    run_quickstart(tmp_path / "qs", model=tiny_model, max_steps=1, show_progress=False, echo=lines.append)
    assert sum("cached" in line for line in lines) == 3 and lines[-1] == summary
