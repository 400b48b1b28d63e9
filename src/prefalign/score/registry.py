"""Scorer names -> (typed config, factory), and :func:`make_scorer` to build one by name.

A new scorer is a config class, a class with ``name`` and ``score``, and one :class:`ScorerSpec`
added to :data:`SCORERS` below; nothing else branches on scorer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefalign.configfile import read_yaml_mapping
from pydantic import ValidationError

from . import composite, judge, refusal, reward_model, simple, toxicity
from .base import Prompt, Scorer, ScoreConfigError, ScorerConfig, ScorerSpec, format_validation_error
from .cache import BatchedScorer, ScoreCache

SCORERS: dict[str, ScorerSpec] = {
    spec.name: spec
    for spec in (
        simple.PROFANITY_SPEC,
        toxicity.SPEC,
        simple.SENTIMENT_SPEC,
        refusal.SPEC,
        simple.LENGTH_SPEC,
        reward_model.SPEC,
        judge.SPEC,
        composite.SPEC,
    )
}


def get_spec(name: str) -> ScorerSpec:
    try:
        return SCORERS[name]
    except KeyError:
        raise ScoreConfigError(f"unknown scorer '{name}'; known: {', '.join(SCORERS)}") from None


def parse_config(name: str, values: dict[str, Any] | ScorerConfig | None = None, *, source: str = "config") -> ScorerConfig:
    """Validate ``values`` as the config of scorer ``name`` (types, ranges, unknown keys)."""
    spec = get_spec(name)
    if isinstance(values, spec.config_cls):
        return values
    if isinstance(values, ScorerConfig):
        raise ScoreConfigError(f"{source}: a {type(values).__name__} is not a config for scorer '{name}'")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ScoreConfigError(f"{source}: the config of scorer '{name}' must be a mapping of field: value")
    try:
        return spec.config_cls.model_validate(values)
    except ValidationError as exc:
        raise ScoreConfigError(format_validation_error(exc, source)) from None


def load_config_file(name: str, path: str | Path) -> ScorerConfig:
    """Read a YAML file holding the scorer's config (a mapping) and validate it."""
    return parse_config(name, read_yaml_mapping(path, ScoreConfigError), source=str(path))


def make_scorer(
    name: str,
    config: dict[str, Any] | ScorerConfig | None = None,
    *,
    cache: bool | ScoreCache = True,
    show_progress: bool = True,
) -> Scorer:
    """Build the scorer registered as ``name``, batched and (unless ``cache=False``) cached.

    ``cache`` may be a :class:`ScoreCache` (another file) or a bool (the default file / none).
    """
    spec = get_spec(name)
    cfg = parse_config(name, config)
    if not spec.batched:
        return spec.factory(cfg, cache=cache, show_progress=show_progress)
    store = cache if isinstance(cache, ScoreCache) else (ScoreCache() if cache else None)
    return BatchedScorer(spec.factory(cfg), cache=store, show_progress=show_progress)


def score_texts(
    scorer: str | Scorer,
    texts: Sequence[str],
    prompts: Sequence[Prompt] | None = None,
    config: dict[str, Any] | ScorerConfig | None = None,
    **make_kwargs,
) -> list[float]:
    """One-shot ``texts -> floats``: ``score_texts("sentiment", ["I love this"])``."""
    built = make_scorer(scorer, config, **make_kwargs) if isinstance(scorer, str) else scorer
    return built.score(texts, prompts)
