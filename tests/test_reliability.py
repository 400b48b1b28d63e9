"""Bad inputs and faults end cleanly (issue 11): one line naming file, line and field where there is
one, exit code 2, before any model loads; runs never mix; a divergence keeps only good weights and
can be resumed with a lower lr; outputs are written atomically.

The README's "Reliability" section lists what is checked here, test by test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import pair_rows, write_jsonl
from prefalign.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def error_line(result) -> str:
    """The error a command printed: exactly one line, starting with 'error:'."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # Reference log-probs go to a fresh cache; the tiny model is passed by its path.
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model is loaded."""
    import prefalign.models.loading as loading
    import prefalign.train.loop as loop

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


def train_args(tiny_model, data, out, *extra):
    return ["train", "--model", tiny_model, "--data", data, "--output-dir", out, "--batch-size", "4", "--seed", "3",
            "--quiet", *extra]


def log_rows(out: Path) -> list[dict]:
    def no_constants(name):  # NaN / Infinity are not JSON
        raise ValueError(f"{name} in train_log.jsonl")

    return [json.loads(line, parse_constant=no_constants) for line in (out / "train_log.jsonl").read_text().splitlines()]


def steps_of(out: Path) -> list[int]:
    return [r["step"] for r in log_rows(out) if "loss" in r]


# ------------------------------------------------------------------ 2. re-running a killed train


@pytest.mark.slow
def test_train_refuses_an_output_dir_with_checkpoints(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "run"
    first = cli(*train_args(tiny_model, data, out, "--max-steps", "2", "--save-every", "1"))
    assert first.exit_code == 0, first.output
    log_before = (out / "train_log.jsonl").read_bytes()

    again = cli(*train_args(tiny_model, data, out, "--max-steps", "3"))
    assert again.exit_code == 2
    assert error_line(again) == f"error: checkpoints at {out / 'checkpoints'}: pass --resume, or --overwrite"
    assert (out / "train_log.jsonl").read_bytes() == log_before  # untouched

    both = cli(*train_args(tiny_model, data, out, "--max-steps", "3", "--resume", "--overwrite"))
    assert both.exit_code == 2 and "--resume and --overwrite" in error_line(both)

    fresh = cli(*train_args(tiny_model, data, out, "--max-steps", "3", "--save-every", "3", "--overwrite"))
    assert fresh.exit_code == 0, fresh.output
    assert steps_of(out) == [1, 2, 3]  # one run in the log, never two
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]  # the old ones went


def test_a_run_killed_before_its_first_checkpoint_starts_a_new_log(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed at step 2 leaves with save_every 50: log lines, no checkpoint.
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n')
    result = cli(*train_args(tiny_model, data, out, "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    assert steps_of(out) == [1, 2, 3] and log_rows(out)[0]["loss"] != 0.7


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_summary.json").write_text("{}")  # e.g. a recipe stage, whose checkpoints were dropped
    for extra in ([], ["--resume"]):
        result = cli(*train_args(tiny_model, data, out, "--max-steps", "1", *extra))
        assert result.exit_code == 2 and "holds a finished run" in error_line(result)


@pytest.mark.slow
def test_pipeline_style_resume_by_default_still_works(tmp_path, tiny_model, pairs_file):
    """`prefalign run` calls run_training(resume=<a checkpoint exists>)."""
    from prefalign.train.checkpoint import latest_checkpoint
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import run_training

    cfg = TrainConfig(model=tiny_model, data=pairs_file, output_dir=tmp_path / "out", max_steps=2, batch_size=4,
                      save_every=1, max_length=64, max_prompt_length=32)
    run_training(cfg, resume=latest_checkpoint(cfg.output_dir) is not None, show_progress=False)
    more = cfg.model_copy(update={"max_steps": 3})
    result = run_training(more, resume=latest_checkpoint(more.output_dir) is not None, show_progress=False)
    assert result.steps == 3 and steps_of(more.output_dir) == [1, 2, 3]


# ------------------------------------------------- 3 + 7. divergence, good checkpoints, lower lr


@pytest.mark.slow
def test_divergence_keeps_finite_weights_and_resumes_with_a_lower_lr(tmp_path, tiny_model):
    """The whole path: a run, the same run continued with an lr that blows it up, then continued
    again from the checkpoint the error names, with the lower lr it suggests."""
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "run"
    base = train_args(tiny_model, data, out, "--save-every", "1")
    ok = cli(*base, "--max-steps", "2", "--lr", "1e-4")
    assert ok.exit_code == 0, ok.output

    boom = cli(*base, "--max-steps", "6", "--lr", "1e3", "--resume")
    assert boom.exit_code == 2
    line = error_line(boom)
    assert "training stopped at step 3: the weights exploded" in line
    good = out / "checkpoints" / "step-00000002"
    assert f"last good checkpoint: {good} (step 2" in line and "--resume --lr 100" in line
    assert not (out / "checkpoints" / "step-00000003").exists()
    from safetensors.torch import load_file

    weights = load_file(str(good / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    fine = cli(*base, "--max-steps", "6", "--lr", "1e-5", "--resume")
    assert fine.exit_code == 0, fine.output
    assert steps_of(out) == [1, 2, 3, 4, 5, 6]  # steps logged once each: the failed attempt's are gone
    rows = log_rows(out)
    events = [r for r in rows if r.get("event") == "resumed"]
    assert events[-1]["step"] == 2 and events[-1]["changed"] == {"lr": [1000.0, 1e-5]}  # vs the attempt before
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert by_step[1]["lr"] == pytest.approx(1e-4) and by_step[3]["lr"] < 1e-5 + 1e-12  # cosine from the new lr
    assert all(math.isfinite(r["loss"]) for r in by_step.values())


def test_non_finite_numbers_are_rejected_by_name(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    for value in ("inf", "nan", "-inf"):
        result = cli(*train_args(tiny_model, data, tmp_path / "out", "--lr", value))
        assert result.exit_code == 2
        assert "field 'lr': must be a finite number" in error_line(result)
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\noutput_dir: {tmp_path / 'out'}\nloss_params: {{beta: .nan}}\n")
    result = cli("train", "--config", config)
    assert result.exit_code == 2 and f"{config}: field 'loss_params.beta': must be a finite number" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_train_rm_rejects_non_finite_numbers_too(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    result = cli("train-rm", "--data", data, "-o", tmp_path / "rm", "--lr", "nan", "-q")
    assert result.exit_code == 2 and error_line(result) == "error: flags: field 'lr': must be a finite number, found nan"


def test_a_huge_lr_stops_with_the_step_and_the_cause(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "run"
    result = cli(*train_args(tiny_model, data, out, "--max-steps", "4", "--lr", "1e3"))
    assert result.exit_code == 2
    line = error_line(result)
    assert "training stopped at step 1: the weights exploded" in line and "no checkpoint was kept" in line
    assert not (out / "model").exists()
    log_rows(out) if (out / "train_log.jsonl").exists() else None  # strict JSON, when there is a log


def _trainer(tmp_path, tiny_model, pairs_file, **kw):
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import Trainer

    cfg = TrainConfig(model=tiny_model, data=pairs_file, output_dir=tmp_path / "out", batch_size=4, lr=1e-4,
                      save_every=1, max_length=64, max_prompt_length=32, **kw)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    return trainer


def test_exploding_gradients_stop_training(tmp_path, tiny_model, pairs_file, monkeypatch):
    from prefalign.train.loop import TrainingDiverged

    trainer = _trainer(tmp_path, tiny_model, pairs_file, max_steps=8)
    real = trainer.loss_on

    def spiking(examples, *, train):
        losses, *rest = real(examples, train=train)
        return (losses * 1e9 if trainer.step == 6 else losses, *rest)

    monkeypatch.setattr(trainer, "loss_on", spiking)
    with pytest.raises(TrainingDiverged, match=r"step 7: the gradient norm exploded to .* median .* first 5 steps"):
        trainer.train()
    assert (trainer.output_dir / "checkpoints" / "step-00000006").exists()


def test_non_finite_weights_stop_training_before_they_are_saved(tmp_path, tiny_model, pairs_file, monkeypatch):
    from prefalign.train.loop import TrainingDiverged

    trainer = _trainer(tmp_path, tiny_model, pairs_file, max_steps=4)
    step = trainer.optimizer.step

    def poisoned_step(*a, **k):
        step(*a, **k)
        if trainer.step == 1:
            with torch.no_grad():
                next(p for p in trainer.model.parameters() if p.requires_grad)[0, 0] = float("nan")

    monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)
    with pytest.raises(TrainingDiverged, match=r"step 2: the update made weights non-finite \(nan/inf in .*embed"):
        trainer.train()
    assert not (trainer.output_dir / "checkpoints" / "step-00000002").exists()


# -------------------------------------------------------- 4. one validation for check and train


def test_ragged_anchors_fail_in_data_check_and_in_train_before_the_model(tmp_path, tiny_model, no_model_load):
    rows = pair_rows(8)
    rows[5]["anchors"] = ["one", "two", "three"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    expected = f"error: {data}:6: field 'anchors': 3 anchors, but 7 record(s) have 2"
    check = cli("data", "check", data, "--loss", "d2o")
    assert check.exit_code == 2 and error_line(check).startswith(expected)
    train = cli(*train_args(tiny_model, data, tmp_path / "out", "--loss", "d2o", "--max-steps", "1"))
    assert train.exit_code == 2 and error_line(train).startswith(expected)
    skipped = cli("data", "check", data, "--loss", "d2o", "--skip-invalid")
    assert skipped.exit_code == 0 and "7 valid records for 'd2o', 1 skipped" in flat(skipped.output)


def test_odpo_gap_that_float32_would_tie_trains(tmp_path, tiny_model):
    rows = pair_rows(8)
    for row in rows:
        row["reward_chosen"], row["reward_rejected"] = 1.0 + 1e-9, 1.0  # positive, but 0.0 in float32
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert cli("data", "check", data, "--loss", "odpo").exit_code == 0
    train = cli(*train_args(tiny_model, data, tmp_path / "out", "--loss", "odpo", "--max-steps", "2"))
    assert train.exit_code == 0, train.output


def test_odpo_ties_are_counted_by_both_and_errors_with_strict(tmp_path, tiny_model, no_model_load):
    rows = pair_rows(4)
    rows[2]["reward_chosen"] = rows[2]["reward_rejected"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    check = cli("data", "check", data, "--loss", "odpo")
    assert check.exit_code == 0 and "1 pair(s) with reward gap <= 0 would be dropped" in flat(check.output)
    for args in (["data", "check", data, "--loss", "odpo", "--strict"],
                 train_args(tiny_model, data, tmp_path / "out", "--loss", "odpo", "--strict")):
        result = cli(*args)
        assert result.exit_code == 2
        assert error_line(result).startswith(f"error: {data}:3: field 'reward_chosen': reward gap 0.2 - 0.2 <= 0")


# ------------------------------------------------------------------------------ 5. OS errors


def test_unreadable_data_named_in_yaml_is_one_line(tmp_path, tiny_model, monkeypatch, no_model_load):
    import builtins

    import prefalign.data.io as io

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n")

    def denied(path, *a, **k):  # chmod 000 does not stop root, which runs CI
        if str(path) == str(data):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(io, "open", denied, raising=False)
    for args in (["train", "--config", config, "-q"], ["data", "check", data]):
        result = cli(*args)
        assert result.exit_code == 2
        assert error_line(result) == f"error: {data}: cannot read: Permission denied"


def test_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_model, no_model_load):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    target = tmp_path / "taken"
    target.write_text("x")
    result = cli(*train_args(tiny_model, data, target))
    assert result.exit_code == 2 and error_line(result) == f"error: output_dir {target}: exists and is not a folder"


def test_any_os_error_on_a_path_is_one_line(tmp_path, tiny_model, monkeypatch):
    import prefalign.train.loop as loop

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    full = tmp_path / "out" / "model" / "model.safetensors"

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(full))

    monkeypatch.setattr(loop, "run_training", disk_full)
    result = cli(*train_args(tiny_model, data, tmp_path / "out"))
    assert result.exit_code == 2 and error_line(result) == f"error: {full}: No space left on device"


def test_config_file_errors_are_one_line(tmp_path):
    folder = tmp_path / "conf.yaml"
    folder.mkdir()
    result = cli("train", "--config", folder)
    assert result.exit_code == 2 and error_line(result) == f"error: {folder}: is a folder, not a regular file; give a file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: d.jsonl\noutput_dir: out\nlr: [1, 2\n")
    result = cli("train", "--config", bad)
    assert result.exit_code == 2 and error_line(result).startswith(f"error: {bad}:4: not valid YAML:")


# ------------------------------------------------------------------------ 6. score -o onto input


def test_score_onto_its_input_needs_in_place(tmp_path):
    rows = pair_rows(3)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    before = data.read_bytes()
    result = cli("score", data, "-s", "length", "-o", data, "-q", "--no-cache")
    assert result.exit_code == 2
    assert error_line(result) == f"error: -o {data} is the input file: pass --in-place to replace it, or write elsewhere"
    assert data.read_bytes() == before
    result = cli("score", data, "-s", "length", "-o", data, "-q", "--no-cache", "--in-place")
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["reward_chosen"] for r in scored] == [len(r["chosen"]) for r in rows]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_score_stage_refuses_output_equal_to_input(tmp_path):
    from pydantic import ValidationError

    from prefalign.score.stage import ScoreStageConfig

    with pytest.raises(ValidationError, match="output: is the input file"):
        ScoreStageConfig(input=tmp_path / "a.jsonl", output=tmp_path / "a.jsonl", scorer="length")


def test_write_jsonl_is_atomic(tmp_path):
    from prefalign.data.io import write_jsonl as write

    path = tmp_path / "out.jsonl"
    path.write_text('{"old": 1}\n')

    def rows():
        yield {"a": 1}
        yield {"b": float("nan")}  # not JSON: the write fails half-way

    with pytest.raises(ValueError, match="row 2"):
        write(path, rows())
    assert path.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    write(path, [{"new": 2}])
    assert path.read_text() == '{"new": 2}\n' and oct(path.stat().st_mode & 0o777) != "0o600"


# --------------------------------------------------------------------- 8. silent data changes


def _changed_rows():
    rows = pair_rows(8)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["prompt"] = "word " * 400  # far past max_prompt_length 96
    return rows


def test_identical_pairs_and_cut_prompts_are_counted_and_recorded(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", _changed_rows())
    out = tmp_path / "out"
    check = cli("data", "check", data)
    assert check.exit_code == 0 and "1 pair(s) with chosen == rejected" in flat(check.output)
    result = cli(*train_args(tiny_model, data, out, "--max-steps", "1"), "--config", _limits(tmp_path))
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "train: 1 pair(s) with chosen == rejected" in text and "train: 1 prompt(s) cut to the length limit" in text
    summary = json.loads((out / "train_summary.json").read_text())["data"]
    assert summary["train_identical_pairs"] == 1 and summary["train_truncated_prompts"] == 1


def _limits(tmp_path) -> Path:
    config = tmp_path / "limits.yaml"
    config.write_text("max_length: 128\nmax_prompt_length: 96\n")
    return config


def test_strict_makes_silent_changes_errors(tmp_path, tiny_model, no_model_load):
    rows = _changed_rows()
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = cli(*train_args(tiny_model, data, tmp_path / "out", "--strict"), "--config", _limits(tmp_path))
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: {data}:2: field 'rejected': identical to chosen")
    check = cli("data", "check", data, "--strict")
    assert check.exit_code == 2 and error_line(check).startswith(f"error: {data}:2: field 'rejected'")
    del rows[1]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = cli(*train_args(tiny_model, data, tmp_path / "out", "--strict"), "--config", _limits(tmp_path))
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: {data}:2: field 'prompt': prompt is ")
    assert "training would cut it to" in error_line(result)


# ------------------------------------------------------------------- 9. eval validates first


def test_eval_validates_pairs_and_models_before_loading_any_model(tmp_path, tiny_model, no_model_load):
    rows = pair_rows(3)
    rows[1]["chosen"] = ""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = cli("eval", "-m", f"base={tiny_model}", "--pairs", pairs, "-o", tmp_path / "eval", "-q")
    assert result.exit_code == 2 and error_line(result) == f"error: {pairs}:2: field 'chosen': response is empty"
    good = write_jsonl(tmp_path / "good.jsonl", pair_rows(3))
    result = cli("eval", "-m", "base=no-such-model", "--pairs", good, "-o", tmp_path / "eval", "-q")
    assert result.exit_code == 2 and error_line(result).startswith("error: models.base: unknown model 'no-such-model'")
    # Inputs the evaluation reads only after its models have run: checked first too.
    config = tmp_path / "eval.yaml"
    config.write_text(f"output_dir: {tmp_path / 'eval'}\nmodels: {{base: {tiny_model}}}\ncontrast_pairs: {pairs}\n")
    result = cli("eval", "-c", config, "-q")
    assert result.exit_code == 2 and error_line(result) == f"error: {pairs}:2: field 'chosen': response is empty"
    config.write_text(f"output_dir: {tmp_path / 'eval'}\nmodels: {{base: {tiny_model}}}\n"
                      f"training_logs: {{base: {tmp_path / 'missing.jsonl'}}}\n")
    result = cli("eval", "-c", config, "-q")
    assert result.exit_code == 2
    assert error_line(result) == f"error: training_logs.base: {tmp_path / 'missing.jsonl'}: file not found"


# -------------------------------------------------------------------------- 10. FIFO paths


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_as_data_or_config_fails_at_once(tmp_path, tiny_model):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    config = tmp_path / "pipe.yaml"
    os.mkfifo(config)
    env = {**os.environ, "PREFALIGN_CACHE": str(tmp_path / "cache")}
    for args in (["data", "check", fifo], ["train", "--model", tiny_model, "--data", fifo, "-o", tmp_path / "o"],
                 ["train", "--config", config]):
        # A subprocess with a timeout: before the fix this blocked forever on open().
        proc = subprocess.run([sys.executable, "-m", "prefalign.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=600)  # generous: a busy runner, not a hang
        assert proc.returncode == 2, proc.stderr
        assert "is a FIFO (named pipe), not a regular file" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------- 11. one unknown-loss message


def test_unknown_loss_is_one_message_matching_help(tmp_path):
    from prefalign.cli import LOSS_HELP
    from prefalign.losses import PUBLIC_LOSSES

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(2))
    check = cli("data", "check", data, "--loss", "kto")
    train = cli("train", "--data", data, "-o", tmp_path / "o", "--loss", "kto")
    expected = f"unknown loss 'kto'; choose one of {', '.join(PUBLIC_LOSSES)}"
    assert check.exit_code == train.exit_code == 2
    assert error_line(check) == f"error: --loss: {expected}"
    assert error_line(train) == f"error: flags: field 'loss': {expected}"
    assert "sft" not in expected
    assert LOSS_HELP == f"{', '.join(PUBLIC_LOSSES[:-1])} or {PUBLIC_LOSSES[-1]}"
    assert LOSS_HELP in flat(cli("train", "--help").output.replace("│", " "))
