"""Answer-option order for two-option multiple-choice questions ("(A) Agree / (B) Disagree").

A small model learns the letter before it learns the content: when the truthful answer of the
training questions is "(A)" more often than not, "prefer (A)" raises held-out accuracy without
any less sycophancy. Swapping the two options' labels (the question is the same, the letters
change places) takes the letter out of the signal:

- ``both``: every question twice, as given and swapped. Each letter is the right one exactly as
  often as the other, so a letter prior scores one half (an evaluation set), and a reward model or
  policy can only learn the content (at twice the data).
- ``balanced``: every question once, half of them swapped: for pairs, those that make the chosen
  answer's letter alternate (A, B, A, ...) in the order of a hash of the question; for prompts,
  every second one in that order. The letter prior is gone at the same size.

A question without exactly two options "(A) ..." and "(B) ..." is kept as it is (no twin).
Each record or prompt that went through gets ``meta.option_order`` ("as given" or "swapped") and
``meta.question`` (the question's id, or its normalised text), so an evaluation can count a
question once however many orders it was asked in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

OptionOrder = Literal["as-given", "both", "balanced"]
OPTION_ORDERS: tuple[str, ...] = ("as-given", "both", "balanced")

_OPTION_LINE = re.compile(r"^(\s*\()([AB])(\)\s*)(\S.*?)(\s*)$")
_LEADING_LETTER = re.compile(r"^(\s*\()([AB])(\))")
_ANY_LEADING_LETTER = re.compile(r"^\s*\(([A-Z])\)")
_ONLY_LETTER = re.compile(r"^\s*\(([AB])\)\s*$")
_THIRD_OPTION = re.compile(r"^\s*\([C-Z]\)")
_OTHER = {"A": "B", "B": "A"}

T = TypeVar("T")


def check_option_order(order: str) -> str:
    """``order`` if it is one of :data:`OPTION_ORDERS`, else a ValueError naming the known ones."""
    if order not in OPTION_ORDERS:
        raise ValueError(f"unknown order {order!r} ({', '.join(OPTION_ORDERS)})")
    return order


def _option_lines(text: str) -> dict[str, int] | None:
    """Line index of each of the options (A) and (B), in the last "Choices:" block if there is one;
    None unless there are exactly these two options, each once."""
    lines = text.split("\n")
    start = max((i for i, line in enumerate(lines) if "Choices:" in line), default=0)
    found: dict[str, int] = {}
    for i in range(start, len(lines)):
        m = _OPTION_LINE.match(lines[i])
        if m:
            if m.group(2) in found:
                return None
            found[m.group(2)] = i
    third = any(_THIRD_OPTION.match(lines[i]) for i in range(start, len(lines)))
    return found if set(found) == {"A", "B"} and not third else None


def swap_options(text: str) -> str | None:
    """The question with the labels of options (A) and (B) exchanged, layout kept; None when it
    does not have exactly these two options."""
    where = _option_lines(text)
    if where is None:
        return None
    lines = text.split("\n")
    a, b = (_OPTION_LINE.match(lines[where[letter]]) for letter in ("A", "B"))
    lines[where["A"]] = a.group(1) + "A" + a.group(3) + b.group(4) + a.group(5)
    lines[where["B"]] = b.group(1) + "B" + b.group(3) + a.group(4) + b.group(5)
    return "\n".join(lines)


def swap_letter(answer: str) -> str:
    """An answer that opens with "(A)" opens with "(B)" (and back); any other text is unchanged."""
    return _LEADING_LETTER.sub(lambda m: m.group(1) + _OTHER[m.group(2)] + m.group(3), answer, count=1)


def leading_letter(answer: str | None) -> str | None:
    """The option letter an answer opens with ("(C) Maybe" -> "C"), or None."""
    m = _ANY_LEADING_LETTER.match(answer or "")
    return m.group(1) if m else None


def option_text(answer: str | None) -> str | None:
    """The text of the option an answer opens with, its letter dropped ("(A) Agree" -> "Agree"), or
    None for an answer that opens with no option letter."""
    m = _ANY_LEADING_LETTER.match(answer or "")
    return (answer or "")[m.end():].strip() if m else None


def _swap_meta(meta: dict) -> dict:
    """Letter-only values ("(A)", e.g. a source's ``truthful_answer``) follow their option."""
    return {k: swap_letter(v) if isinstance(v, str) and _ONLY_LETTER.match(v) else v for k, v in meta.items()}


def _hash_order(items: Sequence[T], key: Callable[[T], str], salt: str) -> list[int]:
    return sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{salt}\x00{key(items[i])}".encode()).digest())


def order_options(items: Sequence[T], order: OptionOrder, *, text: Callable[[T], str],
                  question: Callable[[T], str], swap: Callable[[T, str], T], tag: Callable[[T, dict], T],
                  chosen_letter: Callable[[T], str | None] = lambda item: None, salt: str = "options") -> list[T]:
    """``items`` with their option order set (see the module): ``text`` gives an item's question,
    ``question`` its key, ``swap(item, swapped_text)`` the item with options swapped, ``tag(item,
    meta)`` the item with ``meta`` added, ``chosen_letter`` a pair's chosen letter (``balanced``)."""
    if order == "as-given":
        return list(items)
    if order not in OPTION_ORDERS:
        raise ValueError(f"option_order: unknown order {order!r} ({', '.join(OPTION_ORDERS)})")
    swapped_text = [swap_options(text(item)) for item in items]
    out: list[T] = list(items)
    if order == "both":
        out = []
        for item, swapped in zip(items, swapped_text):
            key = question(item)
            out.append(tag(item, {"option_order": "as given", "question": key}) if swapped else item)
            if swapped:
                out.append(tag(swap(item, swapped), {"option_order": "swapped", "question": key}))
        return out
    target = "A"
    for i in _hash_order(items, question, salt):
        if swapped_text[i] is None:
            continue
        letter = chosen_letter(items[i])
        flip = (letter is not None and letter != target) or (letter is None and target == "B")
        key = question(items[i])
        out[i] = (tag(swap(items[i], swapped_text[i]), {"option_order": "swapped", "question": key}) if flip
                  else tag(items[i], {"option_order": "as given", "question": key}))
        target = _OTHER[target]
    return out


def order_record_options(records: Sequence, order: OptionOrder, salt: str = "options") -> list:
    """Preference records (every response opening with an option letter follows it: chosen,
    rejected, each anchor, the toxic one)."""
    from .records import RESPONSE_GROUPS
    from .sources import normalise_prompt

    def swap(record, text):
        responses = {}
        for group in RESPONSE_GROUPS:
            value = getattr(record, group)
            if isinstance(value, list):
                responses[group] = [swap_letter(v) for v in value]
            elif value:
                responses[group] = swap_letter(value)
        return dataclasses.replace(record, prompt=text, meta=_swap_meta(record.meta), **responses)

    def question(record):
        return str(record.meta.get("id") or normalise_prompt(record.prompt))

    return order_options(
        records, order, text=lambda r: r.prompt if isinstance(r.prompt, str) else "", question=question, swap=swap,
        tag=lambda r, meta: dataclasses.replace(r, meta={**r.meta, **meta}),
        chosen_letter=lambda r: leading_letter(r.chosen), salt=salt)


def order_prompt_options(prompts: Sequence, order: OptionOrder, salt: str = "options") -> list:
    """Prompts of a prompt source (a swapped twin's id ends in ``~swapped``)."""

    def swap(prompt, text):
        return dataclasses.replace(prompt, id=f"{prompt.id}~swapped", prompt=text, meta=_swap_meta(prompt.meta))

    return order_options(prompts, order, text=lambda p: p.prompt, question=lambda p: p.id, swap=swap,
                         tag=lambda p, meta: dataclasses.replace(p, meta={**p.meta, **meta}), salt=salt)
