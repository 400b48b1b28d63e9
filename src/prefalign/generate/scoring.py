"""Scorers for strategies that rank texts: any callable ``texts -> floats``.

A scorer is given programmatically (a callable) or named in the config:

* a scorer of :mod:`prefalign.score` (``profanity``, ``toxicity``, ``sentiment``, ``refusal``,
  ``length``, ...), batched and cached like ``prefalign score``;
* ``module.path:function``: any importable callable ``(list[str]) -> list[float]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from prefalign.generate.core import Scorer


def _registered(name: str) -> Scorer | None:
    from prefalign.score import SCORERS, make_scorer

    if name not in SCORERS:
        return None
    scorer = make_scorer(name, show_progress=False)
    return lambda texts: scorer.score(list(texts))


def resolve_scorer(spec: str | Callable | None, *, default: str | None = None, what: str = "this strategy") -> Scorer:
    """A scorer from a callable, a registered name or ``module:function``."""
    if callable(spec):
        return spec
    spec = spec or default
    if spec is None:
        raise ValueError(f"{what} needs a scorer: set 'scorer' (a prefalign scorer name or module:function) or pass one")
    registered = _registered(spec)
    if registered is not None:
        return registered
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        from prefalign.score import SCORERS

        raise ValueError(f"scorer: '{spec}' is neither a scorer ({', '.join(SCORERS)}) nor 'module:function'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"scorer: cannot import '{spec}' ({exc})") from None
    if not callable(obj):
        raise ValueError(f"scorer: '{spec}' is not callable")
    return obj


def score_texts(scorer: Scorer, texts: Sequence[str]) -> list[float]:
    """Call the scorer and check it gave one finite number per text."""
    if not texts:
        return []
    scores = list(scorer(list(texts)))
    if len(scores) != len(texts):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(texts)} texts")
    out = []
    for s in scores:
        value = float(s)
        if not math.isfinite(value):
            raise ValueError(f"scorer returned a non-finite score ({s!r})")
        out.append(value)
    return out
