"""The one interface every generation backend implements: conversations + sampling in, texts out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from prefalign.data.render import encode_prompt as _encode_prompt
from prefalign.data.render import render_plain, render_prompt  # noqa: F401  (render_plain: re-exported)

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = 0
    n: int = 1  # samples per conversation

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.n < 1:
            raise ValueError("n must be >= 1")


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class Completion(str):
    """A generated text that knows whether the token limit cut it before the model ended it.

    It is a ``str`` (strategies treat it as one); backends return it so that records can say which
    responses are unfinished, and training adds no end-of-sequence token to those (teaching the
    model to stop mid-sentence would be wrong). String methods return plain ``str``: keep the flag
    across edits with :func:`same_ending`.
    """

    truncated: bool

    def __new__(cls, text: str, truncated: bool = False) -> "Completion":
        obj = super().__new__(cls, text)
        obj.truncated = truncated
        return obj


def is_truncated(text) -> bool:
    return bool(getattr(text, "truncated", False))


def same_ending(original, text: str) -> str:
    """``text`` (an edit of ``original``, e.g. stripped) carrying ``original``'s truncation flag."""
    return Completion(text, True) if is_truncated(original) else text


@runtime_checkable
class GenerationBackend(Protocol):
    """``generate`` returns, for each conversation, ``params.n`` completions of the assistant turn
    (:class:`Completion` where the backend knows whether the token limit cut them)."""

    name: str
    model_id: str  # identifies the model for resume keys (path, served name...)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]: ...


# --- helpers shared by the backends (additions; the names above are the public interface) ---

def check_conversations(conversations: Sequence[Conversation]) -> None:
    """Raise a ``ValueError`` naming the conversation and message that is malformed."""
    if isinstance(conversations, (str, dict)):
        raise ValueError("conversations must be a list of conversations (each a list of messages)")
    for i, conv in enumerate(conversations):
        if isinstance(conv, (str, dict)) or not conv:
            raise ValueError(f"conversation {i}: must be a non-empty list of messages")
        for j, msg in enumerate(conv):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"conversation {i}, message {j}: must be a dict with 'role' and 'content'")
            if not isinstance(msg["content"], str):
                raise ValueError(f"conversation {i}, message {j}: 'content' must be a string")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string is removed)."""
    cut = len(text)
    for s in stop:
        if s:
            k = text.find(s)
            if 0 <= k < cut:
                cut = k
    return text[:cut]


def render_with_tokenizer(tokenizer, conversation: Conversation) -> str:
    """The prompt text for ``conversation``: the one prompt renderer (:mod:`prefalign.data.render`)
    that training, the reward model and evaluation use too (chat template with the generation
    prompt, or :func:`render_plain` without one; a final assistant message is continued)."""
    return render_prompt(tokenizer, conversation)


def encode_prompt(tokenizer, conversation: Conversation) -> list[int]:
    """Token ids of :func:`render_with_tokenizer` (:func:`prefalign.data.render.encode_prompt`)."""
    return _encode_prompt(tokenizer, conversation)
