"""Turn preference records into token ids.

Prompts are rendered by the one prompt renderer, :func:`prefalign.data.render.encode_prompt` (the
chat template, or its plain-role fallback, per ``chat_template: auto|always|never``), which
generation, the reward model and evaluation use too. Every response ends with
the tokenizer's end-of-sequence token so the model learns to stop, except those a generation's
token limit cut (listed in ``meta.truncated``, e.g. ``["rejected", "anchors.2"]``). When an
example is too long the prompt loses tokens from the left (its end, next to the response, matters
most) and responses from the right, as in the DPO papers' reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from prefalign.data.records import RECORD_SCHEMA, PreferenceRecord, response_name
from prefalign.data.render import ChatTemplateMode, encode_prompt

__all__ = ["ChatTemplateMode", "TokenizeSettings", "TokenizedExample", "encode_prompt", "encode_response",
           "tokenize_record", "truncate"]


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: ChatTemplateMode = "auto"
    toxic_control_token: str = "[TOXIC]"

    def __post_init__(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )


@dataclass
class TokenizedExample:
    index: int
    prompt_ids: list[int]
    responses: dict[str, list[list[int]]]  # group -> one id list per response ("anchors": K of them)
    toxic_prompt_ids: list[int] | None = None  # prompt with the [TOXIC] control token (ADPO)
    rewards: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0  # the record's loss weight
    # What the length limits cut: prompt tokens dropped from the left, and the responses (their
    # meta.truncated names, e.g. "anchors.2") that lost tokens on the right.
    prompt_tokens_cut: int = 0
    responses_cut: tuple[str, ...] = ()

    def num_tokens(self) -> int:
        total = sum(len(self.prompt_ids) + len(r) for group in self.responses.values() for r in group)
        return total


def encode_response(tokenizer, text: str, *, finished: bool = True) -> list[int]:
    """Token ids of a response, closed by the end-of-sequence token unless ``finished`` is False
    (the token limit cut it: the model should not learn to stop there)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if finished else list(ids)


def truncate(prompt_ids: list[int], responses: Sequence[list[int]], settings: TokenizeSettings):
    longest = max((len(r) for r in responses), default=0)
    if len(prompt_ids) + longest > settings.max_length:
        prompt_ids = prompt_ids[-settings.max_prompt_length:]
    budget = settings.max_length - len(prompt_ids)
    return prompt_ids, [r[:budget] for r in responses]


def tokenize_record(
    record: PreferenceRecord,
    index: int,
    tokenizer,
    groups: Sequence[str],
    settings: TokenizeSettings,
    *,
    with_toxic_prompt: bool = False,
) -> TokenizedExample:
    """Tokenise the response ``groups`` a loss needs (e.g. ``("chosen", "rejected")``)."""
    prompt_ids = encode_prompt(tokenizer, record.prompt, settings.chat_template)
    cut = set(record.meta.get("truncated") or ())
    encoded = {
        g: [encode_response(tokenizer, text, finished=response_name(g, k) not in cut) for k, text in enumerate(record.responses(g))]
        for g in groups
    }
    flat = [ids for group in encoded.values() for ids in group]
    names = [response_name(g, k) for g in groups for k in range(len(encoded[g]))]
    truncated_prompt, cut_flat = truncate(prompt_ids, flat, settings)
    responses_cut = tuple(n for n, before, after in zip(names, flat, cut_flat) if len(after) < len(before))
    it = iter(cut_flat)
    responses = {g: [next(it) for _ in encoded[g]] for g in groups}
    toxic_prompt_ids = None
    if with_toxic_prompt:
        toxic_prompt_ids, _ = truncate(
            encode_prompt(tokenizer, record.prompt, settings.chat_template, control_token=settings.toxic_control_token),
            responses.get("toxic", []), settings,
        )
    rewards = {
        name: float(value)
        for name in RECORD_SCHEMA.reward_fields
        if (value := getattr(record, name)) is not None
    }
    return TokenizedExample(index, truncated_prompt, responses, toxic_prompt_ids, rewards, record.loss_weight,
                            prompt_tokens_cut=len(prompt_ids) - len(truncated_prompt), responses_cut=responses_cut)
