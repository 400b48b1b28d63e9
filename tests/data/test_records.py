"""The record schema (data/records.py): one declaration of the response groups drives validation,
the losses' required fields and generation's records; unknown keys are kept or refused, never
dropped."""

import json
from dataclasses import fields

import pytest

from prefalign.data import DataError, PreferenceRecord, load_records, write_jsonl
from prefalign.data.records import RECORD_SCHEMA, RESPONSE_GROUPS, is_list_group, response_name
from prefalign.data.validate import load_for_loss
from prefalign.losses import LOSSES, In, Input

DPO = ("prompt", "chosen", "rejected")
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_schema_and_record_declare_the_same_fields():
    assert set(RECORD_SCHEMA.fields) == {f.name for f in fields(PreferenceRecord)} - {"source"}
    assert RESPONSE_GROUPS == ("chosen", "rejected", "anchors", "toxic")
    assert RECORD_SCHEMA.reward_fields == ("reward_chosen", "reward_rejected")
    assert [is_list_group(g) for g in RESPONSE_GROUPS] == [False, False, True, False]
    assert response_name("anchors", 2) == "anchors.2" and response_name("toxic", 2) == "toxic"
    with pytest.raises(ValueError, match="unknown response group 'revision'"):
        RECORD_SCHEMA.group("revision")


def test_every_loss_needs_schema_groups_and_its_required_fields_follow():
    for name, spec in LOSSES.items():
        assert set(spec.responses) <= set(RESPONSE_GROUPS), name
        assert spec.required_fields == ("prompt", *spec.responses, *spec.reward_fields), name
    assert LOSSES["d2o"].required_fields == ("prompt", "rejected", "anchors")
    assert LOSSES["odpo"].required_fields == (*DPO, "reward_chosen", "reward_rejected")
    assert "toxic" in LOSSES["adpo"].required_fields
    # A registry entry naming a group the schema lacks fails when it is written, not mid-training.
    with pytest.raises(ValueError, match="unknown response group 'chosn'"):
        In.policy("chosn")
    with pytest.raises(ValueError, match="no reward field"):
        Input("reward", "anchors")


def test_response_names_cover_every_group_the_record_has():
    row = {**GOOD, "anchors": ["a", "b"], "toxic": "t"}
    assert RECORD_SCHEMA.response_names(row) == ["chosen", "rejected", "anchors.0", "anchors.1", "toxic"]
    rec = PreferenceRecord(prompt="p", rejected="r", anchors=["a"])
    assert RECORD_SCHEMA.response_names(rec) == ["rejected", "anchors.0"]


def test_unknown_keys_are_kept_in_meta_through_a_round_trip(tmp_path):
    row = {**GOOD, "id": 7, "source_model": "m", "meta": {"lang": "en"}}
    rec = load_records(write_rows(tmp_path / "d.jsonl", [row]), DPO).records[0]
    assert rec.meta == {"id": 7, "source_model": "m", "lang": "en"}
    write_jsonl(tmp_path / "out.jsonl", [rec])
    again = load_records(tmp_path / "out.jsonl", DPO).records[0]
    assert again.meta == rec.meta


def test_unknown_keys_can_be_refused_with_file_line_and_field(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [GOOD, {**GOOD, "score": 3}])
    with pytest.raises(DataError) as info:
        load_records(path, DPO, unknown_fields="error")
    err = info.value
    assert (err.line, err.field, err.kind) == (2, "score", "unknown_field")
    assert f"{path}:2:" in str(err) and "put anything else in 'meta'" in str(err)
    # The same through the loss-aware loader used by `train` and `data check`.
    with pytest.raises(DataError, match="unknown field"):
        load_for_loss(path, LOSSES["dpo"], unknown_fields="error")
    # Skipping invalid rows keeps the good one and reports the other.
    result = load_records(path, DPO, unknown_fields="error", skip_invalid=True)
    assert len(result.records) == 1 and result.skipped[0].field == "score"
    with pytest.raises(ValueError, match="unknown_fields"):
        load_records(path, DPO, unknown_fields="drop")


def test_a_key_both_top_level_and_in_meta_must_agree(tmp_path):
    same = {**GOOD, "id": 1, "meta": {"id": 1}}
    assert load_records(write_rows(tmp_path / "a.jsonl", [same]), DPO).records[0].meta == {"id": 1}
    path = write_rows(tmp_path / "b.jsonl", [{**GOOD, "id": 1, "meta": {"id": 2}}])
    with pytest.raises(DataError) as info:
        load_records(path, DPO)
    assert (info.value.line, info.value.field, info.value.kind) == (1, "id", "conflict")


def test_a_misspelt_group_is_named_in_the_missing_field_error(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "p", "choosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as info:
        load_records(path, DPO)
    assert info.value.field == "chosen" and "the row has 'choosen': a misspelling?" in str(info.value)


def test_every_group_is_validated_by_the_same_rules(tmp_path):
    # An empty response is an error in each group, named by the group (and the index in a list group).
    for group, value, named in [("chosen", " ", "chosen"), ("rejected", "", "rejected"), ("toxic", " ", "toxic"),
                                ("anchors", ["ok", " "], "anchors[1]")]:
        path = write_rows(tmp_path / f"{group}.jsonl", [{**GOOD, group: value}])
        with pytest.raises(DataError) as info:
            load_records(path, DPO)
        assert info.value.field == named and info.value.kind == "empty", group


def test_a_strategy_record_with_an_unknown_field_is_refused_not_dropped():
    from prefalign.generate.core import Candidate

    kept = Candidate.keep("s", None, prompt="p", chosen="a", rejected="b", reward_chosen=1.0)
    assert set(kept.record) == {"prompt", "chosen", "rejected", "reward_chosen"}
    with pytest.raises(ValueError, match=r"\['revision'\] are not in the record schema"):
        Candidate.keep("s", None, prompt="p", chosen="a", revision="c")


def test_weight_is_a_number_at_least_zero_and_round_trips(tmp_path):
    rows = [GOOD, {**GOOD, "weight": 0.25}, {**GOOD, "weight": 0}]
    records = load_records(write_rows(tmp_path / "ok.jsonl", rows), DPO).records
    assert [r.weight for r in records] == [None, 0.25, 0.0] and [r.loss_weight for r in records] == [1.0, 0.25, 0.0]
    write_jsonl(tmp_path / "out.jsonl", records)
    assert [r.weight for r in load_records(tmp_path / "out.jsonl", DPO).records] == [None, 0.25, 0.0]
    for i, bad in enumerate(["1", -0.5, float("inf"), True]):
        path = write_rows(tmp_path / f"bad{i}.jsonl", [GOOD, {**GOOD, "weight": bad}])
        with pytest.raises(DataError) as info:
            load_records(path, DPO)
        assert (info.value.line, info.value.field) == (2, "weight") and f"{path}:2:" in str(info.value), bad
