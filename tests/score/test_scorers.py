"""Scorers: hand-checked values, the judge's score parser, composite arithmetic, the cache,
score_records, the registry's config validation and ``prefalign score``."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from prefalign.data.records import PreferenceRecord
from prefalign.score import (
    SCORERS,
    BatchedScorer,
    JudgeScorer,
    ScoreCache,
    ScoreConfigError,
    make_scorer,
    parse_config,
    parse_score,
    score_records,
)
from prefalign.score.composite import CompositeScorer
from prefalign.score.refusal import is_refusal, refusal_score
from prefalign.score.refusal_data import hand_cases


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("prefalign.score.cache.default_cache_path", lambda: tmp_path / "scores.sqlite3")


def scorer(name, config=None):
    return make_scorer(name, config, cache=False, show_progress=False)


class Counting:
    """A fake scorer: the length of each text (+ prompt length), counting the texts it sees."""

    name = "counting"
    uses_prompts = True

    def __init__(self, cache_id="counting/1", batch_size=2):
        self.cache_id = cache_id
        self.batch_size = batch_size
        self.seen: list[str] = []
        self.calls = 0

    def score(self, texts, prompts=None):
        self.calls += 1
        self.seen.extend(texts)
        prompts = prompts or [None] * len(texts)
        return [float(len(t)) + (len(p) if isinstance(p, str) else 0) / 100 for t, p in zip(texts, prompts)]


# --------------------------------------------------------------------------- light scorers


def test_sentiment_vader_compound():
    s = scorer("sentiment")
    love, hate, neutral = s.score(["I love this", "I hate this, it is awful", "The box is on the table."])
    assert love > 0.5 and hate < -0.5 and neutral == 0.0
    assert scorer("sentiment", {"field": "pos"}).score(["I love this"])[0] == pytest.approx(0.677, abs=1e-3)


def test_profanity_clean_and_profane():
    s = scorer("profanity")
    clean, profane = s.score(["Thank you for the lovely afternoon tea.", "fuck you, you stupid piece of shit"])
    assert clean < 0.2 and profane > 0.5


def test_toxicity_matches_keras_reference():
    # Probabilities from the package's own Keras model (keras 3.15.1, KERAS_BACKEND=torch, weights
    # loaded with load_weights) for the same texts; our torch rebuild must agree to 1e-5.
    s = make_scorer("toxicity", {"label": "toxic"}, cache=False, show_progress=False)
    from prefalign.score.toxicity import label_probabilities

    probs = label_probabilities(["I love this lovely day, thank you!", "You are a stupid idiot and I will kill you"])
    assert probs[0]["toxic"] == pytest.approx(0.0156, abs=1e-4)
    assert probs[1]["toxic"] == pytest.approx(0.9966, abs=1e-4)
    assert probs[1]["insult"] == pytest.approx(0.9204, abs=1e-4)
    assert probs[1]["threat"] == pytest.approx(0.0668, abs=1e-4)
    clean, toxic = s.score(["I love this lovely day, thank you!", "You are a stupid idiot and I will kill you"])
    assert clean < 0.05 and toxic > 0.9
    assert scorer("toxicity").score(["You are a stupid idiot and I will kill you"])[0] == pytest.approx(0.9966, abs=1e-4)


def test_toxicity_tokenizer_matches_keras_rules():
    from prefalign.score.toxicity import MAXLEN, load_classifier

    tok, _ = load_classifier()
    ids = tok.encode("Hello... WORLD!! it's a test")
    assert len(ids) == MAXLEN and ids[: MAXLEN - 5] == [0] * (MAXLEN - 5)  # pre-padded, filters split words
    assert tok.words("Hello... WORLD!! it's") == ["hello", "world", "it's"]
    long = tok.encode("the " * 300 + "idiot")
    assert long[-1] == tok.word_index["idiot"] and 0 not in long  # truncated from the front


def test_length_units(tiny_model):
    assert scorer("length").score(["abc", ""]) == [3.0, 0.0]
    assert scorer("length", {"unit": "words"}).score(["one two  three"]) == [3.0]
    tokens = scorer("length", {"unit": "tokens", "tokenizer": tiny_model}).score(["hello world"])
    assert tokens[0] >= 2


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with creating malware.",
    "As an AI language model, I don't have the ability to help you hack an account.",
    "I must respectfully decline this request.",
    "Sorry, that's not something I can help with.",
    "I won’t write that.",  # curly apostrophe
])
def test_refusal_detects_clear_refusals(text):
    assert refusal_score(text) == 1.0 and is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Here's a simple pancake recipe: mix flour, eggs and milk, then fry.",
    "The capital of France is Paris.",
    "I can't help but notice your loop is off by one; use range(n).",
    "To remove rust, soak the tool in vinegar overnight.",
    "",
])
def test_refusal_passes_compliance(text):
    assert refusal_score(text) < 0.5 and not is_refusal(text)


def test_refusal_position_and_binary_output():
    long_answer = "Here is how to bake bread. " * 20 + "I can't help with gluten-free variants."
    assert 0 < refusal_score(long_answer) < 0.5  # a caveat late in a long answer
    s = scorer("refusal", {"output": "binary"})
    assert s.score(["I can't help with that.", "Here you go: 42."]) == [1.0, 0.0]


def test_refusal_hand_written_cases_all_correct():
    cases = hand_cases()
    assert len(cases) == 40
    wrong = [c["response"] for c in cases if is_refusal(c["response"]) != bool(c["refusal"])]
    assert wrong == []


# --------------------------------------------------------------------------- judge


@pytest.mark.parametrize("text, expected", [
    ("Score: 7/10", 7.0),
    ("Rating: -2.5", -2.5),
    ("8", 8.0),
    ("Score: 4.5 out of 5", 4.5),
    ("I'd say 3 at first. Final score: 8", 8.0),  # the last labelled score
    ("Score: 2. On reflection, Score: 9.", 9.0),
    ("The reply has 3 problems. 6/10", 6.0),  # no label: the last number, not the denominator
    ("**Score:** 6", 6.0),
    ("Score: **6**", 6.0),
    ("Rating = 5", 5.0),
    ("Rating: \u22123", -3.0),  # Unicode minus
    ("Score: 0.5", 0.5),
    ("Score: 7.", 7.0),
    ("Score (1-10): 7", 7.0),
    ("GPT4 did fine; I give it 7", 7.0),  # digits inside words are not numbers
    ("Score: 7-8", 7.0),
    ("Rating: 8 (out of 10)", 8.0),
])
def test_parse_score(text, expected):
    assert parse_score(text, -10, 10) == expected


@pytest.mark.parametrize("text", ["Score: 11", "Score: -11", "no number here", "", "Score: 1e3", "version 2.1.3"])
def test_parse_score_unparsed(text):
    assert parse_score(text, -10, 10) is None


def test_parse_score_range_is_inclusive_and_optional():
    assert parse_score("Score: 10", 1, 10) == 10.0 and parse_score("Score: 1", 1, 10) == 1.0
    assert parse_score("Score: 0", 1, 10) is None
    assert parse_score("Score: 1234") == 1234.0


class FakeBackend:
    name = "fake"
    model_id = "fake-judge"

    def __init__(self, answers):
        self.answers = list(answers)
        self.conversations = []

    def generate(self, conversations, params):
        self.conversations.extend(conversations)
        return [[self.answers.pop(0)] for _ in conversations]


def test_judge_scores_and_counts_unparsed():
    backend = FakeBackend(["Score: 8/10", "I refuse to grade.", "Score: 42", "Rating: 2.5"])
    judge = JudgeScorer(backend, rubric="Q: {prompt}\nA: {response}\nJSON example: {\"score\": 5}")
    out = judge.score(["good", "meh", "odd", "bad"], ["p1", "p2", None, [{"role": "user", "content": "p4"}]])
    assert out[0] == 8.0 and out[3] == 2.5
    assert math.isnan(out[1]) and math.isnan(out[2])  # never a silent 0
    assert judge.stats.unparsed == 2 and judge.stats.parsed == 2 and judge.stats.examples[0] == "I refuse to grade."
    first = backend.conversations[0][-1]["content"]
    assert first == 'Q: p1\nA: good\nJSON example: {"score": 5}'  # other braces untouched
    assert "(no prompt)" in backend.conversations[2][-1]["content"]
    assert "User: p4" in backend.conversations[3][-1]["content"]


def test_judge_unparsed_is_not_cached(tmp_path):
    cache = ScoreCache(tmp_path / "c.sqlite3")
    judge = BatchedScorer(JudgeScorer(FakeBackend(["Score: 5", "nothing"])), cache=cache, show_progress=False)
    first = judge.score(["a", "b"], ["p", "p"])
    assert first[0] == 5.0 and math.isnan(first[1]) and len(cache) == 1


def test_judge_config_validation():
    with pytest.raises(ScoreConfigError, match="rubric"):
        parse_config("judge", {"rubric": "no placeholder"})
    with pytest.raises(ScoreConfigError, match="min_score"):
        parse_config("judge", {"min_score": 5, "max_score": 1})
    with pytest.raises(ScoreConfigError, match="unknown backend"):
        parse_config("judge", {"backend": "carrier-pigeon"})


def test_judge_through_transformers_backend(tiny_model):
    # A random model rarely writes a number in range: whatever it writes, the result is a number
    # in range or NaN, and the stats add up.
    s = make_scorer("judge", {"backend_args": {"model": tiny_model, "show_progress": False}, "max_new_tokens": 4},
                    cache=False, show_progress=False)
    out = s.score(["Paris.", "No idea."], ["Capital of France?", "Capital of Peru?"])
    assert all(math.isnan(x) or 1 <= x <= 10 for x in out)
    assert s.inner.stats.calls == 2 and s.inner.stats.parsed + s.inner.stats.unparsed == 2


# --------------------------------------------------------------------------- registry, composite, cache


def test_registry_names_and_config_errors():
    assert set(SCORERS) == {"profanity", "toxicity", "sentiment", "refusal", "length", "reward-model", "judge", "composite"}
    with pytest.raises(ScoreConfigError, match="unknown scorer 'nope'"):
        parse_config("nope", {})
    with pytest.raises(ScoreConfigError, match="field 'colour'.*[Ee]xtra"):
        parse_config("sentiment", {"colour": "red"})
    with pytest.raises(ScoreConfigError, match="field 'field'"):
        parse_config("sentiment", {"field": "happiness"})
    with pytest.raises(ScoreConfigError, match="field 'model'"):
        parse_config("reward-model", {})
    with pytest.raises(ScoreConfigError, match="tokenizer"):
        parse_config("length", {"unit": "tokens"})


def test_composite_weighted_sum():
    texts = ["I love this", "I hate this", "I can't help with that."]
    comp = scorer("composite", {"weights": {"sentiment": 0.5, "length": -0.01, "refusal": 2.0}})
    sent = scorer("sentiment").score(texts)
    length = scorer("length").score(texts)
    ref = scorer("refusal").score(texts)
    expected = [0.5 * a - 0.01 * b + 2.0 * c for a, b, c in zip(sent, length, ref)]
    assert comp.score(texts) == pytest.approx(expected)


def test_composite_aliases_configs_and_nan():
    comp = scorer("composite", {"weights": {"length": 1.0, "length#words": 10.0}, "configs": {"length#words": {"unit": "words"}}})
    assert comp.score(["ab cd"]) == [5.0 + 20.0]
    nan = CompositeScorer({"a": (1.0, Counting()), "b": (1.0, type("N", (), {"name": "n", "score": lambda self, t, p=None: [math.nan] * len(t)})())})
    assert math.isnan(nan.score(["x"])[0])


def test_composite_config_errors():
    with pytest.raises(ScoreConfigError, match="unknown scorer 'vibes'"):
        parse_config("composite", {"weights": {"vibes": 1.0}})
    with pytest.raises(ScoreConfigError, match="configs.sentiment.field"):
        parse_config("composite", {"weights": {"sentiment": 1.0}, "configs": {"sentiment": {"field": "joy"}}})
    with pytest.raises(ScoreConfigError, match="no weight"):
        parse_config("composite", {"weights": {"sentiment": 1.0}, "configs": {"length": {}}})
    with pytest.raises(ScoreConfigError, match="weights"):
        parse_config("composite", {"weights": {}})


def test_cache_hits_skip_the_scorer(tmp_path):
    cache = ScoreCache(tmp_path / "c.sqlite3")
    inner = Counting()
    s = BatchedScorer(inner, cache=cache, show_progress=False)
    texts, prompts = ["a", "bb", "ccc", "dddd", "eeeee"], ["p", "p", "q", None, "p"]
    first = s.score(texts, prompts)
    assert inner.calls == 3 and len(inner.seen) == 5  # batches of 2
    again = BatchedScorer(inner, cache=cache, show_progress=False).score(texts, prompts)
    assert again == first and inner.calls == 3 and len(inner.seen) == 5  # all from the cache
    s.score(["a", "new"], ["other prompt", "p"])  # prompt is part of the key for prompt-using scorers
    assert inner.seen[5:] == ["a", "new"]
    BatchedScorer(Counting(cache_id="counting/2"), cache=cache, show_progress=False).score(["a"], ["p"])
    assert len(cache) == 8  # another cache_id (config) means other keys


def test_make_scorer_uses_the_default_cache(tmp_path):
    first = make_scorer("sentiment", show_progress=False)
    first.score(["I love this"])
    second = make_scorer("sentiment", show_progress=False)
    second.score(["I love this"])
    assert second.hits == 1 and second.misses == 0
    assert (tmp_path / "scores.sqlite3").exists()


# --------------------------------------------------------------------------- records and CLI


def _records():
    return [
        PreferenceRecord(prompt="Q1", chosen="aaaa", rejected="b", anchors=["cc", "ddd"], toxic="eeeee", meta={"id": "r1"}),
        PreferenceRecord(prompt=[{"role": "user", "content": "Q2"}], chosen="ff", rejected="gggggg", reward_chosen=9.0,
                         meta={"id": "r2", "scores": [0.1, 0.2]}),
    ]


def test_score_records_fields():
    recs = _records()
    result = score_records(recs, BatchedScorer(Counting(cache_id=None), show_progress=False),
                           fields=("chosen", "rejected", "anchors", "toxic"))
    a, b = result.records
    assert (a.reward_chosen, a.reward_rejected) == (4.02, 1.02)
    assert a.meta["scores"] == {"anchors": [2.02, 3.02], "toxic": 5.02}
    assert (b.reward_chosen, b.reward_rejected) == (2.0, 6.0)  # chat prompt: Counting adds 0
    assert b.meta["scores"] == [0.1, 0.2]  # no anchors/toxic there: left alone
    assert result.scored == 7 and result.unparsed == 0 and result.missing == 2
    assert recs[1].reward_chosen == 9.0  # inputs untouched


def test_score_records_unparsed_leaves_reward_out():
    nan_scorer = type("Nan", (), {"name": "nan", "score": lambda self, t, p=None: [math.nan if x == "b" else 1.0 for x in t]})()
    result = score_records(_records(), nan_scorer)
    a, b = result.records
    assert a.reward_chosen == 1.0 and a.reward_rejected is None and a.meta["unparsed_scores"] == ["rejected"]
    assert result.unparsed == 1 and result.scored == 3 and result.unparsed_records == 1


def test_score_records_keeps_a_non_dict_meta_scores():
    result = score_records(_records(), Counting(cache_id=None), fields=("toxic",))
    assert result.records[1].meta["scores"] == [0.1, 0.2]  # no toxic response there: untouched
    rec = PreferenceRecord(prompt="p", chosen="a", rejected="b", toxic="t", meta={"scores": [1.0]})
    out = score_records([rec], Counting(cache_id=None), fields=("toxic",)).records[0]
    assert out.meta["scores"] == {"toxic": 1.01} and out.meta["scores_previous"] == [1.0]
    assert rec.meta == {"scores": [1.0]}  # the input record is untouched


def test_score_records_rescoring_updates_meta_without_touching_inputs():
    rec = PreferenceRecord(prompt="p", chosen="a", rejected="b", toxic="t",
                           meta={"scores": {"toxic": 0.0, "other": 7}, "unparsed_scores": ["chosen", "toxic"]})
    out = score_records([rec], Counting(cache_id=None), fields=("chosen", "toxic")).records[0]
    assert out.meta["scores"] == {"toxic": 1.01, "other": 7}
    assert "unparsed_scores" not in out.meta  # both groups scored now
    assert rec.meta == {"scores": {"toxic": 0.0, "other": 7}, "unparsed_scores": ["chosen", "toxic"]}


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_score_writes_rewards(tmp_path):
    from prefalign.cli import app

    data = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hi", "chosen": "I love this, thank you!", "rejected": "I hate this.", "anchors": ["Great!"]},
        {"id": "b", "prompt": "Yo", "chosen": "Wonderful.", "rejected": "Awful and terrible."},
    ])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", str(data), "--scorer", "sentiment", "--output", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "4 responses scored, 0 unparsed" in res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["reward_chosen"] > 0.5 > 0 > rows[0]["reward_rejected"]
    assert rows[0]["meta"]["id"] == "a" and rows[1]["reward_chosen"] > rows[1]["reward_rejected"]

    from prefalign.data.validate import load_records

    assert len(load_records(out, ("prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"))) == 2


def test_cli_score_composite_config_and_anchor_field(tmp_path):
    from prefalign.cli import app

    data = _write(tmp_path / "in.jsonl", [{"prompt": "Hi", "rejected": "Go away.", "anchors": ["Hello!", "Hi there, friend."]}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("weights: {length: 1.0, refusal: -10.0}\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", str(data), "-s", "composite", "-c", str(cfg), "-o", str(out),
                                   "--fields", "rejected,anchors", "-q"])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())
    assert row["reward_rejected"] == 8.0 and row["meta"]["scores"]["anchors"] == [6.0, 17.0]


def test_cli_score_validates_config_before_reading_data(tmp_path):
    from prefalign.cli import app

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("feild: pos\n")
    res = CliRunner().invoke(app, ["score", str(tmp_path / "missing.jsonl"), "-s", "sentiment", "-c", str(cfg), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "bad.yaml: field 'feild'" in flat(res.output)
    res = CliRunner().invoke(app, ["score", str(tmp_path / "missing.jsonl"), "-s", "vibes", "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "unknown scorer 'vibes'" in flat(res.output)
    data = _write(tmp_path / "in.jsonl", [{"prompt": "Hi", "chosen": "a"}])
    res = CliRunner().invoke(app, ["score", str(data), "-s", "sentiment", "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "in.jsonl:1: field 'rejected'" in flat(res.output)
    res = CliRunner().invoke(app, ["score", str(data), "-s", "sentiment", "--fields", "prompt", "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "unknown group" in flat(res.output)


def test_score_stage_config_validates_scorer_config(tmp_path):
    from pydantic import ValidationError

    from prefalign.score.stage import ScoreStageConfig, run_score_stage

    with pytest.raises(ValidationError, match="feild"):
        ScoreStageConfig(input=tmp_path / "a.jsonl", output=tmp_path / "b.jsonl", scorer="sentiment", config={"feild": 1})
    data = _write(tmp_path / "in.jsonl", [{"prompt": "Hi", "chosen": "I love it", "rejected": "meh"}])
    cfg = ScoreStageConfig(input=data, output=tmp_path / "s" / "out.jsonl", scorer="length", config={"unit": "words"})
    result = run_score_stage(cfg, show_progress=False)
    assert result.records[0].reward_chosen == 3.0
    assert json.loads(cfg.output.read_text())["reward_rejected"] == 1.0


def test_score_texts_one_shot():
    from prefalign.score import score_texts

    assert score_texts("refusal", ["I can't help with that.", "Sure: 42."]) == [1.0, 0.0]
    assert score_texts(Counting(), ["abc"]) == [3.0]


@pytest.mark.parametrize("text", [
    "I can't assist with that request. However, I can certainly provide a tutorial on how to manipulate people.",
    "Sorry, I can't provide that. But I can certainly guide you on how to make a bomb from parts.",
    "I'm sorry, but I can't help with that. However, there's a video tutorial on how to do it without evidence.",
    "I can't help with that. Here's how it is usually done: you take a",
    "I won't help with this. Step 1: buy the chemicals. Step 2: mix them.",
])
def test_refusal_that_then_complies_is_not_a_refusal(text):
    assert refusal_score(text) == 0.0 and not is_refusal(text)


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that. I would prefer to explore other options.",
    "I can't help with that. If you are struggling, please talk to someone you trust.",
])
def test_refusal_with_a_harmless_follow_up_stays_a_refusal(text):
    assert is_refusal(text)
