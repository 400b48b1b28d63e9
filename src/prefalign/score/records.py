"""Scoring preference records: ``reward_chosen`` / ``reward_rejected`` and ``meta["scores"]``.

``chosen`` and ``rejected`` scores go to the record's ``reward_chosen`` / ``reward_rejected``
(replacing old values); other groups go to ``meta["scores"]``: ``{"anchors": [..], "toxic": x}``
(the dict is updated, other keys in it are kept).
Each response is scored together with its record's prompt. A NaN score (unparsed) is never
written as a number: the reward field is left out (``null`` in lists), the group is listed in
``meta["unparsed_scores"]``, and the count is reported.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefalign.data.records import RECORD_SCHEMA, RESPONSE_GROUPS, PreferenceRecord, is_list_group

from .base import ScoreConfigError, Scorer, ScorerConfig

log = logging.getLogger("prefalign.score")

@dataclass
class ScoreResult:
    records: list[PreferenceRecord]
    scored: int = 0  # responses that got a number
    unparsed: int = 0  # responses whose score is NaN
    missing: int = 0  # (record, group) pairs skipped because the record has no such response
    by_field: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped_rows: int = 0  # invalid input rows skipped (score_file with skip_invalid)

    def agreement(self):
        """Per-contrast share of pairs where the scorer prefers chosen (see :mod:`.agreement`);
        empty unless both chosen and rejected were scored."""
        from .agreement import contrast_agreement

        if not {"chosen", "rejected"} <= set(self.by_field):
            return {}
        return contrast_agreement(self.records)

    @property
    def unparsed_records(self) -> int:
        return sum(1 for r in self.records if r.meta.get("unparsed_scores"))


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fields, str):
        fields = [f.strip() for f in fields.split(",") if f.strip()]
    fields = tuple(dict.fromkeys(fields))
    if not fields:
        raise ScoreConfigError("fields: name at least one response group to score")
    unknown = [f for f in fields if f not in RESPONSE_GROUPS]
    if unknown:
        raise ScoreConfigError(f"fields: unknown group(s) {unknown}; choose from {', '.join(RESPONSE_GROUPS)}")
    return fields


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def score_records(
    records: Iterable[PreferenceRecord],
    scorer: Scorer,
    fields: Sequence[str] = ("chosen", "rejected"),
) -> ScoreResult:
    """Score the responses of ``fields`` in every record; returns scored copies and counts.

    All responses go to ``scorer.score`` in one call (the scorer batches, caches and shows
    progress), each with its record's prompt.
    """
    fields = check_fields(fields)
    out = [replace(r, meta=copy.deepcopy(r.meta)) for r in records]
    for rec in out:  # forget stale "unparsed" marks of the groups scored now
        stale = [g for g in rec.meta.get("unparsed_scores", []) if g not in fields]
        if stale:
            rec.meta["unparsed_scores"] = stale
        else:
            rec.meta.pop("unparsed_scores", None)
    texts: list[str] = []
    prompts: list[Any] = []
    slots: list[tuple[int, str, int | None]] = []  # (record index, group, anchor index)
    result = ScoreResult(records=out, by_field={f: {"scored": 0, "unparsed": 0, "missing": 0} for f in fields})
    for i, rec in enumerate(out):
        for group in fields:
            value = getattr(rec, group)
            if value is None:
                result.missing += 1
                result.by_field[group]["missing"] += 1
                continue
            many = is_list_group(group)
            items = list(value) if many else [value]
            for k, text in enumerate(items):
                texts.append(text)
                prompts.append(rec.prompt)
                slots.append((i, group, k if many else None))
    scores = scorer.score(texts, prompts) if texts else []
    if len(scores) != len(texts):
        raise RuntimeError(f"scorer '{scorer.name}' returned {len(scores)} scores for {len(texts)} texts")

    listed: dict[tuple[int, str], list[float | None]] = {}  # a list group's scores, per record
    for (i, group, k), raw in zip(slots, scores):
        rec = out[i]
        value = _finite(float(raw))
        if value is None:
            result.unparsed += 1
            result.by_field[group]["unparsed"] += 1
            unparsed = rec.meta.setdefault("unparsed_scores", [])
            if group not in unparsed:
                unparsed.append(group)
        else:
            result.scored += 1
            result.by_field[group]["scored"] += 1
        reward_field = RECORD_SCHEMA.reward_field(group)
        if reward_field is not None:
            setattr(rec, reward_field, value)
        elif k is not None:
            listed.setdefault((i, group), [None] * len(getattr(rec, group)))[k] = value
        else:
            _scores_dict(rec)[group] = value
    for (i, group), values in listed.items():
        _scores_dict(out[i])[group] = values
    return result


def _scores_dict(rec: PreferenceRecord) -> dict:
    """``rec.meta["scores"]`` as a dict; a non-dict value already there (e.g. the per-sample score
    list written by the sample-pairs generator) is kept under ``meta["scores_previous"]``."""
    current = rec.meta.get("scores")
    if current is not None and not isinstance(current, dict):
        log.warning("%s: meta.scores held a %s; kept it as meta.scores_previous", rec.source or "record",
                    type(current).__name__)
        rec.meta["scores_previous"] = current
        current = None
    if current is None:
        current = rec.meta["scores"] = {}
    return current


def score_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    scorer: str,
    config: dict | ScorerConfig | str | os.PathLike | None = None,
    *,
    fields: Sequence[str] | str = ("chosen", "rejected"),
    skip_invalid: bool = False,
    cache: bool = True,
    show_progress: bool = True,
    in_place: bool = False,
) -> ScoreResult:
    """``prefalign score``: validate the config and the data, build the scorer, score, write JSONL.

    ``config`` is a mapping, a validated config, or the path of a YAML file holding one. Nothing is
    loaded (no model, no data) before the config and the field names are known to be valid. An
    output that is the input file is refused unless ``in_place``; the output is written atomically
    (a temporary file renamed into place), so it is never left half-written.
    """
    if not in_place and same_file(input_path, output_path):
        raise ScoreConfigError(f"-o {output_path} is the input file: pass --in-place to replace it, or write elsewhere")
    from prefalign.data.io import write_jsonl
    from prefalign.data.validate import load_records

    from .registry import load_config_file, make_scorer, parse_config

    if isinstance(config, (str, os.PathLike)):
        cfg = load_config_file(scorer, config)
    else:
        cfg = parse_config(scorer, config)
    groups = check_fields(fields)
    loaded = load_records(input_path, ("prompt", *groups), skip_invalid=skip_invalid)
    built = make_scorer(scorer, cfg, cache=cache, show_progress=show_progress)
    result = score_records(loaded.records, built, groups)
    result.skipped_rows = len(loaded.skipped)
    write_jsonl(Path(output_path), result.records)  # atomic
    return result


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (also through links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()
