"""``prefalign run RECIPE.yaml``: the stages of a recipe (split, generate, merge, score, select, train-rm, train,
eval) in order, each cached by its inputs.

A recipe names its stages in order; each has a ``kind`` and that kind's typed config. A value may
refer to another stage's output as ``${stage.output}`` (e.g. ``data: ${score.output}``) or to
``${model}`` / ``${output_dir}``. Every output path is fixed by the recipe, so the whole recipe —
every stage's config, with references filled in — is validated before any work starts.

Caching: a stage's key is a hash of its kind, its resolved config and the keys of the stages it
reads. A finished stage writes ``.stage.json`` with that key, and a re-run skips it. A stage that
was interrupted runs again and resumes (generation skips finished prompts, training resumes from
its last checkpoint, evaluation reuses saved samples); a stage whose config changed starts over.
A finished training stage drops its checkpoints: they only served resuming it.

Under N processes (``accelerate launch``, ``torchrun``) every process runs each stage; the kinds
marked ``sharded`` (generate, train, eval) split their work over the processes, the short file-only
kinds (split, merge, score, select) run on the main process while the others wait, and the main process
alone decides which stages are done and writes the stage files. A train-rm stage that is not done
yet is refused up front: run it in one process first.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefalign.configfile import read_yaml_mapping, validation_messages
from prefalign.data.errors import DataError
from prefalign.data.io import write_text_atomic
from prefalign.data.options import check_option_order
from prefalign.sharding import distributed_state, from_main, is_main, main_writes

REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_]+))?\}")
MARKER, RUNNING = ".stage.json", ".stage-running.json"


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file and the field."""


# --------------------------------------------------------------------------------- stage kinds


@dataclass(frozen=True)
class StageKind:
    """How one kind of stage validates, where it writes, and how it runs."""

    name: str
    defaults: Callable[[Path], dict]  # stage dir -> default values (output paths)
    validate: Callable[[dict], Any]  # resolved values -> typed config (raises on bad input)
    outputs: Callable[[Any, Path], dict[str, str]]  # config, stage dir -> named outputs
    run: Callable[[Any, Path, bool], None]  # config, stage dir, show_progress
    # config -> None, once the stage is marked done: drop what only served resuming it
    after_done: Callable[[Any], None] = lambda cfg: None
    # Runs under N processes itself (each process runs it, the work split, one writer; see
    # prefalign.sharding).
    sharded: bool = False
    # A short stage that only reads and writes files (seconds): under N processes the main process
    # runs it while the others wait. A recipe launched on N processes refuses a stage that is
    # neither sharded nor main_only (train-rm: minutes of training, the others would sit at a
    # barrier that can time out).
    main_only: bool = False
    # Where the stage's seed lives in its values (generation samples, training order, evaluation
    # samples); empty for stages that draw nothing. `prefalign run --seed N` shifts it by N.
    seed_field: tuple[str, ...] = ()


class SplitStage(BaseModel):
    """Split a preference file into train and eval files by a stable hash of each record's
    normalised prompt text, or export a built-in set: the sycophancy pairs (``source:
    rho-sycophancy``; ``claim-sycophancy``, synthetic ones from labelled claims), or a prompt source's written answers as ``prompt`` + ``chosen`` records
    (``source: rho-qa``, any source whose prompts carry ``reference_answer``)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "split"
    input: Path | None = None
    # rho-sycophancy / claim-sycophancy: labelled sycophancy pairs (truthful = chosen); another prompt source: its
    # prompts' reference answers as chosen (prefalign.data.prompts.answer_records)
    source: str | None = None
    eval_fraction: float = Field(0.48, gt=0, lt=1)  # the sycophancy pairs: 104 of 250 held out
    # The hash's salt. The default is the one every prompt source splits with, so a question is on
    # one side in every stage; a split of a split (a dev split of the train side) needs its own
    # salt, or every record would land on the side the first split put it.
    salt: str = Field("prefalign", min_length=1)
    # Two-option questions: ``both`` writes each question as given and with its options swapped,
    # ``balanced`` swaps half so the chosen letters alternate (prefalign.data.options), on each
    # side after the split, so a question and its twin are on the same side. One order for both
    # sides, or one per side: ``{train: balanced, eval: both}``.
    option_order: str | dict[str, str] = "as-given"
    train: Path
    eval: Path

    @field_validator("option_order")
    @classmethod
    def _option_order(cls, value):
        orders = value if isinstance(value, dict) else {"": value}
        if isinstance(value, dict) and (not value or set(value) - {"train", "eval"}):
            raise ValueError(f"one order, or one per side {{train: ..., eval: ...}}; got sides {sorted(value)}")
        for order in orders.values():
            check_option_order(order)
        return value

    def order_of(self, side: str) -> str:
        """The option order of one side ("train" or "eval")."""
        return self.option_order.get(side, "as-given") if isinstance(self.option_order, dict) else self.option_order

    def model_post_init(self, _):
        if (self.input is None) == (self.source is None):
            raise ValueError(f"give exactly one of input (a preference file) or source (a pair set: {', '.join(PAIR_SOURCES)}; or a prompt source's written answers)")
        known = split_sources()
        if self.source is not None and self.source not in known:
            raise ValueError(f"source: unknown source '{self.source}' ({', '.join(known)})")


def split_sources() -> list[str]:
    """What a split stage's ``source`` may name: the sycophancy pairs, or a prompt source (its
    written answers; one without any fails when the stage runs, naming the field)."""
    from prefalign.data.prompts import PROMPT_SOURCES

    return [*PAIR_SOURCES, *(name for name, spec in PROMPT_SOURCES.items() if not spec.needs_path and name not in PAIR_SOURCES)]


def _sycophancy_pairs():
    from prefalign.data.sources import load_sycophancy_pairs

    return load_sycophancy_pairs()


def _claim_pairs():
    from prefalign.data.claims import load_claim_sycophancy_pairs

    return load_claim_sycophancy_pairs()


#: Built-in labelled pair sets a split stage exports (truthful answer = chosen); any other source
#: name is a prompt source, exported as its written answers.
PAIR_SOURCES = {"rho-sycophancy": _sycophancy_pairs, "claim-sycophancy": _claim_pairs}


def _run_split(cfg: SplitStage, stage_dir: Path, show_progress: bool) -> None:
    from prefalign.data.io import write_jsonl
    from prefalign.data.options import order_record_options
    from prefalign.data.sources import normalise_prompt, stable_split
    from prefalign.data.validate import load_records

    if cfg.source in PAIR_SOURCES:
        records = PAIR_SOURCES[cfg.source]()
    elif cfg.source:
        from prefalign.data.prompts import answer_records

        records = answer_records(cfg.source)
    else:
        records = load_records(cfg.input, ("prompt",)).records
    # By the prompt's text, as prompt sources split: a question is on one side in every stage.
    train, evaluation = stable_split(records, key=lambda r: normalise_prompt(r.prompt if isinstance(r.prompt, str) else json.dumps(r.prompt)),
                                     eval_fraction=cfg.eval_fraction, salt=cfg.salt)
    train, evaluation = (order_record_options(part, cfg.order_of(side)) for side, part in (("train", train), ("eval", evaluation)))
    where = cfg.input or cfg.source
    for side, part in (("train", train), ("eval", evaluation)):
        if not part:
            hint = (" (a split of a split needs its own salt: the default one puts every record on the side the "
                    "first split chose)") if cfg.salt == "prefalign" and cfg.input is not None else ""
            raise ValueError(f"split of {where}: the {side} side is empty ({len(records)} records, eval_fraction "
                             f"{cfg.eval_fraction}, salt {cfg.salt!r}){hint}")
    write_jsonl(cfg.train, train)
    write_jsonl(cfg.eval, evaluation)


class MergeStage(BaseModel):
    """Concatenate record files (e.g. harmful-prompt pairs and benign-prompt pairs) into one, in
    the order given, each line unchanged; with ``weights`` (one per input), each record's loss
    weight is multiplied by its file's (the record field ``weight``, 1 when absent). With
    ``option_order: both``, every record of a two-option question ("(A) Agree / (B) Disagree") is
    followed by its mirror: the question with its options swapped, every response's opening
    letter following its option, rewards, weight and the rest unchanged
    (:mod:`prefalign.data.options`)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "merge"
    inputs: list[Path] = Field(..., min_length=1)
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    # Why mirror pairs: the letters a pair's two answers open with carry a signal of their own
    # whenever they are not spread evenly over the two sides (a teacher's favourite letter on its
    # unsteered answers, pairs dropped for identical answers, more (B) than (A) among the chosen
    # ones however balanced the questions were), and a small policy learns the letter first. A
    # pair and its mirror push the two letters equally; what is left is the answers' content.
    # ``balanced`` swaps half instead (no twins).
    option_order: str = "as-given"
    output: Path

    @field_validator("option_order")
    @classmethod
    def _option_order(cls, value):
        return check_option_order(value)

    def model_post_init(self, _):
        if self.weights is not None and len(self.weights) != len(self.inputs):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.inputs)} inputs (one per input)")


def _weighted_lines(path: Path, weight: float) -> list[str]:
    """The records of ``path`` as JSON lines, each ``weight`` field multiplied by ``weight``."""
    from prefalign.data.io import read_rows, type_name

    lines = []
    for number, row in read_rows(path):
        before = 1.0 if row.get("weight") is None else row["weight"]  # absent or null: 1, as validation reads it
        if isinstance(before, bool) or not isinstance(before, (int, float)):
            raise DataError(f"expected a number, found {type_name(before)}", path=path, line=number, field="weight")
        lines.append(json.dumps({**row, "weight": before * weight}, ensure_ascii=False))
    return lines


def _run_merge(cfg: MergeStage, stage_dir: Path, show_progress: bool) -> None:
    if cfg.option_order != "as-given":
        _run_merge_ordered(cfg)
        return
    lines = []
    for i, path in enumerate(cfg.inputs):
        if cfg.weights is None or cfg.weights[i] == 1.0:
            lines += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            lines += _weighted_lines(Path(path), cfg.weights[i])
    write_text_atomic(cfg.output, "".join(line + "\n" for line in lines))
    print(f"merged {len(lines)} records from {len(cfg.inputs)} files into {cfg.output}")


def _run_merge_ordered(cfg: MergeStage) -> None:
    """The merge with an option order: records read through the one record reader (a bad row is an
    error naming its input file, line and field), weighted, ordered, written."""
    from prefalign.data.io import write_jsonl
    from prefalign.data.options import order_record_options
    from prefalign.data.validate import load_records

    records = []
    for i, path in enumerate(cfg.inputs):
        part = load_records(path, ("prompt",)).records
        weight = 1.0 if cfg.weights is None else cfg.weights[i]
        records += part if weight == 1.0 else [replace(r, weight=r.loss_weight * weight) for r in part]
    ordered = order_record_options(records, cfg.option_order)
    write_jsonl(cfg.output, ordered)
    twins = sum(1 for r in ordered if r.meta.get("option_order") == "swapped")
    print(f"merged {len(records)} records from {len(cfg.inputs)} files into {cfg.output}, option order "
          f"{cfg.option_order}: {len(ordered)} records, {twins} with their options swapped")


class SelectStage(BaseModel):
    """Best-of-N over the records that share a prompt (prompts keep their first-seen order).

    ``pairing: keep``: the ``keep`` records that score highest ``by`` ``reward_chosen`` (the best
    chosen answer, e.g. the best of N revisions by a reward model) or ``margin``
    (``reward_chosen - reward_rejected``), unchanged. ``pairing: best-vs-worst``: one new pair per
    prompt, the best record's chosen answer against the worst record's chosen answer, with their
    ``reward_chosen`` as the pair's rewards (prompts with one distinct answer or no gap drop out):
    the two sides then differ in what the scorer ranked (e.g. the answer option a revision
    commits to), not in form. ``rank_rejected: true`` (best-vs-worst only) ranks every record's
    rejected answer too, by its ``reward_rejected``: with N revisions of one original answer, the
    original is one more candidate, and a prompt whose other revisions were dropped for being
    identical to the original still gets its pair."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "select"
    input: Path
    by: Literal["reward_chosen", "margin"] = "reward_chosen"
    keep: int = Field(1, ge=1)
    pairing: Literal["keep", "best-vs-worst"] = "keep"
    rank_rejected: bool = False
    output: Path

    def model_post_init(self, _):
        if self.pairing == "best-vs-worst" and (self.by != "reward_chosen" or self.keep != 1):
            raise ValueError("pairing best-vs-worst ranks the chosen answers: it takes by: reward_chosen and keep: 1")
        if self.rank_rejected and self.pairing != "best-vs-worst":
            raise ValueError("rank_rejected: ranks rejected answers against chosen ones; it needs pairing: best-vs-worst")


def _selection_score(row: dict, by: str, where: str) -> float:
    fields = ("reward_chosen",) if by == "reward_chosen" else ("reward_chosen", "reward_rejected")
    values = []
    for name in fields:
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: field '{name}': select by {by} needs a number here (got {value!r}); "
                            "score the records first (a score stage)")
        values.append(float(value))
    score = values[0] if by == "reward_chosen" else values[0] - values[1]
    return score if math.isfinite(score) else -math.inf  # an unscored (NaN) record ranks last


def _as_candidate(row: dict, where: str) -> dict:
    """A record's rejected answer as a candidate of its own (its ``reward_rejected`` as its score)."""
    _selection_score(row, "margin", where)  # both rewards must be numbers
    meta = {**(row.get("meta") or {}), "select_side": "rejected"}
    return {**row, "chosen": row["rejected"], "reward_chosen": row["reward_rejected"], "meta": meta}


def _best_vs_worst(ranked: list[tuple[float, int, dict]]) -> dict | None:
    (top, _, best), (bottom, line, worst) = ranked[0], ranked[-1]
    if not (top > bottom > -math.inf) or best["chosen"] == worst["chosen"]:
        return None
    meta = dict(best.get("meta") or {})
    select = {"pairing": "best-vs-worst", "rejected_line": line}
    if meta.pop("select_side", None):  # the chosen answer was a record's rejected one (rank_rejected)
        select["chosen_side"] = "rejected"
    if (worst.get("meta") or {}).get("select_side"):
        select["rejected_side"] = "rejected"
    return {**best, "rejected": worst["chosen"], "reward_rejected": worst["reward_chosen"],
            "meta": {**meta, "select": select}}


def _run_select(cfg: SelectStage, stage_dir: Path, show_progress: bool) -> None:
    from prefalign.data.io import read_rows, write_jsonl

    groups: dict[str, list[tuple[float, int, dict]]] = {}
    for number, row in read_rows(cfg.input):
        prompt = row.get("prompt")
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        where = f"{cfg.input}:{number}"
        groups.setdefault(key, []).append((_selection_score(row, cfg.by, where), number, row))
        if cfg.rank_rejected:
            candidate = _as_candidate(row, where)
            groups[key].append((_selection_score(candidate, cfg.by, where), number, candidate))
    ranked = [sorted(group, key=lambda item: (-item[0], item[1])) for group in groups.values()]
    if cfg.pairing == "best-vs-worst":
        kept = [pair for group in ranked if (pair := _best_vs_worst(group)) is not None]
        how = "best against worst chosen answer per prompt"
    else:
        kept = [row for group in ranked for _, _, row in group[: cfg.keep]]
        how = f"best {cfg.keep} per prompt by {cfg.by}"
    write_jsonl(cfg.output, kept)
    total = len({number for group in groups.values() for _, number, _ in group})
    if cfg.rank_rejected:
        how += ", their rejected answers ranked too"
    print(f"selected {len(kept)} from {total} records ({how}, {len(groups)} prompts) into {cfg.output}")


def _generate_kind() -> StageKind:
    def validate(values):
        from prefalign.generate.config import GenerateConfig

        values = {k: v for k, v in values.items() if k != "kind"}
        cfg = GenerateConfig.model_validate(values)
        cfg.strategy_config()  # the strategy's own params, validated now
        return cfg

    def run(cfg, stage_dir, show_progress):
        from prefalign.generate.runner import run_from_config

        run_from_config(cfg, show_progress=show_progress, echo=print)

    return StageKind("generate", lambda d: {"output": str(d / "data.jsonl")}, validate,
                     lambda cfg, d: {"output": str(cfg.output)}, run, sharded=True, seed_field=("seed",))


def _train_kind() -> StageKind:
    def validate(values):
        from prefalign.train.config import TrainConfig

        return TrainConfig.model_validate({k: v for k, v in values.items() if k != "kind"})

    def outputs(cfg, stage_dir):
        model = cfg.output_dir / ("model" if cfg.lora is None or cfg.merge else "adapter")
        snapshots = {f"model_step{step}": str(model.with_name(f"{model.name}-step{step}")) for step in cfg.snapshot_steps}
        return {"model": str(model), "output_dir": str(cfg.output_dir), "log": str(cfg.output_dir / "train_log.jsonl"), **snapshots}

    def run(cfg, stage_dir, show_progress):
        from prefalign.train.checkpoint import latest_checkpoint
        from prefalign.train.loop import run_training

        run_training(cfg, resume=latest_checkpoint(cfg.output_dir) is not None, show_progress=show_progress)

    def after_done(cfg):
        # A done stage is never resumed (a changed config starts it over).
        from prefalign.train.checkpoint import drop_checkpoints

        drop_checkpoints(cfg.output_dir)

    return StageKind("train", lambda d: {"output_dir": str(d)}, validate, outputs, run, after_done, sharded=True,
                     seed_field=("seed",))


def _eval_kind() -> StageKind:
    def validate(values):
        from prefalign.evaluate.runner import EvalConfig

        return EvalConfig.model_validate({k: v for k, v in values.items() if k != "kind"})

    def run(cfg, stage_dir, show_progress):
        from prefalign.evaluate.report import markdown_summary
        from prefalign.evaluate.runner import run_eval
        from prefalign.models.card import add_eval_summary

        result, paths = run_eval(cfg, show_progress=show_progress)
        if not is_main(distributed_state()):
            return  # every process has the result; the main process prints it and writes the cards
        summary = markdown_summary(result)
        print(summary)
        print(f"report: {paths['html']}")
        for model in cfg.models.values():  # trained folders' model cards get the summary
            add_eval_summary(model, summary, paths["json"])

    return StageKind("eval", lambda d: {"output_dir": str(d)}, validate,
                     lambda cfg, d: {"report": str(cfg.output_dir / "report.html"), "metrics": str(cfg.output_dir / "metrics.json")}, run,
                     sharded=True, seed_field=("sampling", "seed"))


def _score_kind() -> StageKind:
    def validate(values):
        from prefalign.score.stage import ScoreStageConfig

        return ScoreStageConfig.model_validate({k: v for k, v in values.items() if k != "kind"})

    def run(cfg, stage_dir, show_progress):
        from prefalign.score.stage import run_score_stage

        run_score_stage(cfg, show_progress=show_progress)

    return StageKind("score", lambda d: {"output": str(d / "scored.jsonl")}, validate,
                     lambda cfg, d: {"output": str(cfg.output)}, run, main_only=True)


def _train_rm_kind() -> StageKind:
    def validate(values):
        from prefalign.train_rm.config import RewardTrainConfig

        return RewardTrainConfig.model_validate({k: v for k, v in values.items() if k != "kind"})

    def run(cfg, stage_dir, show_progress):
        from prefalign.train_rm.loop import train_reward_model

        result = train_reward_model(cfg, show_progress=show_progress)
        print(f"reward model: {result}")

    return StageKind("train-rm", lambda d: {"output_dir": str(d)}, validate,
                     lambda cfg, d: {"model": str(cfg.output_dir / "model")}, run, seed_field=("seed",))


STAGE_KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("split", lambda d: {"train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl")},
                  lambda v: SplitStage.model_validate(v), lambda c, d: {"train": str(c.train), "eval": str(c.eval)}, _run_split,
                  main_only=True),
        StageKind("merge", lambda d: {"output": str(d / "data.jsonl")}, lambda v: MergeStage.model_validate(v),
                  lambda c, d: {"output": str(c.output)}, _run_merge, main_only=True),
        StageKind("select", lambda d: {"output": str(d / "data.jsonl")}, lambda v: SelectStage.model_validate(v),
                  lambda c, d: {"output": str(c.output)}, _run_select, main_only=True),
        _generate_kind(),
        _score_kind(),
        _train_kind(),
        _train_rm_kind(),
        _eval_kind(),
    )
}


# ------------------------------------------------------------------------------------- recipe


@dataclass
class PlannedStage:
    name: str
    kind: StageKind
    config: Any
    directory: Path
    outputs: dict[str, str]
    key: str
    depends: list[str]


def _substitute(value, lookup: Callable[[str, str | None], str], used: set[str]):
    if isinstance(value, str):
        whole = REF.fullmatch(value)

        def repl(m):
            used.add(m.group(1))
            return str(lookup(m.group(1), m.group(2)))

        return lookup_whole(whole, lookup, used) if whole else REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, lookup, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, lookup, used) for v in value]
    return value


def lookup_whole(match, lookup, used):
    used.add(match.group(1))
    return lookup(match.group(1), match.group(2))


def _error_lines(exc: Exception, source: str, stage: str) -> str:
    if isinstance(exc, ValidationError):
        return validation_messages(exc, source, f"stages.{stage}")
    return f"{source}: field 'stages.{stage}': {exc}"


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: mappings merge key by key, anything else is replaced; a
    ``null`` value deletes the key (e.g. a stage the variant does not run)."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _stage_defaults(value, path: Path) -> dict[str, dict]:
    """A recipe's ``defaults:``: stage kind -> the values every stage of that kind starts from."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: field 'defaults': expected a mapping of stage kind -> values")
    for kind, values in value.items():
        if kind not in STAGE_KINDS:
            raise RecipeError(f"{path}: field 'defaults.{kind}': not a stage kind ({', '.join(STAGE_KINDS)})")
        if not isinstance(values, dict) or "kind" in values:
            raise RecipeError(f"{path}: field 'defaults.{kind}': expected a mapping of {kind} stage values (without 'kind')")
    return value


def _overlay(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, mappings key by key; a ``null`` is a value (``refusal_scorer: null``)."""
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _overlay(merged[key], value) if both else value
    return merged


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe's mapping, with ``extends: OTHER.yaml`` (a path relative to this file) and
    ``defaults:`` resolved: a variant (e.g. a GPU-scale one) states only what differs from the
    recipe it extends.

    ``defaults: {KIND: {...}}`` are values for every stage of that kind, laid over what the file
    extends and under the values the file itself gives a stage: in a recipe, shared settings of its
    stages; in a variant, what changes in every stage of a kind (``defaults: {train: {lora: ...}}``).
    Nulls delete a key in a variant (as ``extends`` merges); in a recipe's own stages a null is a value."""
    path = Path(path)
    recipe = read_yaml_mapping(path, RecipeError)
    parent = recipe.pop("extends", None)
    defaults = _stage_defaults(recipe.pop("defaults", None), path)
    own = recipe.get("stages") if isinstance(recipe.get("stages"), dict) else {}
    if parent is None:
        if own:
            recipe["stages"] = {name: _overlay(_defaults_for(values, defaults), values) if isinstance(values, dict) else values
                                for name, values in own.items()}
        return recipe
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError(f"{path}: field 'extends': expected the path of another recipe (relative to this file)")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise RecipeError(f"{path}: field 'extends': {parent} extends itself (a cycle)")
    if not parent_path.is_file():
        raise RecipeError(f"{path}: field 'extends': no recipe at {parent_path}")
    base = read_recipe(parent_path, (*_seen, path.resolve()))
    if defaults:
        base["stages"] = {name: deep_merge(values, _defaults_for(values, defaults)) if isinstance(values, dict) else values
                          for name, values in base.get("stages", {}).items()}
        # A stage the variant adds starts from the defaults too.
        recipe["stages"] = {name: deep_merge(_defaults_for(values, defaults), values)
                            if name not in base["stages"] and isinstance(values, dict) else values
                            for name, values in own.items()}
    return deep_merge(base, recipe)


def _defaults_for(stage: dict, defaults: dict[str, dict]) -> dict:
    kind = stage.get("kind")
    return defaults.get(kind, {}) if isinstance(kind, str) else {}


def shipped_recipe(name: str) -> Path:
    """``recipes/NAME.yaml`` as prefalign ships it: in the source checkout (an editable install, as
    the Makefile's), else the copy a wheel installs under ``<prefix>/share/prefalign/recipes/``
    (``data-files`` in pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2]
    folders = ([checkout / "recipes"] if (checkout / "pyproject.toml").is_file() else []) + \
        [Path(sysconfig.get_path("data")) / "share" / "prefalign" / "recipes"]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise FileNotFoundError(f"recipe '{name}': not in {' or '.join(str(f) for f in folders)}")


def _with_value(values: dict, field: tuple[str, ...], value) -> dict:
    """A copy of ``values`` with ``value`` at the nested ``field`` (mappings on the way made as needed)."""
    head, *rest = field
    if not rest:
        return {**values, head: value}
    inner = values.get(head)
    return {**values, head: _with_value(inner if isinstance(inner, dict) else {}, tuple(rest), value)}


def _shift_seed(config, kind: StageKind, resolved: dict, shift: int):
    """The stage's config with its seed moved by ``shift`` (the recipe's own seed, or the default,
    plus the shift: stages that draw with different seeds keep drawing differently)."""
    current = config
    for part in kind.seed_field:
        current = getattr(current, part)
    return kind.validate(_with_value(resolved, kind.seed_field, current + shift))


def plan_recipe(path: Path, *, output_dir: Path | None = None, overrides: dict | None = None,
                seed: int = 0) -> list[PlannedStage]:
    """Read and validate the whole recipe (every stage, references filled in) before any work.
    ``overrides`` are laid over the recipe as a variant's values are (e.g. ``{"model": ...}``).
    ``seed`` ≠ 0 is a replicate: every stage's seed shifted by it, and, without ``output_dir``,
    its own folder (the recipe's ``output_dir`` + ``-seedN``); prompt choices and splits stay."""
    source = str(path)
    recipe = deep_merge(read_recipe(path), overrides or {})
    if not isinstance(recipe.get("stages"), dict) or not recipe["stages"]:
        raise RecipeError(f"{source}: field 'stages': a recipe needs a mapping of stage name -> stage config")
    unknown = set(recipe) - {"name", "description", "output_dir", "model", "stages"}
    if unknown:
        raise RecipeError(f"{source}: field '{sorted(unknown)[0]}': unknown top-level field (name, description, output_dir, model, stages)")
    root = Path(output_dir or recipe.get("output_dir") or Path("runs") / Path(path).stem)
    if seed and output_dir is None:
        root = root.with_name(f"{root.name}-seed{seed}")
    variables = {"model": recipe.get("model", "smollm2-135m-instruct"), "output_dir": str(root)}
    planned: dict[str, PlannedStage] = {}
    for name, values in recipe["stages"].items():
        if not isinstance(values, dict) or values.get("kind") not in STAGE_KINDS:
            raise RecipeError(f"{source}: field 'stages.{name}.kind': must be one of {', '.join(STAGE_KINDS)}")
        kind = STAGE_KINDS[values["kind"]]
        directory = root / name

        def lookup(ref: str, attr: str | None, _stage=name):
            if attr is None:
                if ref in variables:
                    return variables[ref]
                raise RecipeError(f"{source}: field 'stages.{_stage}': unknown variable ${{{ref}}}")
            if ref not in planned:
                raise RecipeError(f"{source}: field 'stages.{_stage}': ${{{ref}.{attr}}} refers to no earlier stage")
            if attr not in planned[ref].outputs:
                raise RecipeError(f"{source}: field 'stages.{_stage}': stage '{ref}' has no output '{attr}' ({', '.join(planned[ref].outputs)})")
            return planned[ref].outputs[attr]

        used: set[str] = set()
        resolved = {**kind.defaults(directory), **_substitute(values, lookup, used)}
        try:
            config = kind.validate(resolved)
            if seed and kind.seed_field:
                config = _shift_seed(config, kind, resolved, seed)
        except (ValidationError, ValueError) as exc:
            raise RecipeError(_error_lines(exc, source, name)) from None
        depends = sorted(u for u in used if u in planned)
        blob = json.dumps([kind.name, _jsonable(config), [planned[d].key for d in depends]], sort_keys=True, default=str)
        planned[name] = PlannedStage(name, kind, config, directory, kind.outputs(config, directory),
                                     hashlib.sha256(blob.encode()).hexdigest()[:16], depends)
    return list(planned.values())


def _jsonable(config) -> Any:
    # Values left at their defaults are not part of a stage's key: a new option (with a default that
    # keeps today's behaviour) must not make every finished stage of every run start over.
    return config.model_dump(mode="json", exclude_defaults=True) if hasattr(config, "model_dump") else config


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stage_state(stage: PlannedStage) -> str:
    done = _read(stage.directory / MARKER)
    if done and done.get("key") == stage.key:
        return "done"
    running = _read(stage.directory / RUNNING)
    if running and running.get("key") == stage.key:
        return "interrupted"
    return "new"


def run_recipe(path: Path, *, output_dir: Path | None = None, only: list[str] | None = None, show_progress: bool = True,
               echo: Callable[[str], None] = print, overrides: dict | None = None, seed: int = 0) -> list[PlannedStage]:
    """Run the stages not done yet, in order. Under N processes (``accelerate launch``,
    ``torchrun``) every process runs each stage, which splits its work; the main process alone
    decides what is done (from its files) and writes the stage files and messages."""
    stages = plan_recipe(path, output_dir=output_dir, overrides=overrides, seed=seed)
    names = [s.name for s in stages]
    for name in only or []:
        if name not in names:
            raise RecipeError(f"{path}: no stage named '{name}' ({', '.join(names)})")
    state = distributed_state()
    if not is_main(state):
        echo = _silent
    todo = [(stage, from_main(lambda s=stage: stage_state(s), state)) for stage in stages if not only or stage.name in only]
    _check_sharded(path, todo, state)
    for stage, status in todo:
        if status == "done":
            echo(f"[{stage.name}] cached ({stage.key}), skipped")
            continue
        with main_writes(state) as main:
            if main:
                _mark_running(stage, status, echo)
        echo(f"[{stage.name}] {'resuming' if status == 'interrupted' else 'running'} {stage.kind.name} stage")
        started = time.perf_counter()
        if stage.kind.main_only:
            with main_writes(state) as main:
                if main:
                    stage.kind.run(stage.config, stage.directory, show_progress)
        else:
            stage.kind.run(stage.config, stage.directory, show_progress and is_main(state))
        with main_writes(state) as main:
            if main:
                _mark_done(stage, time.perf_counter() - started)
        echo(f"[{stage.name}] done in {time.perf_counter() - started:.0f} s")
    return stages


def _silent(line: str) -> None:
    pass


def _check_sharded(path: Path, todo: list[tuple[PlannedStage, str]], state) -> None:
    """Under N processes, refuse (before any stage runs) a stage to run whose kind is neither
    sharded nor main_only: every process would do its whole work and write its files."""
    if state is None or state.num_processes == 1:
        return
    unsharded = [stage.name for stage, status in todo
                 if status != "done" and not stage.kind.sharded and not stage.kind.main_only]
    if unsharded:
        raise RecipeError(f"{path}: stage(s) {', '.join(unsharded)} do not run under several processes yet "
                          f"({state.num_processes} here); run them first in one process "
                          f"(prefalign run {path} {' '.join(f'--stage {n}' for n in unsharded)}), then launch the "
                          "rest (done stages are skipped)")


def _mark_running(stage: PlannedStage, status: str, echo: Callable[[str], None]) -> None:
    if status == "new" and stage.directory.exists() and (_read(stage.directory / MARKER) or _read(stage.directory / RUNNING)):
        echo(f"[{stage.name}] config changed since the last run: starting this stage over")
        shutil.rmtree(stage.directory)
    stage.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stage.directory / RUNNING, json.dumps({"key": stage.key}))


def _mark_done(stage: PlannedStage, seconds: float) -> None:
    write_text_atomic(stage.directory / MARKER, json.dumps({"key": stage.key, "outputs": stage.outputs, "seconds": round(seconds, 1)}))
    (stage.directory / RUNNING).unlink(missing_ok=True)
    stage.kind.after_done(stage.config)
