"""The ``score`` stage of a recipe (``prefalign run``): the same work as ``prefalign score``.

    - name: score
      kind: score
      input: ${generate.output}
      scorer: composite
      config: {weights: {profanity: -1.0, sentiment: 0.5}}
      fields: [chosen, rejected]
      # output: defaults to <stage dir>/scored.jsonl

The scorer's config is validated with the recipe, before any stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import ScoreConfigError


class ScoreStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Path
    output: Path
    scorer: str
    config: dict[str, Any] = Field(default_factory=dict)
    fields: list[str] = Field(default_factory=lambda: ["chosen", "rejected"])
    skip_invalid: bool = False
    cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> "ScoreStageConfig":
        from .records import check_fields
        from .registry import parse_config

        from .records import same_file

        try:
            parse_config(self.scorer, self.config, source="config")
            check_fields(self.fields)
        except ScoreConfigError as exc:
            raise ValueError(str(exc)) from None
        if same_file(self.input, self.output):
            raise ValueError("output: is the input file; a score stage writes a new file (leave output out)")
        return self


def run_score_stage(cfg: ScoreStageConfig, *, show_progress: bool = True):
    from .agreement import agreement_table
    from .records import score_file

    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    result = score_file(cfg.input, cfg.output, cfg.scorer, cfg.config, fields=cfg.fields,
                        skip_invalid=cfg.skip_invalid, cache=cfg.cache, show_progress=show_progress)
    agreement = result.agreement()
    if agreement:
        print(agreement_table(agreement))
    return result
