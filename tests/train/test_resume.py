"""`prefalign train --resume` after `kill -9` reaches the same losses as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import pair_rows, write_jsonl

SLOW_ENOUGH_STEPS = 12


def train_cmd(tiny_model, data, out, _unused, *extra):
    return [
        sys.executable, "-m", "prefalign.cli", "train", "--model", tiny_model, "--data", str(data),
        "--output-dir", str(out), "--max-steps", str(SLOW_ENOUGH_STEPS), "--batch-size", "2", "--lr", "1e-3",
        "--save-every", "3", "--seed", "7", "--quiet", *extra,
    ]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    env = {**os.environ, "PREFALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    # Keep tiny-random from the shared cache: only reference log-probs go to the fresh cache.
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(tiny_model, data, straight, None), check=True, env=env, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_model, data, killed, None), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Kill once a checkpoint exists and the run has gone past it, mid-way between checkpoints.
    while time.time() < deadline:
        log = killed / "train_log.jsonl"
        if (killed / "checkpoints" / "step-00000003").exists() and log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < SLOW_ENOUGH_STEPS

    result = subprocess.run(train_cmd(tiny_model, data, killed, None, "--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, SLOW_ENOUGH_STEPS + 1))  # no step missing or logged twice
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_resume_refuses_changed_settings(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    cmd = train_cmd(tiny_model, data, out, None)
    cmd[cmd.index("--max-steps") + 1] = "2"
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)
    # beta changes the loss itself: not an optimiser setting (lr may change: tests/test_reliability.py).
    result = subprocess.run([*cmd, "--beta", "0.5", "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 2
    assert "different settings for ['beta']" in result.stderr
