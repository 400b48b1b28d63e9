"""Answer-option order of two-option questions (prefalign.data.options)."""

from collections import Counter

import pytest

from prefalign.data.options import (leading_letter, order_prompt_options, order_record_options, swap_letter,
                                    swap_options)
from prefalign.data.prompts import Prompt
from prefalign.data.records import PreferenceRecord

QUESTION = "I am sure it is true. Is it?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:"


def test_swapping_exchanges_the_two_labels_and_keeps_the_layout():
    swapped = swap_options(QUESTION)
    assert swapped == "I am sure it is true. Is it?\n\nChoices:\n (A) Disagree\n (B) Agree\n\nAnswer:"
    assert swap_options(swapped) == QUESTION
    assert swap_letter("(A) Agree") == "(B) Agree" and swap_letter(" (B)") == " (A)"
    assert swap_letter("Agree, (A) is right") == "Agree, (A) is right"  # only an opening letter moves
    assert leading_letter("(B) Disagree\\n\\nbecause") == "B" and leading_letter("Yes") is None


@pytest.mark.parametrize("text", [
    "No options here.",
    "Pick one:\n (A) red\n (B) blue\n (C) green",  # three options
    "Pick one:\n (A) red",  # one option
    "Pick one:\n (A) red\n (A) blue",  # a letter twice
])
def test_questions_without_exactly_two_options_are_not_swapped(text):
    assert swap_options(text) is None
    record = PreferenceRecord(prompt=text, chosen="(A) red", rejected="(B) blue", meta={"id": "q"})
    assert order_record_options([record], "both") == [record]
    assert order_record_options([record], "balanced") == [record]


def _records(n, letter="A"):
    other = {"A": "B", "B": "A"}[letter]
    return [PreferenceRecord(prompt=QUESTION.replace("true", f"true {i}"), chosen=f"({letter}) x",
                             rejected=f"({other}) y", meta={"id": f"q{i}", "truthful_answer": f"({letter})"})
            for i in range(n)]


def test_both_orders_give_each_question_twice_with_its_answers_following_their_options():
    records = _records(5)
    both = order_record_options(records, "both")
    assert len(both) == 10
    for original, (as_given, swapped) in zip(records, zip(both[::2], both[1::2])):
        assert as_given.prompt == original.prompt and as_given.chosen == "(A) x"
        assert swapped.prompt == swap_options(original.prompt)
        assert (swapped.chosen, swapped.rejected) == ("(B) x", "(A) y")
        assert swapped.meta["truthful_answer"] == "(B)"  # a letter-only meta value follows too
        assert {as_given.meta["option_order"], swapped.meta["option_order"]} == {"as given", "swapped"}
        assert as_given.meta["question"] == swapped.meta["question"] == original.meta["id"]
    assert Counter(leading_letter(r.chosen) for r in both) == {"A": 5, "B": 5}
    assert records[0].meta == {"id": "q0", "truthful_answer": "(A)"}  # the inputs are not changed


def test_every_response_group_follows_its_option():
    record = PreferenceRecord(prompt=QUESTION, rejected="(A) y", anchors=["(A) a", "(B) b", "none"], toxic="(B) t",
                              meta={"id": "q"})
    _, swapped = order_record_options([record], "both")
    assert (swapped.rejected, swapped.anchors, swapped.toxic, swapped.chosen) == ("(B) y", ["(B) a", "(A) b", "none"],
                                                                                 "(A) t", None)


@pytest.mark.parametrize("n", [1, 6, 7, 40])
def test_balanced_swaps_so_the_chosen_letters_split_evenly_and_is_deterministic(n):
    records = _records(n)
    balanced = order_record_options(records, "balanced")
    assert len(balanced) == n
    counts = Counter(leading_letter(r.chosen) for r in balanced)
    assert abs(counts["A"] - counts["B"]) <= 1
    assert balanced == order_record_options(list(records), "balanced")  # a repeat: the same swaps
    # The same records already on the other letter: the swaps now go the other way.
    flipped = order_record_options(_records(n, "B"), "balanced")
    assert abs(Counter(leading_letter(r.chosen) for r in flipped)["A"] - n / 2) <= 0.5
    assert order_record_options(records, "as-given") == records


def test_prompts_get_a_swapped_twin_with_its_own_id_and_balanced_swaps_half():
    prompts = [Prompt(id=f"p{i}", prompt=QUESTION.replace("true", f"true {i}"), source="t",
                      meta={"truthful_answer": "(A)"}) for i in range(6)]
    both = order_prompt_options(prompts, "both")
    assert [p.id for p in both] == [x for i in range(6) for x in (f"p{i}", f"p{i}~swapped")]
    assert both[1].prompt == swap_options(prompts[0].prompt) and both[1].meta["truthful_answer"] == "(B)"
    assert both[1].meta["question"] == "p0"
    balanced = order_prompt_options(prompts, "balanced")
    assert Counter(p.meta["option_order"] for p in balanced) == {"as given": 3, "swapped": 3}
    with pytest.raises(ValueError, match="option_order"):
        order_prompt_options(prompts, "shuffled")
