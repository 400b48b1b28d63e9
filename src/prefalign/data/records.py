"""The record schema (which response groups a preference record may have) and the in-memory record.

:data:`RECORD_SCHEMA` is the one place the groups are declared; validation (``data/validate.py``),
tokenisation (``data/tokenize.py``), scoring (``score/records.py``), generation's records
(``generate/core.py``, ``generate/runner.py``) and the loss registry (``losses.py``, whose inputs
name groups) read it. A new group is one :class:`ResponseGroup` line here plus a field on
:class:`PreferenceRecord`; which loss needs which group is said once, by the inputs of the loss's
registry entry (``LossSpec.responses``), and :meth:`RecordSchema.required_fields` turns that
into the fields a data file must have.

Keys a row has beyond the schema are kept in ``meta`` (or refused, with ``unknown_fields="error"``
in :func:`prefalign.data.validate.load_records`); they are never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class ResponseGroup(BaseModel):
    """One group of responses a record may carry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # the record's field
    many: bool = False  # a non-empty list of K responses, named ``name.0`` ... ``name.K-1``
    reward: str | None = None  # the record field holding this response's scalar reward, if any
    about: str = ""


class RecordSchema(BaseModel):
    """The fields of a preference record: the prompt, the response groups, their rewards, meta."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    groups: tuple[ResponseGroup, ...]
    prompt: str = "prompt"
    weight: str = "weight"
    meta: str = "meta"

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def reward_fields(self) -> tuple[str, ...]:
        return tuple(g.reward for g in self.groups if g.reward)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every top-level key a record row may have; anything else goes to ``meta``."""
        return (self.prompt, *self.group_names, *self.reward_fields, self.weight, self.meta)

    def group(self, name: str) -> ResponseGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise ValueError(f"unknown response group {name!r}; expected one of {self.group_names}")

    def reward_field(self, group: str) -> str | None:
        """``"chosen"`` -> ``"reward_chosen"``; None for a group without a scalar reward."""
        return self.group(group).reward

    def response_names(self, record: Mapping[str, Any] | "PreferenceRecord") -> list[str]:
        """The names of the record's responses (``meta.truncated`` uses them): ``chosen``,
        ``anchors.0``, ... for the groups it has."""
        get = record.get if isinstance(record, Mapping) else (lambda k: getattr(record, k, None))
        names: list[str] = []
        for g in self.groups:
            value = get(g.name)
            if value is None:
                continue
            names += [response_name(g.name, k) for k in range(len(value))] if g.many else [g.name]
        return names

    def required_fields(self, needs) -> tuple[str, ...]:
        """The fields a data file needs for a loss: ``needs`` is a registry entry (anything with
        ``responses`` and ``reward_fields``, e.g. :class:`prefalign.losses.LossSpec`)."""
        for name in needs.responses:
            self.group(name)  # an unknown group is a registry bug: say so here
        return (self.prompt, *needs.responses, *needs.reward_fields)

    def unknown_keys(self, row: Mapping[str, Any]) -> list[str]:
        return [k for k in row if k not in self.fields]


RECORD_SCHEMA = RecordSchema(groups=(
    ResponseGroup(name="chosen", reward="reward_chosen",
                  about="the preferred response (a critique's revision, the better of a sampled pair, ...)"),
    ResponseGroup(name="rejected", reward="reward_rejected", about="the dispreferred response"),
    ResponseGroup(name="anchors", many=True, about="D2O: K self-sampled responses (anchors.0 ... anchors.K-1)"),
    ResponseGroup(name="toxic", about="ADPO: a toxic response, scored by the reference with the [TOXIC] control token"),
))

RESPONSE_GROUPS = RECORD_SCHEMA.group_names


def response_name(group: str, k: int = 0) -> str:
    """How ``meta.truncated`` names a response: its group, or ``anchors.K`` for the K-th of a list group."""
    return f"{group}.{k}" if RECORD_SCHEMA.group(group).many else group


def is_list_group(group: str) -> bool:
    """Whether ``group`` holds K responses per record (stacked as ``[B, K]``) rather than one."""
    return RECORD_SCHEMA.group(group).many


@dataclass
class PreferenceRecord:
    """One validated preference example (its fields are :data:`RECORD_SCHEMA`'s).

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
    # How much the record counts in training: its loss is multiplied by it (None: 1). A recipe
    # lowers one source against another with it, e.g. D2O's human-written negatives (merge ``weights``).
    weight: float | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""  # "file:line" the record came from, for error messages

    @property
    def loss_weight(self) -> float:
        return 1.0 if self.weight is None else self.weight

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    def responses(self, group: str) -> list[str]:
        """The responses of one group: a list group gives its list, the others ``[text]``."""
        many = RECORD_SCHEMA.group(group).many
        value = getattr(self, group)
        if value is None:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(f"record has no {group!r} response{where}")
        return list(value) if many else [value]


def _check_record_matches_schema() -> None:
    # The dataclass and the schema must list the same fields, or a new group would be half-added.
    from dataclasses import fields as dataclass_fields

    declared = {f.name for f in dataclass_fields(PreferenceRecord)} - {"source"}
    if declared != set(RECORD_SCHEMA.fields):
        raise AssertionError(f"PreferenceRecord fields {sorted(declared)} differ from RECORD_SCHEMA {sorted(RECORD_SCHEMA.fields)}")


_check_record_matches_schema()
