"""Peak memory in the training log (every step) and in train_summary.json, on tiny-random."""

import json

import pytest
import torch

from prefalign.train.config import TrainConfig
from prefalign.train.loop import run_training
from prefalign.train.memory import PeakMemory, peak_rss_bytes


def test_peak_rss_is_at_least_the_current_rss():
    psutil = pytest.importorskip("psutil")
    peak = peak_rss_bytes()
    assert peak is not None and peak >= psutil.Process().memory_info().rss * 0.99


def test_cpu_run_reports_rss_only_and_peaks_never_fall():
    memory = PeakMemory(torch.device("cpu"))
    first = memory.metrics()
    assert set(first) == {"memory/peak_rss_mib"}  # no CUDA key off CUDA
    blob = bytearray(64 * 1024 * 1024)  # touch 64 MiB so the process's high-water mark rises
    blob[:: 4096] = b"x" * len(blob[:: 4096])
    second = memory.metrics()
    assert second["memory/peak_rss_mib"] >= first["memory/peak_rss_mib"]
    assert memory.summary() == {"peak_rss_mib": round(second["memory/peak_rss_mib"], 1)}


def test_training_logs_peak_memory_each_step_and_in_the_summary(tmp_path, tiny_model, pairs_file):
    config = TrainConfig(model=tiny_model, data=pairs_file, output_dir=tmp_path / "out", max_steps=3, batch_size=4,
                         lr=1e-3, save_every=100, ref_cache_dir=tmp_path / "ref", max_length=64, max_prompt_length=32)
    result = run_training(config, show_progress=False)
    rows = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    peaks = [r["memory/peak_rss_mib"] for r in rows if "loss" in r]
    assert len(peaks) == 3 and peaks == sorted(peaks) and peaks[0] > 0
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["peak_memory"]["peak_rss_mib"] == pytest.approx(peaks[-1], abs=0.05)
    # The trainer uses CUDA whenever it is there; then the allocator's high-water mark is logged too.
    assert ("memory/cuda_max_allocated_mib" in rows[0]) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert summary["peak_memory"]["cuda_max_allocated_mib"] > 0
