"""``popalign``: all six PopAlign contrasts (Wang et al. 2024, arXiv:2410.13785) the given models
allow, one record per prompt and contrast, each tagged with its contrast in ``meta.strategy``.

``prefix``, ``demon``, ``elicitive`` and ``refine`` use the first model; ``nparam`` and
``leaderboard`` need at least two and are skipped (with the reason logged and reported in the
summary) when only one is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field

from prefalign.data.prompts import Prompt
from prefalign.generate.core import Candidate, Strategy, StrategyConfig
from prefalign.generate.demon import DemonConfig, DemonContrast
from prefalign.generate.elicitive import ElicitiveConfig, ElicitiveContrast
from prefalign.generate.leaderboard import LeaderboardConfig, LeaderboardContrast
from prefalign.generate.nparam import NParamConfig, NParamContrast
from prefalign.generate.prefix import PrefixConfig, PrefixContrast
from prefalign.generate.refine import RefineConfig, RefineContrast

log = logging.getLogger("prefalign.generate")

Contrast = Literal["prefix", "demon", "elicitive", "nparam", "leaderboard", "refine"]
CONTRASTS: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (PrefixContrast, DemonContrast, ElicitiveContrast, NParamContrast, LeaderboardContrast, RefineContrast)
}


class PopAlignConfig(StrategyConfig):
    """All PopAlign contrasts; each has its own section."""

    contrasts: list[Contrast] = Field(
        default_factory=lambda: list(CONTRASTS), min_length=1, description="which contrasts to run"
    )
    chosen_prefill: list[str] = Field(
        default_factory=list,
        description="openings every contrast that supports it (prefix, demon, refine) starts its chosen answer with; "
                    "'@refusal' = the refusal openings. Elicitive (its thought comes first) and the model-level "
                    "contrasts are left as they are.",
    )
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    demon: DemonConfig = Field(default_factory=DemonConfig)
    elicitive: ElicitiveConfig = Field(default_factory=ElicitiveConfig)
    nparam: NParamConfig = Field(default_factory=NParamConfig)
    leaderboard: LeaderboardConfig = Field(default_factory=LeaderboardConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)


class PopAlign(Strategy):
    name: ClassVar[str] = "popalign"
    Config = PopAlignConfig
    description = "PopAlign: every contrast the models allow (prefix, demon, elicitive, nparam, leaderboard, refine)"

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.parts: list[Strategy] = []
        self.skipped: dict[str, str] = {}
        for name in dict.fromkeys(self.config.contrasts):
            cls = CONTRASTS[name]
            if len(ctx.backends) < cls.min_models:
                reason = f"needs at least {cls.min_models} models (--model given {len(ctx.backends)} time(s))"
                log.warning("popalign: skipping the %s contrast: %s", name, reason)
                self.skipped[name] = reason
                continue
            part_config = getattr(self.config, name)
            if self.config.chosen_prefill and "chosen_prefill" in type(part_config).model_fields:
                part_config = part_config.model_copy(update={"chosen_prefill": list(self.config.chosen_prefill)})
            self.parts.append(cls(part_config, ctx))
        if not self.parts:
            raise ValueError(f"popalign: no contrast can run ({self.skipped})")

    def model_ids(self) -> list[str]:
        ids: list[str] = []
        for part in self.parts:
            ids += [m for m in part.model_ids() if m not in ids]
        return ids

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        out: list[list[Candidate]] = [[] for _ in prompts]
        for part in self.parts:
            for i, candidates in enumerate(part.generate(prompts, seed)):
                out[i].extend(candidates)
        return out

    def info(self) -> dict:
        return {"contrasts": [p.name for p in self.parts], "skipped_contrasts": dict(self.skipped)}
