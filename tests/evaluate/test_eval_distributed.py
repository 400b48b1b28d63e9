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

TIMEOUT = 600  # a busy shared machine must not fail these

HARNESS = '''
import json, os, sys
from pathlib import Path

import prefalign.evaluate.runner as runner

rank = int(os.environ.get("RANK", "0"))
writes, evaluators = [], []


def recorded(name, real):
    def call(*args, **kwargs):
        writes.append([name, next(str(a) for a in args if isinstance(a, Path))])
        return real(*args, **kwargs)
    return call


for name in ("write_report", "write_json_atomic", "_write_rows_atomic"):
    setattr(runner, name, recorded(name, getattr(runner, name)))
real_run = runner.Evaluator.run


def run(self):
    evaluators.append(self)
    return real_run(self)


runner.Evaluator.run = run
# What this process sampled and scored itself: its share of the batches.
import prefalign.evaluate.logps as logps
from prefalign.generate.backends import TransformersBackend

work = {"sampled": [], "scored": []}
real_score, real_generate = logps.score_examples, TransformersBackend.generate_token_ids


def score_examples(model, examples, *args):
    work["scored"].append(len(examples))
    return real_score(model, examples, *args)


def generate_token_ids(self, conversations, params):
    work["sampled"].append(len(conversations))
    return real_generate(self, conversations, params)


logps.score_examples, TransformersBackend.generate_token_ids = score_examples, generate_token_ids
config = runner.load_eval_config(Path(sys.argv[1]), {"output_dir": sys.argv[2]})
runner.run_eval(config, show_progress=False)
ev = evaluators[0]
Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
Path(sys.argv[3], f"rank-{rank}.json").write_text(json.dumps({
    "writes": writes,
    "work": work,
    "items": {m: {k: v.tolist() for k, v in by.items()} for m, by in ev.items.items()},
    "pooled": {m: {k: [a.tolist(), b.tolist()] for k, (a, b) in by.items()} for m, by in ev.pooled.items()},
}))
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


def launch(processes: int, script: Path, *args) -> None:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*launcher, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


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
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, script, eval_yaml, one, tmp_path / "one-log")
    launch(2, script, eval_yaml, two, tmp_path / "two-log")
    single = json.loads((tmp_path / "one-log" / "rank-0.json").read_text())
    first, second = (json.loads((tmp_path / "two-log" / f"rank-{r}.json").read_text()) for r in (0, 1))

    # Every process holds every item's value (gathered, not its own share), equal to one process's.
    assert set(single["items"]) >= {"attack_success[mixed]", "kl[mixed]", "perplexity[mixed]", "preference_accuracy",
                                    "implicit_margin"} and "text_perplexity[ref]" in single["pooled"]
    assert len(single["items"]["kl[mixed]"]["nudged"]) == len(QUESTIONS)
    assert_close(first["items"], single["items"], "items")
    assert_close(first["pooled"], single["pooled"], "pooled")
    assert second["items"] == first["items"] and second["pooled"] == first["pooled"]
    # Each process did its own share: every other batch.
    assert single["work"]["sampled"] == [2, 2, 2, 2, 1] * 2  # two models
    assert first["work"]["sampled"] == [2, 2, 1] * 2 and second["work"]["sampled"] == [2, 2] * 2
    assert sum(first["work"]["scored"]) + sum(second["work"]["scored"]) == sum(single["work"]["scored"])
    assert 0 < sum(second["work"]["scored"]) < sum(single["work"]["scored"])
    # The same samples (the same batches, so the same seeds), and the same metrics and intervals.
    samples = sample_rows(two)
    assert samples == sample_rows(one) and len(samples) == 2
    assert_close(json.loads((two / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text()), "metrics")
    assert (two / "heldout.json").read_text() == (one / "heldout.json").read_text()
    assert (two / "summary.md").read_text() == (one / "summary.md").read_text()

    # Written once: the main process wrote what one process writes; the other process wrote nothing.
    assert second["writes"] == []
    assert relative(first["writes"], two) == relative(single["writes"], one) == [
        ["_write_rows_atomic", "samples/base/mixed.jsonl"], ["_write_rows_atomic", "samples/nudged/mixed.jsonl"],
        ["write_json_atomic", "heldout.json"], ["write_report", "."]]


def relative(writes: list, folder: Path) -> list:
    return sorted([name, os.path.relpath(path, folder)] for name, path in writes)
