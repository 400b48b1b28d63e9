"""`--help` lists and unknown-name errors come from the registries, so they cannot drift."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from prefalign.cli import app

runner = CliRunner(env={"COLUMNS": "400"})


def help_text(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_train_and_data_check_list_the_public_losses_and_reference_modes():
    from prefalign.configfile import one_of
    from prefalign.losses import PUBLIC_LOSSES
    from prefalign.train.reference import REFERENCE_KINDS

    for command in (("train",), ("data", "check")):
        assert one_of(PUBLIC_LOSSES) in help_text(*command), command
    assert one_of(("auto", *REFERENCE_KINDS)) in help_text("train")


def test_generate_lists_every_strategy_source_and_backend():
    from prefalign.data.prompts import PROMPT_SOURCES
    from prefalign.generate.backends import BACKENDS
    from prefalign.generate.registry import STRATEGIES

    text = help_text("generate")
    for names in (STRATEGIES, PROMPT_SOURCES, BACKENDS):
        missing = [n for n in names if n not in text]
        assert not missing, missing
    assert "steer (response prefill)" in text and "critique (rDPO)" in text


def test_score_lists_every_scorer_and_response_group():
    from prefalign.data.records import RESPONSE_GROUPS
    from prefalign.score.registry import SCORERS

    text = help_text("score")
    assert all(n in text for n in SCORERS) and all(g in text for g in RESPONSE_GROUPS)


def test_unknown_names_are_answered_from_the_registries(tmp_path):
    from prefalign.generate.backends import BACKENDS
    from prefalign.generate.config import GenerateConfigError, load_generate_config

    with pytest.raises(GenerateConfigError, match=f"unknown backend 'tgi'; choose one of {', '.join(BACKENDS)}"):
        load_generate_config(None, {"strategy": "critique", "output": tmp_path / "o.jsonl", "backend": "tgi"}, {})
    from conftest import pair_rows, write_jsonl
    from prefalign.score.registry import SCORERS

    data = write_jsonl(tmp_path / "x.jsonl", pair_rows(2))
    result = runner.invoke(app, ["score", str(data), "-s", "nope", "-o", str(tmp_path / "y.jsonl")])
    assert result.exit_code == 2 and f"unknown scorer 'nope'; known: {', '.join(SCORERS)}" in " ".join(result.output.split())
