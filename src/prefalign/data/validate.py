"""Validating preference rows into :class:`PreferenceRecord` objects before any model is loaded.

Field names follow TRL's preference format, so existing datasets load unchanged:

* ``prompt``: non-empty text, or a list of chat messages.
* ``chosen`` / ``rejected`` / ``toxic``: text, an assistant message, or a list of messages whose
  last one is the assistant response (TRL conversational). Without ``prompt`` ("implicit
  prompt"), the prompt is the messages the response conversations share before their final
  assistant message.
* ``anchors``: a non-empty list of responses (D2O's K self-sampled responses).
* ``reward_chosen`` / ``reward_rejected``: finite numbers.
* ``weight``: a finite number >= 0, the factor on the record's loss in training (absent: 1).
* ``meta``: an object. Unknown fields (``id``, ...) are kept in ``meta`` (or, with
  ``unknown_fields="error"``, refused); a key given both at the top level and in ``meta`` with
  different values is an error, never a silent choice.

The fields and groups are :data:`prefalign.data.records.RECORD_SCHEMA`'s: each group is checked by
the same code, driven by the schema (one response, or a non-empty list for a list group).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import DataError, format_location
from .io import open_rows, type_name
from .records import RECORD_SCHEMA, PreferenceRecord

logger = logging.getLogger("prefalign.data")

KNOWN_FIELDS = RECORD_SCHEMA.fields
REWARD_FIELDS = RECORD_SCHEMA.reward_fields
ROLES = ("system", "user", "assistant")

_REWARD_MISSING = "missing: this loss needs reward_chosen/reward_rejected (score the file first)"

#: What :func:`load_records` does with a top-level key the schema does not know.
UnknownFields = Literal["meta", "error"]


@dataclass
class LoadResult:
    records: list[PreferenceRecord]
    skipped: list[DataError] = field(default_factory=list)
    path: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)


class _RowError(Exception):
    """Internal: a problem found in a row, turned into a DataError with the row's location."""

    def __init__(self, field: str | None, message: str, kind: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


# --------------------------------------------------------------------------- helpers


def _check_truncated(value, record: dict) -> None:
    """``meta.truncated`` names responses of this record: ``chosen``, ``rejected``, ``toxic``, ``anchors.K``."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError("meta.truncated", f"expected a list of response names, found {type_name(value)}", "type")
    known = set(RECORD_SCHEMA.response_names(record))
    unknown = [v for v in value if v not in known]
    if unknown:
        raise _RowError("meta.truncated", f"names no response of this record: {unknown} (it has {sorted(known)})", "value")


def _is_missing(row: dict, name: str) -> bool:
    return row.get(name) is None


def _check_message(msg: Any, fld: str, index: int) -> dict:
    if not isinstance(msg, dict):
        raise _RowError(
            fld,
            f"message {index}: expected an object with 'role' and 'content', "
            f"found {type_name(msg)}",
            "type",
        )
    role = msg.get("role")
    if role not in ROLES:
        found = "no role" if role is None else f"role {role!r}"
        raise _RowError(
            fld, f"message {index}: expected role system/user/assistant, found {found}", "type"
        )
    content = msg.get("content")
    if not isinstance(content, str):
        raise _RowError(
            fld,
            f"message {index}: expected 'content' to be a string, found {type_name(content)}",
            "type",
        )
    return msg


def _check_messages(value: list, fld: str) -> list[dict]:
    if not value:
        raise _RowError(fld, "expected a non-empty list of messages, found an empty list", "empty")
    return [_check_message(m, fld, i) for i, m in enumerate(value)]


def _response_text(value: Any, fld: str) -> tuple[str, list[dict] | None]:
    """Normalise a response; returns (text, leading messages if it was a conversation)."""
    history: list[dict] | None = None
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        msg = _check_message(value, fld, 0)
        if msg["role"] != "assistant":
            raise _RowError(
                fld, f"expected an assistant message, found role {msg['role']!r}", "type"
            )
        text = msg["content"]
    elif isinstance(value, list):
        msgs = _check_messages(value, fld)
        last = msgs[-1]
        if last["role"] != "assistant":
            raise _RowError(
                fld,
                f"expected the last message to be the assistant response, "
                f"found role {last['role']!r}",
                "type",
            )
        text = last["content"]
        history = msgs[:-1]
    else:
        raise _RowError(
            fld,
            "expected a string, an assistant message or a list of messages, "
            f"found {type_name(value)}",
            "type",
        )
    if not text.strip():
        raise _RowError(fld, "response is empty", "empty")
    return text, history


def _prompt(value: Any) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _RowError("prompt", "prompt is empty", "empty")
        return value
    if isinstance(value, list):
        msgs = _check_messages(value, "prompt")
        if not any(m["content"].strip() for m in msgs):
            raise _RowError("prompt", "prompt is empty (all messages have empty content)", "empty")
        return msgs
    raise _RowError(
        "prompt",
        f"expected a string or a list of chat messages, found {type_name(value)}",
        "type",
    )


def _number(value: Any, fld: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(fld, f"expected a number, found {type_name(value)}", "type")
    return float(value)


def _reward(value: Any, fld: str) -> float:
    value = _number(value, fld)
    if not math.isfinite(value):
        raise _RowError(fld, f"reward is not finite (found {value})", "non_finite")
    return value


def _weight(value: Any) -> float:
    value = _number(value, "weight")
    if not math.isfinite(value) or value < 0:
        raise _RowError("weight", f"expected a finite number >= 0, found {value}", "value")
    return value


def _missing(name: str, row: dict) -> _RowError:
    """A missing required field; names an unknown key of the row that looks like a misspelling of it."""
    near = difflib.get_close_matches(name, RECORD_SCHEMA.unknown_keys(row), n=1, cutoff=0.75)
    hint = f" (the row has '{near[0]}': a misspelling?)" if near else ""
    return _RowError(name, f"missing required field{hint}", "missing")


def _group_responses(value: Any, name: str, many: bool) -> list[tuple[str, list[dict] | None]]:
    """One group's responses as (text, leading messages), checked; a list group must be a
    non-empty list, each item checked like a single response and named ``group[i]``."""
    if not many:
        return [_response_text(value, name)]
    if not isinstance(value, list):
        raise _RowError(name, f"expected a list of responses, found {type_name(value)}", "type")
    if not value:
        raise _RowError(name, "expected a non-empty list of responses (K >= 1), found []", "empty")
    return [_response_text(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _validate_row(row: dict, required: frozenset[str], unknown_fields: UnknownFields = "meta") -> PreferenceRecord:
    unknown = RECORD_SCHEMA.unknown_keys(row)
    if unknown and unknown_fields == "error":
        raise _RowError(unknown[0], f"unknown field; a record has {', '.join(RECORD_SCHEMA.fields)} "
                        "(put anything else in 'meta')", "unknown_field")
    histories: list[tuple[str, list[dict]]] = []
    out: dict[str, Any] = {}

    # Responses first, so the implicit prompt can be taken from their conversations.
    for group in RECORD_SCHEMA.groups:
        if _is_missing(row, group.name):
            if group.name in required:
                raise _missing(group.name, row)
            continue
        responses = _group_responses(row[group.name], group.name, group.many)
        for i, (_, hist) in enumerate(responses):
            if hist is not None:
                histories.append((f"{group.name}[{i}]" if group.many else group.name, hist))
        texts = [text for text, _ in responses]
        out[group.name] = texts if group.many else texts[0]

    # Prompt: explicit, or implicit (TRL) from the conversations' shared leading messages.
    if not _is_missing(row, "prompt"):
        out["prompt"] = _prompt(row["prompt"])
    else:
        if not histories:
            raise _RowError("prompt", "missing required field", "missing")
        first_name, first = histories[0]
        for name, hist in histories[1:]:
            if hist != first:
                raise _RowError(
                    "prompt",
                    f"missing, and the implicit prompt is ambiguous: '{first_name}' and '{name}' "
                    "differ before their final assistant message",
                    "missing",
                )
        if not first:
            raise _RowError(
                "prompt",
                f"missing required field ('{first_name}' holds only the assistant response)",
                "missing",
            )
        out["prompt"] = _prompt(first)

    needs_reward = any(f in required for f in REWARD_FIELDS)
    for name in REWARD_FIELDS:
        if _is_missing(row, name):
            if needs_reward:
                raise _RowError(name, _REWARD_MISSING, "reward_missing")
            continue
        out[name] = _reward(row[name], name)
    if not _is_missing(row, "weight"):
        out["weight"] = _weight(row["weight"])

    meta: dict = {}
    if not _is_missing(row, "meta"):
        if not isinstance(row["meta"], dict):
            raise _RowError("meta", f"expected an object, found {type_name(row['meta'])}", "type")
        meta = row["meta"]
        _check_truncated(meta.get("truncated"), out)
    extras = {k: row[k] for k in unknown if row[k] is not None}
    clash = [k for k in extras if k in meta and meta[k] != extras[k]]
    if clash:
        raise _RowError(clash[0], f"given at the top level and in meta with different values "
                        f"({extras[clash[0]]!r} vs {meta[clash[0]]!r}); keep one", "conflict")
    out["meta"] = {**extras, **meta}
    return PreferenceRecord(**out)


# --------------------------------------------------------------------------- public API


def load_records(
    path: str | os.PathLike,
    required_fields: Iterable[str],
    *,
    skip_invalid: bool = False,
    unknown_fields: UnknownFields = "meta",
) -> LoadResult:
    """Read and validate every row of a data file.

    ``required_fields`` names the fields the loss needs (e.g. ``("prompt", "chosen",
    "rejected")``; add ``reward_chosen``/``reward_rejected`` for losses that use rewards). The
    first invalid row raises a :class:`DataError` unless ``skip_invalid`` is true, in which case
    it is skipped, recorded in ``skipped`` and logged as a warning. A file with no valid records
    raises a :class:`DataError`. Top-level keys the schema does not know go to each record's
    ``meta`` (``unknown_fields="meta"``) or make the row invalid (``"error"``).
    """
    required = frozenset(required_fields)
    if unknown_fields not in ("meta", "error"):
        raise ValueError(f"unknown_fields must be 'meta' or 'error', got {unknown_fields!r}")
    unknown = required - set(KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown required field(s) {sorted(unknown)}; known: {KNOWN_FIELDS}")
    shown = str(path)
    unit, items = open_rows(path)
    records: list[PreferenceRecord] = []
    skipped: list[DataError] = []
    for number, row in items:
        if isinstance(row, DataError):
            err = row
        else:
            try:
                record = _validate_row(row, required, unknown_fields)
            except _RowError as exc:
                err = DataError(
                    exc.message, path=shown, line=number, field=exc.field, unit=unit, kind=exc.kind
                )
            else:
                record.source = format_location(shown, number, unit)
                records.append(record)
                continue
        if not skip_invalid:
            raise err
        skipped.append(err)
        logger.warning("skipping invalid row: %s", err)
    if not records:
        if skipped:
            raise DataError(
                f"no valid records ({len(skipped)} invalid row(s) skipped; first: {skipped[0]})",
                path=shown,
                kind="no_records",
            )
        raise DataError("no records (the file is empty)", path=shown, kind="no_records")
    if skipped:
        logger.warning(
            "%s: skipped %d invalid row(s), kept %d", shown, len(skipped), len(records)
        )
    return LoadResult(records=records, skipped=skipped, path=shown)


def filter_positive_reward_gap(
    records: Iterable[PreferenceRecord],
) -> tuple[list[PreferenceRecord], int]:
    """Keep pairs whose ``reward_chosen - reward_rejected > 0`` (ODPO); returns (kept, n_dropped)."""
    kept: list[PreferenceRecord] = []
    dropped = 0
    for rec in records:
        for name in REWARD_FIELDS:
            if getattr(rec, name) is None:
                raise DataError(_REWARD_MISSING, path=rec.source or None, field=name,
                                kind="reward_missing")
        gap = rec.reward_chosen - rec.reward_rejected
        if gap > 0:
            kept.append(rec)
        else:
            dropped += 1
    return kept, dropped


# --------------------------------------------------------------------------- per-loss checks


@dataclass
class LossCheck:
    """What :func:`check_for_loss` kept, and the counts of what the loss would use differently
    from the file: ``dropped_nonpositive_reward_gap`` (ODPO pairs whose gap is <= 0, dropped) and
    ``identical_pairs`` (chosen == rejected: no preference to learn, kept)."""

    records: list[PreferenceRecord]
    skipped: list[DataError] = field(default_factory=list)
    dropped_nonpositive_reward_gap: int = 0
    identical_pairs: int = 0

    def counts(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}skipped_invalid": len(self.skipped),
                f"{prefix}dropped_nonpositive_reward_gap": self.dropped_nonpositive_reward_gap,
                f"{prefix}identical_pairs": self.identical_pairs}


def _error_at(rec: PreferenceRecord, field_name: str, message: str, kind: str) -> DataError:
    # ``source`` is already "file:line" (or "file: row N").
    return DataError(message, path=rec.source or None, field=field_name, kind=kind)


def check_for_loss(loaded: LoadResult, spec, *, skip_invalid: bool = False, strict: bool = False) -> LossCheck:
    """The checks that depend on the loss, shared by ``prefalign data check`` and ``prefalign
    train`` (before any model loads), so that a file passing one never fails the other:

    * responses the loss stacks ([B, K]: D²O's anchors) have the same count K in every record
      (the most common K; other rows are errors, or skipped with ``skip_invalid``);
    * rewards whose gap overflows are errors; ODPO pairs with ``reward_chosen - reward_rejected
      <= 0`` are dropped and counted (the offset takes the log of the gap);
    * pairs whose chosen and rejected texts are identical are counted (they carry no preference).

    With ``strict`` the dropped and identical pairs are errors naming file, line and field.
    ``spec`` is a :class:`prefalign.losses.LossSpec`.
    """
    out = LossCheck(records=[], skipped=list(loaded.skipped))

    def bad(err: DataError) -> None:
        if not skip_invalid:
            raise err
        out.skipped.append(err)
        logger.warning("skipping invalid row: %s", err)

    records = list(loaded.records)
    if "anchors" in spec.responses:
        counts: dict[int, int] = {}
        for rec in records:
            counts[len(rec.anchors or ())] = counts.get(len(rec.anchors or ()), 0) + 1
        k = max(counts, key=lambda n: (counts[n], -n)) if counts else 0
        first = next((r for r in records if len(r.anchors or ()) == k), None)
        kept = []
        for rec in records:
            if len(rec.anchors or ()) == k:
                kept.append(rec)
            else:
                bad(_error_at(rec, "anchors", f"{len(rec.anchors or ())} anchors, but {counts[k]} record(s) have {k} "
                              f"(e.g. {first.source}): '{spec.name}' needs the same number of anchors in every record",
                              "ragged_anchors"))
        records = kept

    if spec.requires_positive_reward_gap:
        kept = []
        for rec in records:
            for name in REWARD_FIELDS:
                if getattr(rec, name) is None:
                    raise _error_at(rec, name, _REWARD_MISSING, "reward_missing")
            gap = rec.reward_chosen - rec.reward_rejected
            if not math.isfinite(gap):
                bad(_error_at(rec, "reward_chosen", f"reward gap reward_chosen - reward_rejected overflows ({gap})",
                              "non_finite"))
            elif gap > 0:
                kept.append(rec)
            elif strict:
                raise _error_at(rec, "reward_chosen", f"reward gap {rec.reward_chosen} - {rec.reward_rejected} <= 0: "
                                f"'{spec.name}' takes the log of the gap (--strict; without it such pairs are dropped)",
                                "nonpositive_reward_gap")
            else:
                out.dropped_nonpositive_reward_gap += 1
        if out.dropped_nonpositive_reward_gap:
            logger.warning("%s: dropped %d pair(s) whose reward gap is <= 0 (%s needs a positive gap)",
                           loaded.path, out.dropped_nonpositive_reward_gap, spec.name)
        records = kept

    if "chosen" in spec.responses and "rejected" in spec.responses:
        for rec in records:
            if rec.chosen == rec.rejected:
                if strict:
                    raise _error_at(rec, "rejected", "identical to chosen: the pair carries no preference (--strict)",
                                    "identical_pair")
                out.identical_pairs += 1
        if out.identical_pairs:
            logger.warning("%s: %d pair(s) with chosen == rejected: they carry no preference (zero gradient)",
                           loaded.path, out.identical_pairs)

    if not records:
        raise DataError(f"no record left for '{spec.name}' ({len(loaded.records)} valid, "
                        f"{out.dropped_nonpositive_reward_gap} dropped for a reward gap <= 0, "
                        f"{len(out.skipped) - len(loaded.skipped)} skipped)", path=loaded.path or None, kind="no_records")
    out.records = records
    return out


def load_for_loss(path: str | os.PathLike, spec, *, skip_invalid: bool = False, strict: bool = False,
                  unknown_fields: UnknownFields = "meta") -> LossCheck:
    """:func:`load_records` with the fields ``spec`` requires, then :func:`check_for_loss`."""
    loaded = load_records(path, RECORD_SCHEMA.required_fields(spec), skip_invalid=skip_invalid,
                          unknown_fields=unknown_fields)
    return check_for_loss(loaded, spec, skip_invalid=skip_invalid, strict=strict)
