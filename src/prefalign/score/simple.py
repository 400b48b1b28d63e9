"""Light scorers from PyPI packages (no neural network): ``profanity``, ``sentiment``, ``length``.

* ``profanity``: P(offensive) from ``alt-profanity-check`` (a linear SVM on TF-IDF, calibrated;
  ``from profanity_check import predict_prob``). Weak but fast; needs scikit-learn + joblib.
* ``sentiment``: VADER (``vaderSentiment``) compound polarity in [-1, 1], or its pos/neu/neg share.
* ``length``: characters, whitespace-separated words, or tokens of a tokenizer (a registry name
  or a local HF folder).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from .base import Prompt, ScorerConfig, ScorerSpec, ScorerUnavailableError, check_inputs, config_id


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- profanity

PROFANITY_INSTALL = "pip install alt-profanity-check==1.9.1"


class ProfanityConfig(ScorerConfig):
    batch_size: int = Field(256, gt=0)


class ProfanityScorer:
    name = "profanity"

    def __init__(self, config: ProfanityConfig | None = None) -> None:
        self.config = config or ProfanityConfig()
        self.batch_size = self.config.batch_size
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ScorerUnavailableError(f"the 'profanity' scorer needs alt-profanity-check: {PROFANITY_INSTALL}") from None
        self._predict = predict_prob
        self.cache_id = config_id(self.name, self.config, _version("alt-profanity-check"))

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        check_inputs(texts, prompts)
        if not texts:
            return []
        return [float(p) for p in self._predict(list(texts))]


# --------------------------------------------------------------------------- sentiment

VADER_INSTALL = "pip install vaderSentiment==3.3.2"


class SentimentConfig(ScorerConfig):
    field: Literal["compound", "pos", "neu", "neg"] = "compound"
    batch_size: int = Field(256, gt=0)


class SentimentScorer:
    name = "sentiment"

    def __init__(self, config: SentimentConfig | None = None) -> None:
        self.config = config or SentimentConfig()
        self.batch_size = self.config.batch_size
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ScorerUnavailableError(f"the 'sentiment' scorer needs vaderSentiment: {VADER_INSTALL}") from None
        self._analyzer = SentimentIntensityAnalyzer()
        self.cache_id = config_id(self.name, self.config, _version("vaderSentiment"))

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        check_inputs(texts, prompts)
        return [float(self._analyzer.polarity_scores(t)[self.config.field]) for t in texts]


# --------------------------------------------------------------------------- length


class LengthConfig(ScorerConfig):
    unit: Literal["chars", "words", "tokens"] = "chars"
    tokenizer: str | None = Field(None, description="registry name or HF folder; needed for unit 'tokens'")
    batch_size: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LengthConfig":
        if self.unit == "tokens" and not self.tokenizer:
            raise ValueError("tokenizer: unit 'tokens' needs a tokenizer (e.g. smollm2-135m-instruct or a folder)")
        if self.unit != "tokens" and self.tokenizer:
            raise ValueError(f"tokenizer: only used with unit 'tokens' (unit is '{self.unit}')")
        return self


class LengthScorer:
    name = "length"

    def __init__(self, config: LengthConfig | None = None) -> None:
        self.config = config or LengthConfig()
        self.batch_size = self.config.batch_size
        self._tokenizer = None
        if self.config.unit == "tokens":
            from prefalign.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.tokenizer)
        self.cache_id = None  # lengths are cheaper to compute than to look up

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        check_inputs(texts, prompts)
        if self.config.unit == "chars":
            return [float(len(t)) for t in texts]
        if self.config.unit == "words":
            return [float(len(t.split())) for t in texts]
        if not texts:
            return []
        ids = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [float(len(x)) for x in ids]


PROFANITY_SPEC = ScorerSpec("profanity", ProfanityConfig, ProfanityScorer, "P(offensive) from alt-profanity-check")
SENTIMENT_SPEC = ScorerSpec("sentiment", SentimentConfig, SentimentScorer, "VADER compound polarity in [-1, 1]")
LENGTH_SPEC = ScorerSpec("length", LengthConfig, LengthScorer, "length in characters, words or tokens")
