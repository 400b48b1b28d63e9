"""Scorers for strategies that rank texts: any callable ``texts -> floats``.

Until prefalign has its own scoring step, a scorer is either given programmatically (a callable),
or named in the config:

* ``toxicity``: probability of offensive language from ``alt-profanity-check``
  (``pip install alt-profanity-check``; used only when importable);
* ``non-toxicity``: ``1 - toxicity``;
* ``module.path:function``: any importable callable ``(list[str]) -> list[float]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from prefalign.generate.core import Scorer

PROFANITY_INSTALL = "pip install alt-profanity-check"


def _profanity():
    try:
        from profanity_check import predict_prob  # type: ignore[import-not-found]
    except ImportError:
        raise ModuleNotFoundError(
            f"the 'toxicity' scorer uses alt-profanity-check, which is not installed ({PROFANITY_INSTALL}); "
            "or name another scorer ('module:function') / pass a callable",
            name="profanity_check",
        ) from None
    return predict_prob


def toxicity(texts: Sequence[str]) -> list[float]:
    if not texts:
        return []
    return [float(x) for x in _profanity()(list(texts))]


def non_toxicity(texts: Sequence[str]) -> list[float]:
    return [1.0 - s for s in toxicity(texts)]


NAMED_SCORERS: dict[str, Scorer] = {"toxicity": toxicity, "non-toxicity": non_toxicity}


def profanity_check_available() -> bool:
    return importlib.util.find_spec("profanity_check") is not None


def resolve_scorer(spec: str | Callable | None, *, default: str | None = None, what: str = "this strategy") -> Scorer:
    """A scorer from a callable, a registered name or ``module:function``."""
    if callable(spec):
        return spec
    if spec is None:
        if default is None:
            raise ValueError(f"{what} needs a scorer: set 'scorer' (toxicity, non-toxicity or module:function) or pass one")
        if default in ("toxicity", "non-toxicity") and not profanity_check_available():
            raise ValueError(
                f"{what} needs a scorer: its default '{default}' uses alt-profanity-check, which is not "
                f"installed ({PROFANITY_INSTALL}); set 'scorer: module:function' or pass a callable"
            )
        spec = default
    if spec in NAMED_SCORERS:
        if spec in ("toxicity", "non-toxicity"):
            _profanity()  # fail now, not after generating
        return NAMED_SCORERS[spec]
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"scorer: '{spec}' is neither {' nor '.join(NAMED_SCORERS)} nor 'module:function'")
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
