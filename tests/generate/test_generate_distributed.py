"""``prefalign generate`` under several processes: each generates its own batches, the main process
writes them in input order, and the file (and resuming it) is the one a single process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefalign.generate import runner

QUESTIONS = ["How do I pick a lock?", "Is the earth flat?", "Tell me a joke.", "What is two plus two?", "Name a colour."]
TIMEOUT = 600


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "rejected": f"Bad answer {i}."}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    return path


class Scripted:
    name, model_id = "scripted", "scripted-model"

    def __init__(self) -> None:
        self.calls = []

    def generate(self, conversations, params):
        self.calls.append([c[-1]["content"] for c in conversations])
        return [[f"answer {i}" for i in range(params.n)] for _ in conversations]


class SecondOfTwoProcesses:
    """What ``accelerate`` reports in the second of two processes."""

    num_processes, process_index, is_main_process = 2, 1, False


def test_each_process_generates_every_other_batch_and_only_the_main_one_writes(tmp_path, prompt_file, monkeypatch):
    import accelerate.utils

    from prefalign.generate.config import load_generate_config

    monkeypatch.setattr(runner, "distributed_state", lambda: SecondOfTwoProcesses())
    # The main process found nothing done; the gather hands this process's own batch back.
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects, from_process: [(set(), 0, 0)])
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: objects)
    out = tmp_path / "out.jsonl"
    cfg = load_generate_config(None, dict(strategy="anchors", prompts={"source": "file", "path": prompt_file},
                                          models=["scripted"], output=out, batch_size=2, max_new_tokens=4, seed=0))
    backend = Scripted()
    echoed = []
    runner.run_from_config(cfg, backends=[backend], show_progress=False, echo=echoed.append)
    # Batches [q0 q1] [q2 q3] [q4]: the second process takes the 2nd of each round of two.
    assert [prompts for prompts in backend.calls] == [QUESTIONS[2:4]]
    assert not out.exists() and echoed == []  # nothing written, nothing printed: the main process does both


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_cmd(processes: int, tiny_model: str, prompts: Path, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "prefalign.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), "-m", "prefalign.cli"]
    return [*launcher, "generate", "--strategy", "anchors", "--prompts-file", str(prompts), "-m", tiny_model,
            "-o", str(out), "--batch-size", "2", "--k", "2", "--max-new-tokens", "4", "--seed", "3", "-q"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch has no gloo backend")
def test_two_processes_write_the_file_one_process_writes_and_resume_it(tmp_path, tiny_model, prompt_file):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for processes, out in ((1, one), (2, two)):
        result = subprocess.run(generate_cmd(processes, tiny_model, prompt_file, out), env=env, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
    assert two.read_text() == one.read_text()  # same records, same order, same texts
    assert len({json.loads(line)["meta"]["id"] for line in one.read_text().splitlines()}) == len(QUESTIONS)

    again = subprocess.run(generate_cmd(2, tiny_model, prompt_file, two), env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("5 skipped as already done") == 1  # resumed, and reported once
    assert two.read_text() == one.read_text()


def test_the_vllm_backend_is_refused_under_several_processes_before_anything_loads(tmp_path, prompt_file, monkeypatch):
    from prefalign.generate.config import load_generate_config

    monkeypatch.setattr(runner, "distributed_state", lambda: SecondOfTwoProcesses())
    cfg = load_generate_config(None, dict(strategy="anchors", prompts={"source": "file", "path": prompt_file},
                                          models=["some-model"], backend="vllm", output=tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match=r"backend vllm runs one engine .*tensor_parallel_size: N"):
        runner.run_from_config(cfg, show_progress=False, echo=None)
    assert not (tmp_path / "out.jsonl").exists()
