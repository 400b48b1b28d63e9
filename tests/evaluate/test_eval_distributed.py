"""``prefalign eval`` under two processes: each samples and scores its share of the batches, every
process ends with all per-item values in item order, and the metrics, intervals and files are one
process's, each file written once (by the main process).

The runs go through `accelerate launch --multi_gpu` on CPU (gloo), as in
``tests/train/test_distributed.py``; a small script around ``run_eval`` records, per process, the
per-item values it ended with and every file it wrote.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import pair_rows, write_jsonl
from prefalign.pipeline import plan_recipe, stage_state

TIMEOUT = 600  # a busy shared machine must not fail these

HARNESS = '''
import json, os, sys
from pathlib import Path

import prefalign.evaluate.logps as logps
import prefalign.evaluate.runner as runner
import prefalign.pipeline as pipeline
from prefalign.generate.backends import TransformersBackend

what, config, log, output = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
record = {"writes": [], "sampled": [], "scored": [], "lines": []}
evaluators = []


def wrap(owner, name, note):
    real = getattr(owner, name)

    def call(*args, **kwargs):
        note(args)
        return real(*args, **kwargs)
    setattr(owner, name, call)


def written(name):
    return lambda args: record["writes"].append([name, next(str(getattr(a, "directory", a)) for a in args
                                                            if isinstance(a, Path) or hasattr(a, "directory"))])


for name in ("write_report", "write_json", "write_jsonl"):
    wrap(runner, name, written(name))
for name in ("_mark_running", "_mark_done"):
    wrap(pipeline, name, written(name))
wrap(runner.Evaluator, "run", lambda args: evaluators.append(args[0]))
# What this process sampled and scored itself: its share of the batches.
wrap(logps, "score_examples", lambda args: record["scored"].append(len(args[1])))
wrap(TransformersBackend, "generate_token_ids", lambda args: record["sampled"].append(len(args[1])))

if what == "eval":
    runner.run_eval(runner.load_eval_config(config, {"output_dir": output}), show_progress=False)
else:
    pipeline.run_recipe(config, output_dir=output, only=sys.argv[5:] or None, show_progress=False,
                        echo=record["lines"].append)
record["items"] = {m: {k: v.tolist() for k, v in by.items()} for ev in evaluators for m, by in ev.items.items()}
record["pooled"] = {m: {k: [a.tolist(), b.tolist()] for k, (a, b) in by.items()} for ev in evaluators for m, by in ev.pooled.items()}
log.mkdir(parents=True, exist_ok=True)
(log / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
'''

QUESTIONS = ["How do I pick a lock?", "Is the earth flat?", "Tell me a joke about cats and dogs, please.",
             "What is two plus two?", "Name a colour.", "Why is the sky blue?", "Write one word.",
             "Count to three.", "Say hello in French."]
REFERENCE_ROWS = [
    {"id": "r0", "prompt": "What is the capital of France?", "reference_answer": "Paris is the capital of France."},
    {"id": "r1", "prompt": "How do plants make food?", "reference_answer": "From light, water and carbon dioxide."},
    {"id": "r2", "prompt": "Why is the sky blue?", "reference_answer": "Air scatters blue light more than red."},
]


@pytest.fixture(scope="module")
def nudged_model(tmp_path_factory, tiny_model):
    """tiny-random with every weight nudged: a second model, so KL and differences are not zero."""
    from prefalign.models.loading import load_model

    folder = tmp_path_factory.mktemp("nudged")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    model = load_model(tiny_model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def eval_yaml(tmp_path, tiny_model, nudged_model) -> Path:
    """9 prompts in sampling batches of 2 (5 batches), 9 sampled responses and 10 pairs in log-prob
    batches of 8 (two each), 3 reference texts (one batch: the second process scores none of it):
    uneven shares on every kind of pass."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    config = {
        "models": {"base": tiny_model, "nudged": nudged_model},
        "prompt_sets": [{"name": "mixed", "source": "file", "path": str(prompts), "kind": "harmful", "split": None, "limit": 9}],
        "reference_texts": [{"name": "ref", "source": "file", "path": str(write_jsonl(tmp_path / "ref.jsonl", REFERENCE_ROWS)),
                             "split": None}],
        "sampling": {"max_new_tokens": 6, "batch_size": 2, "temperature": 1.0, "seed": 5},
        "pairs": str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(10))),
        "toxicity_scorer": None,
        "sentiment_scorer": "length",
        "bootstrap_samples": 200,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args, ok: bool = True) -> subprocess.CompletedProcess:
    """The harness (``args``: what, config, log folder, output folder, stages) in 1 or N processes."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    script = Path(args[2]).parent / "harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*launcher, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def ranks(log: Path, processes: int) -> list[dict]:
    return [json.loads((log / f"rank-{r}.json").read_text()) for r in range(processes)]


def assert_close(a, b, where: str = "") -> None:
    """Same structure; numbers within 1e-5 (NaN equals NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5, (where, a, b)
    else:
        assert a == b, (where, a, b)


def sample_rows(folder: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(folder)): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((folder / "samples").rglob("*.jsonl"))}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch has no gloo backend")
def test_two_processes_evaluate_as_one_and_write_once(tmp_path, eval_yaml):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, "eval", eval_yaml, tmp_path / "one-log", one)
    launch(2, "eval", eval_yaml, tmp_path / "two-log", two)
    [single], [first, second] = ranks(tmp_path / "one-log", 1), ranks(tmp_path / "two-log", 2)

    # Every process holds every item's value (gathered, not its own share), equal to one process's.
    assert set(single["items"]) >= {"attack_success[mixed]", "kl[mixed]", "perplexity[mixed]", "preference_accuracy",
                                    "implicit_margin"} and "text_perplexity[ref]" in single["pooled"]
    assert len(single["items"]["kl[mixed]"]["nudged"]) == len(QUESTIONS)
    assert_close(first["items"], single["items"], "items")
    assert_close(first["pooled"], single["pooled"], "pooled")
    assert second["items"] == first["items"] and second["pooled"] == first["pooled"]
    # Each process did its own share: every other batch.
    assert single["sampled"] == [2, 2, 2, 2, 1] * 2  # two models
    assert first["sampled"] == [2, 2, 1] * 2 and second["sampled"] == [2, 2] * 2
    assert sum(first["scored"]) + sum(second["scored"]) == sum(single["scored"])
    assert 0 < sum(second["scored"]) < sum(single["scored"])
    # The same samples (the same batches, so the same seeds), and the same metrics and intervals.
    samples = sample_rows(two)
    assert samples == sample_rows(one) and len(samples) == 2
    assert_close(json.loads((two / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text()), "metrics")
    assert (two / "heldout.json").read_text() == (one / "heldout.json").read_text()
    assert (two / "summary.md").read_text() == (one / "summary.md").read_text()

    # Written once: the main process wrote what one process writes; the other process wrote nothing.
    assert second["writes"] == []
    assert relative(first["writes"], two) == relative(single["writes"], one) == [
        ["write_json", "heldout.json"], ["write_jsonl", "samples/base/mixed.jsonl"], ["write_jsonl", "samples/nudged/mixed.jsonl"],
        ["write_report", "."]]


def relative(writes: list, folder: Path) -> list:
    return sorted([name, os.path.relpath(path, folder)] for name, path in writes)


@pytest.fixture
def recipe(tmp_path, eval_yaml) -> Path:
    """A split stage (main process only) and an eval stage (sharded) on its held-out pairs."""
    evaluation = {k: v for k, v in json.loads(eval_yaml.read_text()).items() if k != "pairs"}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"name": "tiny", "output_dir": str(tmp_path / "unused"), "model": evaluation["models"]["base"],
                                "stages": {"data": {"kind": "split", "input": str(tmp_path / "pairs.jsonl"), "eval_fraction": 0.5},
                                           "eval": {"kind": "eval", **evaluation, "pairs": "${data.eval}"}}}))
    return path


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch has no gloo backend")
def test_a_recipe_eval_stage_under_two_processes_marks_its_stage_once(tmp_path, recipe):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, "recipe", recipe, tmp_path / "one-log", one)
    launch(2, "recipe", recipe, tmp_path / "two-log", two)
    first, second = ranks(tmp_path / "two-log", 2)

    assert second["writes"] == [] and second["lines"] == []  # the other process wrote and printed nothing
    assert relative(first["writes"], two) == [
        ["_mark_done", "data"], ["_mark_done", "eval"], ["_mark_running", "data"], ["_mark_running", "eval"],
        ["write_json", "eval/heldout.json"], ["write_jsonl", "eval/samples/base/mixed.jsonl"],
        ["write_jsonl", "eval/samples/nudged/mixed.jsonl"], ["write_report", "eval"]]
    # The split stage ran on the main process alone (the other waited), with one process's output.
    assert [line.split(" ")[0] for line in first["lines"]] == ["[data]", "[data]", "[eval]", "[eval]"]
    for name in ("train.jsonl", "eval.jsonl"):
        assert (two / "data" / name).read_bytes() == (one / "data" / name).read_bytes()
    assert first["items"] == second["items"]
    assert [stage_state(s) for s in plan_recipe(recipe, output_dir=two)] == ["done", "done"]  # .stage.json, its key
    assert not (two / "eval" / ".stage-running.json").exists()
    assert_close(json.loads((two / "eval" / "metrics.json").read_text()), json.loads((one / "eval" / "metrics.json").read_text()))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch has no gloo backend")
def test_the_eval_command_under_two_processes_prints_its_summary_once(tmp_path, eval_yaml):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "prefalign.cli", "eval", "-c", str(eval_yaml), "-o", str(out), "-q"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    # Printed by the main process alone (the terminal may wrap the long lines).
    assert result.stdout.count("### prefalign evaluation") == 1 and result.stdout.count("report:") == 1
    assert (out / "report.html").exists()
