"""Atomic checkpoints: model/adapters, optimizer, scheduler and RNG through ``accelerate``,
plus the trainer's own position. A checkpoint folder appears under its final name only once it
is complete, so a ``kill -9`` at any moment leaves the previous one intact; the trainer renames it
into place only once the next forward pass has shown that its weights give a finite loss."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
PENDING_PREFIX = ".partial-"  # a checkpoint being written, or not yet known to be good


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def write_pending(accelerator, output_dir: Path, state: dict) -> Path:
    """Write a checkpoint into a hidden folder that no reader takes for a checkpoint yet; it
    becomes one with :func:`commit_checkpoint` once its weights are known to give a finite loss
    (or is thrown away with :func:`discard_pending`)."""
    root = checkpoints_dir(output_dir)
    tmp = root / f"{PENDING_PREFIX}step-{state['step']:08d}"
    # Every process calls this: accelerate writes the weights and optimizer from the main one and
    # an RNG file per process; the folder is cleared before anyone writes into it.
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    return tmp


def commit_checkpoint(output_dir: Path, pending: Path, keep: int) -> Path:
    """Rename a pending checkpoint into place (atomic) and keep only the last ``keep``."""
    final = pending.parent / pending.name.removeprefix(PENDING_PREFIX)
    if final.exists():
        shutil.rmtree(final)
    os.replace(pending, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard_pending(pending: Path | None) -> None:
    if pending is not None:
        shutil.rmtree(pending, ignore_errors=True)


def drop_checkpoints(output_dir: Path) -> None:
    """Remove a finished run's checkpoints (weights + optimizer state, ~3x the model), for callers
    that will never resume it: its final model and logs stay."""
    shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
