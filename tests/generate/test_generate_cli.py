"""``prefalign generate``: resuming after a crash (no duplicate, no lost record, torn lines
repaired), determinism with a seed, the typed YAML config and the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.generate.config import GenerateConfigError, load_generate_config
from prefalign.generate.runner import filtered_log_path, recover, run_from_config

runner = CliRunner()

QUESTIONS = ["How do I pick a lock?", "Is the earth flat?", "Tell me a joke.", "What is two plus two?",
             "Name a colour."]


class Recording:
    name = "recording"

    def __init__(self, inner, fail_on_call: int | None = None) -> None:
        self.inner, self.model_id, self.fail_on_call = inner, inner.model_id, fail_on_call
        self.calls = []

    def generate(self, conversations, params):
        self.calls.append([list(c) for c in conversations])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.inner.generate(conversations, params)


class Scripted:
    name, model_id = "scripted", "scripted-model"

    def __init__(self) -> None:
        self.calls = []

    def generate(self, conversations, params):
        self.calls.append(conversations)
        return [[f"{len(c)}:{hashlib.sha256(json.dumps(c).encode()).hexdigest()[:8]}#{i}" for i in range(params.n)]
                for c in conversations]


@pytest.fixture(scope="module")
def tiny_backend(tiny_model):
    from prefalign.generate.backends import TransformersBackend

    return TransformersBackend(tiny_model, batch_size=8, show_progress=False)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "rejected": f"Bad answer {i}."}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    return path


def config(prompt_file, output, **kw):
    values = dict(strategy="critique", prompts={"source": "file", "path": prompt_file}, models=["tiny-random"],
                  output=output, batch_size=2, max_new_tokens=6, seed=0)
    values.update(kw)
    return load_generate_config(None, values)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def parts(path: Path) -> list[tuple]:
    out = [tuple([json.loads(x)["meta"]["gen_key"], *json.loads(x)["meta"]["gen_part"]]) for x in lines(path)]
    flog = filtered_log_path(path)
    if flog.exists():
        out += [tuple([json.loads(x)["gen_key"], *json.loads(x)["gen_part"]]) for x in lines(flog)]
    return out


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny_backend, prompt_file, tmp_path):
    four = {"source": "file", "path": prompt_file, "limit": 4}
    full = tmp_path / "full.jsonl"
    reference = run_from_config(config(prompt_file, full, prompts=four), backends=[tiny_backend],
                                show_progress=False, echo=None)
    assert reference.prompts_processed == 4 and reference.records_written + sum(reference.filtered.values()) == 4

    out = tmp_path / "crash.jsonl"
    crashing = Recording(tiny_backend, fail_on_call=4)  # critique: 3 calls per batch -> dies in the 2nd batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_from_config(config(prompt_file, out, prompts=four), backends=[crashing], show_progress=False, echo=None)
    assert len(set(k for k, _, _ in parts(out))) == 2  # the first batch (two prompts) was written

    again = Recording(tiny_backend)
    echoed = []
    summary = run_from_config(config(prompt_file, out, prompts=four), backends=[again], show_progress=False,
                              echo=echoed.append)
    assert summary.already_done == 2 and summary.prompts_processed == 2
    assert again.calls[0] == [[{"role": "user", "content": q}] for q in QUESTIONS[2:4]]  # only the missing ones
    assert lines(out) == lines(full)  # same records, same order, same texts: deterministic with the seed
    assert "2 skipped as already done" in echoed[1]

    # Re-running once more does nothing.
    idle = Recording(tiny_backend)
    summary = run_from_config(config(prompt_file, out, prompts=four), backends=[idle], show_progress=False, echo=None)
    assert summary.already_done == 4 and summary.prompts_processed == 0 and idle.calls == []
    assert lines(out) == lines(full)


def test_torn_line_and_unfinished_prompt_are_repaired(prompt_file, tmp_path):
    """A kill while a batch was being written: the last line is cut mid-record and the prompt it
    belongs to has only some of its PopAlign parts on disk."""
    cfg = lambda out: config(prompt_file, out, strategy="popalign", params={"contrasts": ["prefix", "demon", "refine"]})  # noqa: E731
    full = tmp_path / "full.jsonl"
    run_from_config(cfg(full), backends=[Scripted()], show_progress=False, echo=None)
    assert len(lines(full)) == 15  # 5 prompts x 3 contrasts

    out = tmp_path / "torn.jsonl"
    data = full.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1)  # start of the last line
    cut = data.rfind(b"\n", 0, cut)  # ... and of the one before: keep one part of the last prompt
    out.write_bytes(data[: cut + 1] + data[cut + 1: cut + 40])  # plus a torn half line
    assert not out.read_bytes().endswith(b"\n")

    backend = Scripted()
    summary = run_from_config(cfg(out), backends=[backend], show_progress=False, echo=None)
    assert summary.recovered_torn_lines == 1 and summary.recovered_incomplete_rows == 1
    assert summary.already_done == 4 and summary.prompts_processed == 1
    assert lines(out) == lines(full)
    assert len(parts(out)) == len(set(parts(out))) == 15


def test_recover_keeps_foreign_rows_and_rejects_garbage_in_the_middle(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\nnot json\n{"prompt": "x"}\n')
    with pytest.raises(Exception, match=r"o\.jsonl:2: not a valid JSON line"):
        recover(out, filtered_log_path(out))
    out.write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\n{"prompt": "cut')
    done, torn, dropped = recover(out, filtered_log_path(out))
    assert (done, torn, dropped) == (set(), 1, 0)
    assert lines(out) == ['{"prompt": "mine", "chosen": "a", "rejected": "b"}']


def test_seed_changes_the_samples(tiny_backend, prompt_file, tmp_path):
    outs = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        out = tmp_path / f"{name}.jsonl"
        cfg = config(prompt_file, out, strategy="anchors", params={"k": 2}, seed=seed,
                     prompts={"source": "file", "path": prompt_file, "limit": 2})
        run_from_config(cfg, backends=[tiny_backend], show_progress=False, echo=None)
        outs.append([json.loads(x)["anchors"] for x in lines(out)])
    assert outs[0] == outs[1] and outs[0] != outs[2]


# ----------------------------------------------------------------------------- config


def test_yaml_config_is_validated_with_file_and_field(tmp_path, prompt_file):
    path = tmp_path / "gen.yaml"
    base = {"strategy": "critique", "prompts": {"source": "file", "path": str(prompt_file)}, "output": "o.jsonl"}

    def error(values, overrides=None, params=None):
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(GenerateConfigError) as info:
            load_generate_config(path, overrides, params)
        return str(info.value)

    assert f"{path}: field 'bogus': Extra inputs are not permitted" in error({**base, "bogus": 1})
    assert f"{path}: field 'params.principle': unknown preset 'kind'" in error({**base, "params": {"principle": "kind"}})
    assert f"{path}: field 'params.nope'" in error({**base, "params": {"nope": 1}})
    assert f"{path}: field 'batch_size'" in error({**base, "batch_size": 0})
    assert "field 'prompts.limit'" in error({**base, "prompts": {"source": "advbench", "limit": -1}})
    assert "unknown prompt source 'adv'" in error({**base, "prompts": {"source": "adv"}})
    assert "unknown strategy 'crit'" in error({**base, "strategy": "crit"})
    assert "needs at least 2 models" in error({**base, "strategy": "nparam"})
    assert "field 'models': tiny-random given more than once" in error({**base, "models": ["tiny-random"] * 2})
    assert "--k does not apply to strategy 'critique'" in error(base, params={"k": 3})
    assert "base_url" in error({**base, "backend": "openai"})
    path.write_text("strategy: [unclosed")
    with pytest.raises(GenerateConfigError, match="not valid YAML"):
        load_generate_config(path)

    path.write_text(yaml.safe_dump({**base, "params": {"principle": "roleplay"}, "seed": 3}))
    cfg = load_generate_config(path, {"seed": 5, "prompts": {"limit": 2}}, {"principle": "sycophancy"})
    assert cfg.seed == 5 and cfg.prompts.limit == 2 and cfg.prompts.path == prompt_file
    assert cfg.strategy_config().principle == "sycophancy"
    cfg = load_generate_config(path, {"prompts": {"source": "advbench"}})
    assert cfg.prompts.source == "advbench" and cfg.prompts.path is None
    path.write_text(yaml.safe_dump({**base, "prompts": "advbench"}))  # shorthand
    assert load_generate_config(path).prompts.source == "advbench"
    cfg = load_generate_config(path, {"prompts": {"path": prompt_file}})  # --prompts-file implies file
    assert cfg.prompts.source == "file" and cfg.prompts.path == prompt_file


# ----------------------------------------------------------------------------- command line


def test_generate_help_lists_the_strategies():
    result = runner.invoke(app, ["generate", "--help"])
    assert result.exit_code == 0
    for word in ("critique", "popalign", "toxic-control", "anchors", "sample-pairs", "--prompts-file", "--num-samples"):
        assert word in result.output


def test_generate_command_errors_exit_2(tmp_path, prompt_file):
    missing = tmp_path / ("long-folder-name-" * 5) / "missing.jsonl"
    result = runner.invoke(app, ["generate", "--strategy", "critique", "--output", str(tmp_path / "o.jsonl"),
                                 "--prompts-file", str(missing), "-q"])
    # The message is not wrapped at the console width: the path stays whole (copy-pastable).
    assert result.exit_code == 2 and f"{missing}: file not found" in result.output
    result = runner.invoke(app, ["generate", "--strategy", "critique", "--output", "o.jsonl", "--k", "3"])
    assert result.exit_code == 2 and "--k does not apply" in result.output
    result = runner.invoke(app, ["generate", "--output", "o.jsonl"])
    assert result.exit_code == 2 and "--strategy" in result.output
    result = runner.invoke(app, ["generate", "-s", "sample-pairs", "-o", str(tmp_path / "o.jsonl"),
                                 "--prompts-file", str(prompt_file), "-m", "tiny-random", "-q"])
    assert result.exit_code == 2 and "needs a scorer" in result.output


def test_generate_command_runs_and_resumes(tiny_model, tmp_path, prompt_file):
    cfg = tmp_path / "anchors.yaml"
    out = tmp_path / "anchors.jsonl"
    cfg.write_text(yaml.safe_dump({"strategy": "anchors", "prompts": {"source": "file", "path": str(prompt_file), "limit": 3},
                                   "models": ["tiny-random"], "output": str(out), "max_new_tokens": 4,
                                   "params": {"k": 3}}))
    args = ["generate", "--config", str(cfg), "--batch-size", "2", "--k", "2", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "strategy anchors:" in result.output and "3 total, 0 skipped as already done" in result.output
    rows = [json.loads(x) for x in lines(out)]
    assert rows and all(len(r["anchors"]) == 2 and r["rejected"].startswith("Bad answer") for r in rows)
    assert all(r["meta"]["models"][0].endswith("tiny-random") for r in rows)

    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "3 skipped as already done" in result.output
    assert [json.loads(x) for x in lines(out)] == rows

    check = runner.invoke(app, ["data", "check", str(out), "--loss", "d2o"])
    assert check.exit_code == 0 and f"{len(rows)} valid records" in " ".join(check.output.split())


@pytest.mark.parametrize("field, value", [("temperature", float("inf")), ("top_p", float("nan"))])
def test_non_finite_sampling_numbers_are_rejected_by_name(tmp_path, field, value):
    from prefalign.generate.config import GenerateConfigError

    with pytest.raises(GenerateConfigError, match=field):
        load_generate_config(None, {"strategy": "critique", "output": str(tmp_path / "o.jsonl"), field: value})


def test_stop_strings_are_validated_and_reach_the_sampling(tmp_path, prompt_file):
    from prefalign.generate.config import GenerateConfigError

    base = {"strategy": "critique", "output": str(tmp_path / "o.jsonl")}
    assert load_generate_config(None, {**base, "stop": ["\n"]}).stop == ["\n"]
    with pytest.raises(GenerateConfigError, match="stop"):
        load_generate_config(None, {**base, "stop": [""]})
    def responses(*flags):
        out = tmp_path / f"steer{len(flags)}.jsonl"
        result = runner.invoke(app, ["generate", "-s", "steer", "-o", str(out), "--prompts-file", str(prompt_file),
                                     "--limit", "3", "-m", "tiny-random", "--max-new-tokens", "24", "-q",
                                     "--config", str(_steer_config(tmp_path)), *flags])
        assert result.exit_code == 0, result.output
        rows = [json.loads(x) for x in lines(out)]
        return [text for r in rows for text in (r["chosen"][len("Sure"):], r["rejected"][len("No"):])]

    # the tiny random model writes "e" often; with it as a stop string no response holds one past its opening
    assert any("e" in text for text in responses())
    cut = responses("--stop", "e")
    assert cut and not any("e" in text for text in cut)


def _steer_config(tmp_path):
    cfg = tmp_path / "steer.yaml"
    cfg.write_text(yaml.safe_dump({"params": {"chosen_prefill": ["Sure"], "rejected_prefill": ["No"]}}))
    return cfg
