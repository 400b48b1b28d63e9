"""The in-memory form of one preference example."""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

RESPONSE_GROUPS = ("chosen", "rejected", "anchors", "toxic")


def response_name(group: str, k: int = 0) -> str:
    """How ``meta.truncated`` names a response: its group, or ``anchors.K`` for the K-th anchor."""
    return f"anchors.{k}" if group == "anchors" else group


@dataclass
class PreferenceRecord:
    """One validated preference example.

    ``prompt`` is plain text or a list of chat messages (rendered later with the tokenizer's
    chat template); all responses are plain text.
    """

    prompt: str | list[dict]
    chosen: str | None = None
    rejected: str | None = None
    anchors: list[str] | None = None  # D2O: K self-sampled responses
    toxic: str | None = None  # ADPO: a toxic response
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""  # "file:line" the record came from, for error messages

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    def responses(self, group: str) -> list[str]:
        """The responses of one group: ``"anchors"`` gives the list, the others ``[text]``."""
        if group not in RESPONSE_GROUPS:
            raise ValueError(f"unknown response group {group!r}; expected one of {RESPONSE_GROUPS}")
        value = getattr(self, group)
        if value is None:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(f"record has no {group!r} response{where}")
        if group == "anchors":
            return list(value)
        return [value]
