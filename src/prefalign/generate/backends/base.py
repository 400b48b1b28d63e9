"""The one interface every generation backend implements: conversations + sampling in, texts out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

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


@runtime_checkable
class GenerationBackend(Protocol):
    """``generate`` returns, for each conversation, ``params.n`` completions of the assistant turn."""

    name: str
    model_id: str  # identifies the model for resume keys (path, served name...)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]: ...
