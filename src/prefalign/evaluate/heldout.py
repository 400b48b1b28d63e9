"""The held-out guard: no evaluation prompt may have reached training.

Evaluation prompts are held out by the stable hash split of :mod:`prefalign.data.prompts`; this
module checks it against what training actually saw. Every training prompt (a string, or the
non-assistant messages of a chat prompt; TRL's implicit-prompt form is read from ``chosen`` /
``rejected``) is normalised (:func:`prefalign.data.prompts.normalise_prompt`: case-folded,
whitespace collapsed), and an evaluation prompt is *seen* when its normalised text equals, or is
contained in, any of them. Containment catches role-play and jailbreak templates that wrap a
request in more text. The evaluator drops seen prompts before any model loads and records the
split, the counts and the dropped ids in ``heldout.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from prefalign.data.io import read_rows
from prefalign.data.prompts import normalise_prompt

T = TypeVar("T")

RULE = ("an eval prompt is dropped when its normalised text (casefold, whitespace collapsed) equals or is "
        "contained in the normalised text of a training prompt (its user and system messages)")


def prompt_texts(prompt: Any) -> list[str]:
    """The texts of a prompt that a model reads as input: the string itself, or the content of
    every non-assistant message of a chat list."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [m["content"] for m in prompt
                if isinstance(m, dict) and m.get("role") != "assistant" and isinstance(m.get("content"), str)]
    return []


def user_texts(prompt: Any) -> list[str]:
    """The texts an evaluation prompt asks: the string itself, or every user message."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [m["content"] for m in prompt
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
    return []


def training_row_texts(row: dict) -> list[str]:
    """The prompt texts of one training record (``prompt``; without one, the leading messages of
    ``chosen`` / ``rejected``, TRL's implicit-prompt form)."""
    if row.get("prompt") is not None:
        return prompt_texts(row["prompt"])
    texts: list[str] = []
    for group in ("chosen", "rejected"):
        texts += prompt_texts(row.get(group)) if isinstance(row.get(group), list) else []
    return texts


class TrainingPrompts:
    """The normalised prompts of a recipe's training files, to test evaluation prompts against."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.files: list[dict] = []
        texts: list[str] = []
        for path in paths:
            records = 0
            for _number, row in read_rows(path):
                records += 1
                texts += [t for t in (normalise_prompt(x) for x in training_row_texts(row)) if t]
            self.files.append({"path": str(path), "records": records})
        self.n_texts = len(texts)
        self._exact = set(texts)
        # One string, records separated by NUL (never in a normalised prompt), so a substring
        # search over all training prompts runs at C speed and never matches across two records.
        self._haystack = "\x00" + "\x00".join(texts) + "\x00"

    def seen(self, text: str) -> bool:
        """The normalised ``text`` equals or is contained in a training prompt."""
        t = normalise_prompt(text)
        return bool(t) and (t in self._exact or t in self._haystack)

    def split(self, items: Sequence[T], texts: Callable[[T], list[str]]) -> tuple[list[T], list[T]]:
        """(kept, dropped): an item is dropped when any of its texts was seen in training."""
        kept, dropped = [], []
        for item in items:
            (dropped if any(self.seen(t) for t in texts(item)) else kept).append(item)
        return kept, dropped
