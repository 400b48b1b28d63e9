"""Per-step metrics: a JSONL file (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, metrics["step"])

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
        return out

    def truncate_after(self, step: int) -> None:
        kept = [row for row in self.history() if row.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
