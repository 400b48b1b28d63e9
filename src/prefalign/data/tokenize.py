"""Turn preference records into token ids.

Prompts are rendered with the tokenizer's chat template (chat messages always; plain strings when
``chat_template`` is ``auto`` and the tokenizer has one, or ``always``). Every response ends with
the tokenizer's end-of-sequence token so the model learns to stop, except those a generation's
token limit cut (listed in ``meta.truncated``, e.g. ``["rejected", "anchors.2"]``). When an
example is too long the prompt loses tokens from the left (its end, next to the response, matters
most) and responses from the right, as in the DPO papers' reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from prefalign.data.records import PreferenceRecord, response_name

ChatTemplateMode = Literal["auto", "always", "never"]


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
    # What the length limits cut: prompt tokens dropped from the left, and the responses (their
    # meta.truncated names, e.g. "anchors.2") that lost tokens on the right.
    prompt_tokens_cut: int = 0
    responses_cut: tuple[str, ...] = ()

    def num_tokens(self) -> int:
        total = sum(len(self.prompt_ids) + len(r) for group in self.responses.values() for r in group)
        return total


def _uses_chat_template(tokenizer, prompt, mode: ChatTemplateMode) -> bool:
    if isinstance(prompt, list):
        return True
    if mode == "never":
        return False
    return mode == "always" or bool(getattr(tokenizer, "chat_template", None))


def _with_control_token(prompt, token: str):
    """Insert the control token at the start of the last user turn (or of a plain prompt)."""
    if isinstance(prompt, str):
        return f"{token} {prompt}"
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = f"{token} {message['content']}"
            break
    else:
        messages.append({"role": "user", "content": token})
    return messages


def encode_prompt(tokenizer, prompt, mode: ChatTemplateMode = "auto") -> list[int]:
    if _uses_chat_template(tokenizer, prompt, mode):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt is a list of chat messages but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


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
        toxic_prompt = _with_control_token(record.prompt, settings.toxic_control_token)
        toxic_prompt_ids, _ = truncate(
            encode_prompt(tokenizer, toxic_prompt, settings.chat_template), responses.get("toxic", []), settings
        )
    rewards = {
        name: float(value)
        for name in ("reward_chosen", "reward_rejected")
        if (value := getattr(record, name)) is not None
    }
    return TokenizedExample(index, truncated_prompt, responses, toxic_prompt_ids, rewards,
                            prompt_tokens_cut=len(prompt_ids) - len(truncated_prompt), responses_cut=responses_cut)
