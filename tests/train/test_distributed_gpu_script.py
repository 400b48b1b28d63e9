"""benchmarks/distributed_gpu.sh, run where it can be here (one process, no GPU): the GPU check is
rare and short, so a script that breaks (a shell error, a run compared with another's cached
reference, a LoRA run without a model folder) must break here first. Every row is one process
doing the work of the plain run, so every gap must be 0 up to float rounding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_gpu.sh"


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_rows_equal_the_plain_run(tmp_path, tiny_model):
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "GPUS": "1", "MODEL": str(tiny_model), "STEPS": "2", "BATCH": "4",
           "ENGINES": "ddp", "VARIANTS": "plain lora", "OUT": str(out), "PREFALIGN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0].endswith(("-plain", "-lora"))}
    assert set(rows) == {f"{run}-{variant}" for run in ("one-gpu", "cpu", "ddp") for variant in ("plain", "lora")}
    for name, cells in rows.items():
        loss_gap, weight_gap = float(cells[2]), float(cells[3])
        assert loss_gap <= 1e-5 and weight_gap <= 1e-5, (name, cells)
    # Each run computed its own reference (a cache of its own), none read another run's.
    for name in rows:
        log = (out / f"{name}.log").read_text()
        assert "cache hit" not in log, name
        assert (out / f"{name}.cache" / "ref-logps").is_dir(), name
