"""Peak memory of a training run: host RSS and, on CUDA, the allocator's high-water mark.

Both are high-water marks since the process started (the kernel's ``ru_maxrss`` cannot be reset),
so a step's value says "the run has needed this much so far" and a jump shows the step that grew it.
The CUDA mark is read, never reset, so code elsewhere that reads it is not disturbed.
"""

from __future__ import annotations

import sys

import torch

MIB = 1024 * 1024


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size, or None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows: psutil's peak working set, if psutil is there
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except Exception:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Reads the peaks after each step; ``metrics()`` goes into the step's log row, ``summary()``
    into ``train_summary.json``."""

    def __init__(self, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else None
        self.cuda_device = device if device is not None and device.type == "cuda" else None
        self.peak: dict[str, float] = {}

    def metrics(self) -> dict[str, float]:
        row: dict[str, float] = {}
        rss = peak_rss_bytes()
        if rss is not None:
            row["memory/peak_rss_mib"] = rss / MIB
        if self.cuda_device is not None:
            row["memory/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.cuda_device) / MIB
        for key, value in row.items():
            self.peak[key] = max(value, self.peak.get(key, 0.0))
        return row

    def summary(self) -> dict[str, float]:
        """The run's peaks (``memory/...`` keys without the prefix); a fresh read if no step ran."""
        if not self.peak:
            self.metrics()
        return {key.removeprefix("memory/"): round(value, 1) for key, value in self.peak.items()}
