"""Response prefill: steering a weak teacher by giving it the opening of its answer.

A small model asked to refuse rarely does (SmolLM2-135M refuses ~2% of harmful requests even under
a safety system prompt), but it continues a given opening fluently: prefilled with "I can't help
with that", it goes on to explain why, or — sometimes — complies anyway. The opening is the lever,
the rest of the response is the model's own, and the judge of the record (a reward signal, the
refusal detector) still decides how much a pair is worth. Used by:

* the ``steer`` strategy: chosen continues one set of openings, rejected another (or none), e.g.
  refusals chosen on harmful prompts, or refusals *rejected* on benign ones (which keeps a
  safety-trained model from over-refusing);
* ``critique``'s ``revision_prefill`` (the rDPO revision starts with an opening);
* ``anchors``' ``anchor_prefill`` (D²O's self-sampled anchors, steered).

One opening per prompt is picked from the list by a hash of the seed and the prompt, so a run is
reproducible and the openings vary across prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from prefalign.data.prompts import Prompt
from prefalign.generate.backends.base import Conversation, GenerationBackend, SamplingParams, same_ending
from prefalign.generate.core import (
    Candidate, Strategy, StrategyConfig, assistant, complete, make_pair, user,
)

#: Openings of a refusal, for harmful requests. The model writes everything after them.
REFUSAL_OPENINGS = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I won't help with this.",
    "I'm not able to help with that.",
    "Sorry, I can't provide that.",
)


def pick_opening(openings: Sequence[str], seed: int | None, key: str) -> str:
    """One opening of ``openings`` for the prompt ``key``, stable for a seed."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return openings[int.from_bytes(digest[:4], "big") % len(openings)]


def prefilled(conversation: Conversation, opening: str | None) -> Conversation:
    """The conversation with the assistant's answer started by ``opening`` (unchanged when None)."""
    return [*conversation, assistant(opening)] if opening else list(conversation)


def join_opening(opening: str | None, continuation: str) -> str:
    """The whole response: the opening and what the model wrote after it (its truncation kept)."""
    if not opening:
        return continuation
    if continuation and not continuation[0].isspace() and not opening[-1].isspace() and continuation[0].isalnum():
        text = f"{opening} {continuation}"
    else:
        text = opening + continuation
    return same_ending(continuation, text)


def continue_openings(backend: GenerationBackend, conversations: list[Conversation], openings: Sequence[str | None],
                      params: SamplingParams) -> list[list[str]]:
    """``params.n`` responses per conversation, each starting with that conversation's opening."""
    outputs = complete(backend, [prefilled(c, o) for c, o in zip(conversations, openings)], params)
    return [[join_opening(o, t) for t in texts] for o, texts in zip(openings, outputs)]


class ChosenPrefill(StrategyConfig):
    """Mixin of strategies whose chosen answer may start with a given opening."""

    chosen_prefill: list[str] = Field(
        default_factory=list,
        description="openings the chosen answer starts with (one picked per prompt; '@refusal' = REFUSAL_OPENINGS)",
    )


class SteerConfig(StrategyConfig):
    """Prefill contrast: the chosen and the rejected answer start with different openings."""

    chosen_prefill: list[str] = Field(
        default_factory=list, description="openings of the chosen answer (one picked per prompt); [] for a plain answer"
    )
    rejected_prefill: list[str] = Field(
        default_factory=list, description="openings of the rejected answer (one picked per prompt); [] for a plain answer"
    )
    pairs_per_prompt: int = Field(
        1, ge=1, le=16,
        description="pairs made per prompt, each with its own openings and samples (more pairs from a short prompt list)",
    )

    @model_validator(mode="after")
    def _check(self) -> "SteerConfig":
        if not self.chosen_prefill and not self.rejected_prefill:
            raise ValueError("give chosen_prefill or rejected_prefill (a list of openings), or both")
        if any(not o.strip() for o in [*self.chosen_prefill, *self.rejected_prefill]):
            raise ValueError("chosen_prefill/rejected_prefill: openings must not be empty")
        for o in [*self.chosen_prefill, *self.rejected_prefill]:
            if o.startswith("@"):
                preset_openings(o[1:], "")  # an unknown preset fails here, before any work
        return self


def preset_openings(name: str, prompt_text: str | None = None) -> list[str]:
    """``@refusal``: :data:`REFUSAL_OPENINGS`. ``@choices``: the prompt's own answer options (the
    "(A) Agree" lines of a multiple-choice question), so the model commits to one and explains it."""
    if name == "refusal":
        return list(REFUSAL_OPENINGS)
    if name == "choices":
        from prefalign.data.sources import choice_labels

        return [f"({letter}) {label}" for letter, label in choice_labels(prompt_text or "").items()]
    raise ValueError(f"unknown opening preset '@{name}' (@refusal, @choices)")


def openings_of(value: list[str], prompt_text: str | None = None) -> list[str]:
    """The openings a spec stands for: literal strings, and presets (``@refusal``, ``@choices``)."""
    return [o for v in value for o in (preset_openings(v[1:], prompt_text) if v.startswith("@") else [v])]


def opening_for(spec: list[str], seed: int | None, key: str, prompt_text: str) -> str | None:
    """The opening for one prompt (``None`` for no prefill, or when the spec gives this prompt none)."""
    return openings_in_turn(spec, seed, key, prompt_text, 1)[0]


def openings_in_turn(spec: list[str], seed: int | None, key: str, prompt_text: str, count: int) -> list[str | None]:
    """``count`` openings for one prompt: :func:`opening_for`'s pick first, then the ones after it in
    the list, so they are all different while the list lasts (``None`` each without a prefill)."""
    openings = openings_of(spec, prompt_text) if spec else []
    if not openings:
        return [None] * count
    first = openings.index(pick_opening(openings, seed, key))
    return [openings[(first + j) % len(openings)] for j in range(count)]


class SteerStrategy(Strategy):
    name: ClassVar[str] = "steer"
    Config = SteerConfig
    description = "response prefill: chosen and rejected answers continue different openings (e.g. a refusal)"

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: SteerConfig = self.config
        results: list[list[Candidate]] = [[] for _ in prompts]
        # one sampling call per side and pair index, so the k pairs of a prompt differ in their
        # openings and their seeds; pair 0 keeps the keys of a one-pair run (same records)
        for k in range(cfg.pairs_per_prompt):
            for i, pair in enumerate(self._pairs(prompts, seed, k)):
                results[i].append(pair)
        return results

    def _pairs(self, prompts: Sequence[Prompt], seed: int | None, k: int) -> list[Candidate]:
        cfg: SteerConfig = self.config
        suffix = f":{k}" if k else ""
        conversations = [[user(p.prompt)] for p in prompts]
        sides = {}
        for side, spec in (("chosen", cfg.chosen_prefill), ("rejected", cfg.rejected_prefill)):
            picked = [opening_for(spec, seed, f"{side}:{p.id}{suffix}", p.prompt) for p in prompts]
            texts = continue_openings(self.backend, conversations, picked, self.ctx.params(seed, side + suffix))
            sides[side] = ([t[0] for t in texts], picked)
        pairs = []
        for i, p in enumerate(prompts):
            meta = {"chosen_opening": sides["chosen"][1][i], "rejected_opening": sides["rejected"][1][i]}
            meta = {name: value for name, value in meta.items() if value}
            if cfg.pairs_per_prompt > 1:
                meta["pair"] = k
            pairs.append(make_pair(self.name, p.prompt, sides["chosen"][0][i], sides["rejected"][0][i], meta))
        return pairs
