"""``composite``: a weighted sum of other scorers.

Config::

    weights: {profanity: -1.0, sentiment: 0.5, "reward-model#helpful": 2.0}
    configs: {"reward-model#helpful": {model: runs/rm}}    # per-component configs (optional)

A key is a scorer name, optionally with ``#alias`` so one scorer can appear twice with different
configs. Every component config is validated with the composite's. Each component is batched and
cached on its own; if any component gives NaN (unparsed) for a text, the sum is NaN there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import Field, ValidationError, model_validator

from .base import Prompt, ScorerConfig, ScorerSpec, check_inputs, format_validation_error


def base_name(key: str) -> str:
    return key.split("#", 1)[0]


class CompositeConfig(ScorerConfig):
    weights: dict[str, float] = Field(..., min_length=1)
    configs: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "CompositeConfig":
        from .registry import SCORERS

        for key, weight in self.weights.items():
            name = base_name(key)
            if name not in SCORERS:
                raise ValueError(f"weights: unknown scorer '{name}'; known: {', '.join(sorted(SCORERS))}")
            if name == "composite":
                raise ValueError("weights: a composite cannot contain another composite")
            if not math.isfinite(weight):
                raise ValueError(f"weights.{key}: must be a finite number")
        for key, values in self.configs.items():
            if key not in self.weights:
                raise ValueError(f"configs: '{key}' has a config but no weight")
            try:
                SCORERS[base_name(key)].config_cls.model_validate(values)
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, "composite", f"configs.{key}")) from None
        return self


class CompositeScorer:
    """``sum_k weight_k * scorer_k(text)``; ``components`` maps each key to ``(weight, scorer)``."""

    name = "composite"
    cache_id = None

    def __init__(self, components: dict[str, tuple[float, Any]]) -> None:
        if not components:
            raise ValueError("a composite needs at least one component")
        self.components = components
        self.uses_prompts = any(getattr(s, "uses_prompts", False) for _, s in components.values())

    def score_components(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> dict[str, list[float]]:
        check_inputs(texts, prompts)
        return {key: scorer.score(texts, prompts) for key, (_, scorer) in self.components.items()}

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        parts = self.score_components(texts, prompts)
        out = []
        for i in range(len(texts)):
            total = 0.0
            for key, (weight, _) in self.components.items():
                total += weight * parts[key][i]  # NaN propagates
            out.append(total)
        return out


def make_composite(config: CompositeConfig, **make_kwargs) -> CompositeScorer:
    from .registry import make_scorer

    return CompositeScorer({
        key: (weight, make_scorer(base_name(key), config.configs.get(key, {}), **make_kwargs))
        for key, weight in config.weights.items()
    })


SPEC = ScorerSpec("composite", CompositeConfig, make_composite, "weighted sum of other scorers", batched=False)
