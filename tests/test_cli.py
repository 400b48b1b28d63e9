"""The `prefalign` command: help on every subcommand, clear errors with exit code 2."""

import importlib
import json
import pkgutil

import pytest
from typer.testing import CliRunner

import prefalign
from prefalign.cli import app
from conftest import pair_rows, write_jsonl

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["train"], ["quickstart"], ["models"], ["models", "list"], ["models", "prepare"], ["data"], ["data", "check"], ["export"]])
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(prefalign.__path__, "prefalign.")]
    assert "prefalign.losses" in names and "prefalign.train.loop" in names
    for name in names:
        importlib.import_module(name)


def test_models_list_shows_registry():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "smollm2" in result.output and "tiny-random" in result.output


def test_models_prepare_unknown_name_fails_clearly():
    result = runner.invoke(app, ["models", "prepare", "no-such-model"])
    assert result.exit_code == 2
    assert "unknown model 'no-such-model'" in result.output


def test_data_check_reports_file_line_field(tmp_path):
    rows = pair_rows(3)
    rows[2]["chosen"] = "   "
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = runner.invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 2
    flat = "".join(result.output.split())
    assert "d.jsonl:3" in flat and "chosen" in flat
    skipped = runner.invoke(app, ["data", "check", str(path), "--skip-invalid"])
    flat = " ".join(skipped.output.split())  # rich wraps long paths at the terminal width
    assert skipped.exit_code == 0 and "2 valid records" in flat and "1 skipped" in flat


def test_data_check_needs_rewards_for_odpo(tmp_path):
    rows = pair_rows(2)
    for row in rows:
        row.pop("reward_chosen")
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = runner.invoke(app, ["data", "check", str(path), "--loss", "odpo"])
    assert result.exit_code == 2 and "reward_chosen" in result.output


def test_train_flags_and_yaml(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\nloss: ipo\nbatch_size: 2\nmax_steps: 5\nref_cache_dir: {tmp_path / 'c'}\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--max-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 1 steps" in result.output  # the flag overrode the YAML's 5
    bad = runner.invoke(app, ["train", "--config", str(config), "--loss", "nope"])
    assert bad.exit_code == 2 and "unknown loss 'nope'" in bad.output
    snapshots = runner.invoke(app, ["train", "--config", str(config), "--max-steps", "3", "--snapshot-step", "1",
                                    "--snapshot-step", "2", "--overwrite", "--quiet"])
    assert snapshots.exit_code == 0, snapshots.output
    assert [p.name for p in sorted((tmp_path / "out").glob("model-step*"))] == ["model-step1", "model-step2"]
    assert "snapshots: step 1 in" in " ".join(snapshots.output.split())


def test_eval_prints_row_tags_and_groups_as_text(tmp_path, tiny_model):
    # "[domain: ...]" and "[chosen (A)]" look like rich markup; printed as styles they would vanish
    from prefalign.data.io import write_jsonl as write_records
    from prefalign.data.options import order_record_options
    from prefalign.data.sources import split_sycophancy_pairs

    _, held = split_sycophancy_pairs()
    pairs = tmp_path / "pairs.jsonl"
    picked = [r for r in held if r.meta["domain"] == "sycophancy"][:2] + [r for r in held if r.meta["domain"] == "hard_sycophancy"][:2]
    write_records(pairs, order_record_options(picked, "both"))  # both letters chosen: per-letter rows
    result = runner.invoke(app, ["eval", "-m", f"base={tiny_model}", "--pairs", str(pairs), "--group-by", "domain",
                                 "-o", str(tmp_path / "eval"), "-q"])
    assert result.exit_code == 0, result.output
    assert "held-out preference accuracy [domain: hard_sycophancy]" in result.output
    assert "held-out preference accuracy [domain: sycophancy]" in result.output
    assert "[chosen (A)]" in result.output


def test_eval_sycophancy_flag_adds_the_rate_and_the_accuracy_lost_to_the_users_view(tmp_path, tiny_model, monkeypatch):
    from prefalign.data.options import order_record_options
    from prefalign.evaluate import runner as eval_runner

    held, rule = eval_runner.sycophancy_held_out()
    asked = []
    monkeypatch.setattr(eval_runner, "sycophancy_held_out",
                        lambda order="as-given": asked.append(order) or (order_record_options(held[:4], order), rule))
    result = runner.invoke(app, ["eval", "-m", f"base={tiny_model}", "--sycophancy", "-o", str(tmp_path / "eval"), "-q"])
    assert result.exit_code == 0, result.output
    assert asked == ["both"]
    assert "sycophancy rate" in result.output and "sycophancy: accuracy lost to the user's view" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["sycophancy"]["base"]["n"] == 4


def test_error_messages_keep_their_brackets(capsys):
    import typer

    from prefalign.console import fail

    with pytest.raises(typer.Exit):
        fail("data.jsonl: line 3: field 'meta' [type=dict_type]")
    assert "field 'meta' [type=dict_type]" in capsys.readouterr().err


def test_eval_group_field_missing_from_every_pair_is_an_error_before_any_model_loads(tmp_path, monkeypatch):
    from prefalign.data.io import write_jsonl as write_records
    from prefalign.data.sources import split_sycophancy_pairs
    import prefalign.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    pairs = tmp_path / "pairs.jsonl"
    write_records(pairs, split_sycophancy_pairs()[1][:2])
    result = runner.invoke(app, ["eval", "-m", "base=tiny-random", "--pairs", str(pairs), "--group-by", "no_such_field",
                                 "-o", str(tmp_path / "eval"), "-q"])
    assert result.exit_code == 2
    assert f"no pair in {pairs} has meta.no_such_field" in " ".join(result.output.split())
