"""``anchors``: D2O's self-sampled anchors (Duan et al. 2024, "Negating Negatives: Alignment with
Human Negative Samples via Distributional Dispreference Optimization", arXiv:2403.03419).

Negatives-only data comes in (``{prompt, rejected}``: a prompt file with a ``rejected`` column, or
rho-refusal's harmful questions); for each prompt, K responses are sampled from the reference
model and written as ``anchors``: ``{prompt, rejected, anchors}``, ready for the ``d2o`` loss.

A weak model's self-samples on a harmful prompt are as harmful as the negative, so D2O has nothing
to move towards: ``anchor_prefill`` steers each anchor with an opening (e.g. a refusal) that the
model continues. ``negative_prefill`` makes the model write the negative itself (e.g. a refusal
on a *benign* prompt, with plain self-samples as anchors), so a mix of both teaches when to refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from prefalign.data.prompts import Prompt
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, complete, stripped, user
from prefalign.generate.steer import continue_openings, opening_for


class AnchorsConfig(StrategyConfig):
    """D2O anchors."""

    k: int = Field(4, ge=1, le=64, description="responses sampled per prompt (D2O's K)")
    rejected_field: str = Field("rejected", min_length=1, description="the prompt column holding the negative")
    min_anchors: int | None = Field(
        None, ge=1, description="fewest non-empty anchors to keep a record (default: k)"
    )
    anchor_prefill: list[str] = Field(
        default_factory=list,
        description="steered anchors: each anchor continues one of these openings (picked per prompt and anchor; "
                    "'@refusal' = the refusal openings); [] samples them plainly",
    )
    negative_prefill: list[str] = Field(
        default_factory=list,
        description="a model-written negative: continues one of these openings (e.g. a refusal, for benign "
                    "prompts); given, the prompts need no rejected column",
    )
    negative_from: Literal["column", "model"] | None = Field(
        None,
        description="where the negative comes from: the prompt's rejected column, or the model (its own answer, "
                    "continuing negative_prefill if given; for prompts labelled harmful that it complies with). "
                    "Default: model when negative_prefill is given, else column",
    )

    @model_validator(mode="after")
    def _check(self) -> "AnchorsConfig":
        if self.min_anchors is not None and self.min_anchors > self.k:
            raise ValueError(f"min_anchors ({self.min_anchors}) cannot exceed k ({self.k})")
        if self.negative_prefill and self.negative_from == "column":
            raise ValueError("negative_prefill makes the model write the negative: it needs negative_from: model")
        return self

    @property
    def model_negative(self) -> bool:
        """Whether the model writes the negative (else it is read from the prompt's column)."""
        return self.negative_from == "model" or bool(self.negative_prefill)


def negative_of(prompt: Prompt, field: str) -> str | None:
    value = prompt.meta.get(field)
    return value if isinstance(value, str) and value.strip() else None


class AnchorsStrategy(Strategy):
    name: ClassVar[str] = "anchors"
    Config = AnchorsConfig
    description = "D2O: K self-sampled anchors for each negative-only {prompt, rejected}"

    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        field = self.config.rejected_field
        if prompts and not self.config.model_negative and not any(negative_of(p, field) for p in prompts):
            raise ValueError(
                f"anchors needs negatives: none of the prompts has a '{field}' field "
                "(use --prompts file --prompts-file NEGATIVES.jsonl with prompt and rejected columns, "
                "or --prompts rho-refusal)"
            )

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: AnchorsConfig = self.config
        out: list[list[Candidate] | None] = [None] * len(prompts)
        negatives: dict[int, str] = {}
        todo = []
        for i, p in enumerate(prompts):
            if cfg.model_negative:
                todo.append(i)
            elif negative_of(p, cfg.rejected_field) is None:
                out[i] = [Candidate.drop(self.name, "prompt_without_rejected")]
            else:
                negatives[i] = negative_of(p, cfg.rejected_field)
                todo.append(i)
        if cfg.model_negative:
            # opening_for gives None (a plain answer) when no negative_prefill is set
            picked = [opening_for(cfg.negative_prefill, seed, f"negative:{prompts[i].id}", prompts[i].prompt) for i in todo]
            written = continue_openings(self.backend, [[user(prompts[i].prompt)] for i in todo], picked,
                                        self.ctx.params(seed, "negative", n=1))
            negatives = {i: stripped(texts[0]) for i, texts in zip(todo, written)}
        samples = self.sample_anchors([prompts[i] for i in todo], seed)
        need = cfg.min_anchors or cfg.k
        for i, texts in zip(todo, samples):
            anchors = [stripped(t) for t in texts if t.strip()]
            meta = {"k": cfg.k, "empty_samples": len(texts) - len(anchors)}
            if cfg.model_negative:
                meta["negative_written_by_model"] = True
            if len(anchors) < need:
                out[i] = [Candidate.drop(self.name, "too_few_anchors", {**meta, "samples": texts})]
                continue
            out[i] = [Candidate.keep(self.name, meta, prompt=prompts[i].prompt, rejected=negatives[i], anchors=anchors)]
        return out  # type: ignore[return-value]

    def sample_anchors(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[str]]:
        """K responses per prompt: K samples, or with ``anchor_prefill`` one steered sample per anchor."""
        cfg: AnchorsConfig = self.config
        if not cfg.anchor_prefill:
            return complete(self.backend, [[user(p.prompt)] for p in prompts], self.ctx.params(seed, "anchors", n=cfg.k))
        conversations, picked = [], []
        for p in prompts:
            for k in range(cfg.k):
                conversations.append([user(p.prompt)])
                picked.append(opening_for(cfg.anchor_prefill, seed, f"anchor:{p.id}:{k}", p.prompt))
        texts = [t[0] for t in continue_openings(self.backend, conversations, picked, self.ctx.params(seed, "anchors", n=1))]
        return [texts[j * cfg.k:(j + 1) * cfg.k] for j in range(len(prompts))]
