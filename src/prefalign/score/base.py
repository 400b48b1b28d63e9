"""The scorer interface, typed configs and the registry entry every scorer provides.

A scorer maps response texts (and, for scorers that read them, their prompts) to floats. A score
that could not be computed (an LLM judge whose answer holds no number in range) is ``NaN``, never a
silent 0; :func:`prefalign.score.records.score_records` counts those as *unparsed*.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prefalign.configfile import validation_messages
from pydantic import BaseModel, ConfigDict, ValidationError

#: A prompt as records hold it: plain text, a list of chat messages, or None (no prompt).
Prompt = str | list[dict] | None


class ScoreConfigError(ValueError):
    """A scorer name or config is invalid; the message names the source and the field."""


class ScorerUnavailableError(RuntimeError):
    """A scorer's optional package (or data file) is missing; the message says what to install."""


@runtime_checkable
class Scorer(Protocol):
    """``score(texts, prompts)`` returns one float per text (NaN where no score could be made).

    ``prompts``, when given, is parallel to ``texts``; scorers that ignore prompts accept it too.
    Optional attributes that the caching wrapper reads: ``cache_id`` (a string identifying the
    scorer, its config and its model; ``None`` turns caching off) and ``batch_size``.
    """

    name: str

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]: ...


class ScorerConfig(BaseModel):
    """Base of every scorer's config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ScorerSpec:
    """A registry entry: the scorer's name, its config model and a factory ``config -> Scorer``.

    ``batched=False`` marks scorers that batch and cache through the scorers they hold (composite),
    so :func:`prefalign.score.make_scorer` does not wrap them again.
    """

    name: str
    config_cls: type[ScorerConfig]
    factory: Callable[[Any], Scorer]
    description: str
    batched: bool = True


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_id(name: str, config: ScorerConfig, *extra: Any) -> str:
    """The cache identity of a scorer: name, full config (defaults included) and extra parts."""
    return canonical_json([name, config.model_dump(mode="json"), *extra])


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    return validation_messages(err, source, prefix)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: chat messages become ``Role: content`` lines."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}" for m in prompt)


def check_inputs(texts: Sequence[str], prompts: Sequence[Prompt] | None) -> list[Prompt]:
    """Check the arguments of ``score``; returns the prompts as a list (Nones when not given)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, found {type(t).__name__}")
    if prompts is None:
        return [None] * len(texts)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence (one per text), not a single string")
    if len(prompts) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(prompts)} prompts")
    return list(prompts)


def is_unparsed(value: float) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
