"""Per-step metrics: a JSONL file (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from prefalign.data.io import open_rows, write_jsonl

LOG_FILE = "train_log.jsonl"


class MetricsLogger:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOG_FILE
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional
            self._tb = None

    def log(self, metrics: dict) -> None:
        self._append(metrics)
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, metrics["step"])

    def event(self, row: dict) -> None:
        """A line that is not a step's metrics (e.g. ``{"step": 4, "event": "resumed", ...}``);
        readers of the curves skip it, since it has no metric keys."""
        self._append(row)

    def _append(self, row: dict) -> None:
        # Strict JSON: a non-finite number (never expected: the trainer stops first) becomes null.
        line = json.dumps(_finite(row), allow_nan=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Start a new log: the lines of an earlier run must never mix with this one's."""
        self.path.unlink(missing_ok=True)

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        # A line torn by a kill is skipped: the log is appended to as training goes.
        return [row for _, row in open_rows(self.path)[1] if isinstance(row, dict)]

    def truncate_after(self, step: int) -> None:
        write_jsonl(self.path, [_finite(row) for row in self.history() if row.get("step", 0) <= step])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
