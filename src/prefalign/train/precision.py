"""Which precision to train in: ``dtype: auto`` picks bf16 autocast only where the hardware runs
it fast, fp32 elsewhere.

bf16 autocast is a speed option, not a free one: on a CPU without native bf16 matmuls (no
AVX512-BF16 or AMX) PyTorch emulates them and a step runs several times *slower* than fp32 (see
``benchmarks/README.md``); on a recent GPU it is faster and halves activation memory. Weights
stay fp32 either way (autocast), so checkpoints and reference log-probs do not change format.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("prefalign.train")

# CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_is_fast(device: str | None = None, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether bf16 autocast should speed training up on ``device`` (default: CUDA if present),
    and why."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"GPU {torch.cuda.get_device_name()} supports bf16"
        return False, "this GPU has no native bf16"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return True, f"CPU has {', '.join(native)}"
    return False, "CPU has no AVX512-BF16/AMX, where bf16 is emulated and slower than fp32"


#: Set to float32 or bfloat16, this decides what ``dtype: auto`` means on every machine (the tests
#: set float32, so their numbers do not depend on which CPU runs them).
AUTO_DTYPE_ENV = "PREFALIGN_AUTO_DTYPE"


def resolve_dtype(requested: str, device: str | None = None, flags: frozenset[str] | None = None) -> str:
    """``float32`` or ``bfloat16`` for a config's ``dtype`` (``auto`` decides by the hardware, or by
    ``$PREFALIGN_AUTO_DTYPE``)."""
    if requested != "auto":
        return requested
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"${AUTO_DTYPE_ENV}: expected float32 or bfloat16, got {forced!r}")
        log.info("dtype auto -> %s ($%s)", forced, AUTO_DTYPE_ENV)
        return forced
    fast, why = bf16_is_fast(device, flags)
    chosen = "bfloat16" if fast else "float32"
    log.info("dtype auto -> %s (%s)", chosen, why)
    return chosen
