"""Scoring: reward signals for responses (``texts -> floats``) and ``prefalign score``.

    from prefalign.score import make_scorer, score_records, score_texts
    scorer = make_scorer("sentiment")                  # batched, cached on disk, progress bar
    scorer.score(["I love this", "I hate this"])       # [0.6369, -0.5719]
    score_texts("refusal", ["I can't help with that."])  # [1.0]
    make_scorer("composite", {"weights": {"profanity": -1.0, "sentiment": 0.5}})

Scorers (see :data:`SCORERS`): ``profanity``, ``toxicity``, ``sentiment``, ``refusal``,
``length``, ``reward-model``, ``judge``, ``composite``. Unparsed scores are NaN.
"""

from .base import Prompt, Scorer, ScoreConfigError, ScorerConfig, ScorerSpec, ScorerUnavailableError
from .cache import BatchedScorer, ScoreCache
from .judge import JudgeScorer, parse_score
from .records import ScoreResult, score_file, score_records
from .registry import SCORERS, get_spec, load_config_file, make_scorer, parse_config, score_texts

__all__ = [
    "BatchedScorer",
    "JudgeScorer",
    "Prompt",
    "SCORERS",
    "ScoreCache",
    "ScoreConfigError",
    "ScoreResult",
    "Scorer",
    "ScorerConfig",
    "ScorerSpec",
    "ScorerUnavailableError",
    "get_spec",
    "load_config_file",
    "make_scorer",
    "parse_config",
    "parse_score",
    "score_file",
    "score_records",
    "score_texts",
]
