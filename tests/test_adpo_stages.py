"""ADPO's [TOXIC] SFT is a recipe stage of its own: adpo-toxicity.yaml plans it, the toxic-control
records and ADPO's toxic reference use its model, and it trains exactly what the toxic-control
strategy used to train inside generation (same records, same settings, same seed)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.pipeline import plan_recipe, run_recipe
from prefalign.train.config import TrainConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

#: The settings the toxic-control strategy trained its SFT run with (its TRAIN_DEFAULTS, then the
#: recipe's ``train:`` params), before the run became the recipe's toxic-sft stage.
HIDDEN_SFT_DEFAULTS = {"lr": 2e-5, "epochs": 1.0, "batch_size": 8, "schedule": "constant"}
HIDDEN_SFT_RECIPE_PARAMS = {"max_steps": 40, "batch_size": 8, "lr": 2.0e-5}


def test_adpo_recipe_plans_the_sft_as_its_own_stage(tmp_path):
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["run", str(RECIPES / "adpo-toxicity.yaml"), "--dry-run",
                                                            "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert names == ["toxic-data", "toxic-sft", "generate", "train-adpo", "train-dpo", "eval"]

    stages = {s.name: s for s in plan_recipe(RECIPES / "adpo-toxicity.yaml", output_dir=tmp_path)}
    sft = stages["toxic-sft"].config
    hidden = TrainConfig.model_validate({**HIDDEN_SFT_DEFAULTS, **HIDDEN_SFT_RECIPE_PARAMS, "model": "smollm2-135m-instruct",
                                         "data": sft.data, "output_dir": sft.output_dir, "loss": "sft",
                                         "toxic_control_token": "[TOXIC]"})
    assert sft == hidden  # every setting, seed included
    assert sft.data == stages["toxic-data"].config.output
    toxic_model = stages["toxic-sft"].outputs["model"]
    assert stages["generate"].config.strategy_config().toxic_model == toxic_model
    assert str(stages["train-adpo"].config.toxic_reference_model) == toxic_model
    assert "toxic-sft" in stages["generate"].depends and "toxic-sft" in stages["train-adpo"].depends
    # Both generate stages draw the same base samples: same prompts, sampling, labelling, work_dir.
    data, records = stages["toxic-data"].config, stages["generate"].config
    assert (data.prompts, data.models, data.seed, data.max_new_tokens, data.temperature, data.batch_size) == \
        (records.prompts, records.models, records.seed, records.max_new_tokens, records.temperature, records.batch_size)
    shared = data.strategy_config().model_dump()
    assert {k: v for k, v in records.strategy_config().model_dump().items() if k in shared} == shared
    assert shared["work_dir"] == tmp_path / "toxic-control"


def test_gpu_variant_scales_both_generate_stages(tmp_path):
    stages = {s.name: s.config for s in plan_recipe(RECIPES / "gpu" / "adpo-toxicity.yaml", output_dir=tmp_path)}
    for name in ("toxic-data", "generate"):
        assert stages[name].prompts.limit is None and stages[name].batch_size == 64
    assert stages["toxic-sft"].model == "models/Mistral-7B-Instruct-v0.2"


def hidden_sft_records(base_samples: Path, scores, threshold: float, token: str) -> list[dict]:
    """What the toxic-control strategy wrote to sft.jsonl before training (its sft_records)."""
    from prefalign.data.render import with_control_token
    from prefalign.generate.backends.base import is_truncated
    from prefalign.generate.toxic_control import _samples_of

    records, score = [], iter(scores)
    for row in (json.loads(line) for line in base_samples.read_text().splitlines()):
        for text in _samples_of(row):
            toxic = next(score) >= threshold
            if text.strip():
                meta = {"label": "toxic" if toxic else "non_toxic", **({"truncated": ["chosen"]} if is_truncated(text) else {})}
                records.append({"prompt": with_control_token(row["prompt"], token) if toxic else row["prompt"],
                                "chosen": text.strip(), "meta": meta})
    return records


@pytest.mark.slow
def test_the_sft_stage_trains_what_the_hidden_sft_trained(tmp_path, tiny_model):
    from safetensors.torch import load_file

    from conftest import PROMPTS, write_jsonl
    from prefalign.score import make_scorer
    from prefalign.train.loop import run_training

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS[:6])])
    # Samples of 8 random tokens are 44-76 characters long: a length threshold labels some toxic.
    labelling = {"n": 3, "scorer": "length", "threshold": 55.0, "work_dir": "${output_dir}/toxic-control"}
    train = {"max_steps": 2, "batch_size": 4, "max_length": 64, "max_prompt_length": 32}
    recipe = {"output_dir": str(tmp_path / "run"), "model": tiny_model,
              "defaults": {"generate": {"models": ["${model}"], "prompts": {"source": "file", "path": str(prompts)},
                                        "params": labelling, "max_new_tokens": 8, "batch_size": 4}},
              "stages": {
                  "toxic-data": {"kind": "generate", "strategy": "toxic-sft-data"},
                  "toxic-sft": {"kind": "train", "model": "${model}", "data": "${toxic-data.output}", "loss": "sft",
                                "lr": 2e-5, "schedule": "constant", **train},
                  "eval": {"kind": "eval", "models": {"base": "${model}"}, "refusal_scorer": None, "toxicity_scorer": None},
              }}
    path = tmp_path / "adpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, only=["toxic-data", "toxic-sft"], show_progress=False, echo=lambda _: None)
    stage_model = tmp_path / "run" / "toxic-sft" / "model"

    # The hidden path: the same base samples, labelled as the strategy labelled them, written as
    # sft.jsonl and trained with its settings (its defaults, then the recipe's train params).
    base_samples = tmp_path / "run" / "toxic-control" / "base_samples.jsonl"
    texts = [t for line in base_samples.read_text().splitlines() for t in json.loads(line)["samples"]]
    scores = make_scorer("length", show_progress=False).score(texts)
    records = hidden_sft_records(base_samples, scores, 55.0, "[TOXIC]")
    assert {r["meta"]["label"] for r in records} == {"toxic", "non_toxic"}
    (tmp_path / "hidden").mkdir()
    sft = write_jsonl(tmp_path / "hidden" / "sft.jsonl", records)
    hidden = run_training(TrainConfig.model_validate({**HIDDEN_SFT_DEFAULTS, **train, "lr": 2e-5, "model": tiny_model,
                                                      "data": sft, "output_dir": tmp_path / "hidden" / "sft", "loss": "sft",
                                                      "toxic_control_token": "[TOXIC]"}), show_progress=False)

    stage_rows = [json.loads(line) for line in (tmp_path / "run" / "toxic-data" / "data.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["meta"].get("truncated")) for r in stage_rows] == \
        [(r["prompt"], r["chosen"], r["meta"].get("truncated")) for r in records]
    got, expected = load_file(str(stage_model / "model.safetensors")), load_file(str(hidden.model_dir / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert any(not torch.equal(got[k], before[k]) for k in got)  # it trained
