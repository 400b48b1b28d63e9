"""``anchors``: D2O's self-sampled anchors (Duan et al. 2024, "Negating Negatives: Alignment with
Human Negative Samples via Distributional Dispreference Optimization", arXiv:2403.03419).

Negatives-only data comes in (``{prompt, rejected}``: a prompt file with a ``rejected`` column, or
rho-refusal's harmful questions); for each prompt, K responses are sampled from the reference
model and written as ``anchors``: ``{prompt, rejected, anchors}``, ready for the ``d2o`` loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from prefalign.data.prompts import Prompt
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, complete, stripped, user


class AnchorsConfig(StrategyConfig):
    """D2O anchors."""

    k: int = Field(4, ge=1, le=64, description="responses sampled per prompt (D2O's K)")
    rejected_field: str = Field("rejected", min_length=1, description="the prompt column holding the negative")
    min_anchors: int | None = Field(
        None, ge=1, description="fewest non-empty anchors to keep a record (default: k)"
    )

    @model_validator(mode="after")
    def _check(self) -> "AnchorsConfig":
        if self.min_anchors is not None and self.min_anchors > self.k:
            raise ValueError(f"min_anchors ({self.min_anchors}) cannot exceed k ({self.k})")
        return self


def negative_of(prompt: Prompt, field: str) -> str | None:
    value = prompt.meta.get(field)
    return value if isinstance(value, str) and value.strip() else None


class AnchorsStrategy(Strategy):
    name: ClassVar[str] = "anchors"
    Config = AnchorsConfig
    description = "D2O: K self-sampled anchors for each negative-only {prompt, rejected}"

    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        field = self.config.rejected_field
        if prompts and not any(negative_of(p, field) for p in prompts):
            raise ValueError(
                f"anchors needs negatives: none of the prompts has a '{field}' field "
                "(use --prompts file --prompts-file NEGATIVES.jsonl with prompt and rejected columns, "
                "or --prompts rho-refusal)"
            )

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: AnchorsConfig = self.config
        out: list[list[Candidate] | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            if negative_of(p, cfg.rejected_field) is None:
                out[i] = [Candidate.drop(self.name, "prompt_without_rejected")]
            else:
                todo.append(i)
        samples = complete(self.backend, [[user(prompts[i].prompt)] for i in todo], self.ctx.params(seed, "anchors", n=cfg.k))
        need = cfg.min_anchors or cfg.k
        for i, texts in zip(todo, samples):
            anchors = [stripped(t) for t in texts if t.strip()]
            meta = {"k": cfg.k, "empty_samples": len(texts) - len(anchors)}
            if len(anchors) < need:
                out[i] = [Candidate.drop(self.name, "too_few_anchors", {**meta, "samples": texts})]
                continue
            out[i] = [Candidate.keep(self.name, meta, prompt=prompts[i].prompt,
                                     rejected=negative_of(prompts[i], cfg.rejected_field), anchors=anchors)]
        return out  # type: ignore[return-value]
