"""``prefalign generate``: turn a prompt set into preference data with one of the strategies.

Registered in :mod:`prefalign.cli` as ``app.command("generate")(generate)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from prefalign.configfile import one_of


def strategy_help() -> str:
    """The strategies in registry order, each run of one method tagged once:
    ``critique (rDPO), prefix, demon, ... popalign (PopAlign), ...`` (the tag opens a description)."""
    from prefalign.generate.registry import STRATEGIES

    parts, run = [], []
    items = [(name, cls.description.split(":")[0].strip()) for name, cls in STRATEGIES.items()]
    for i, (name, tag) in enumerate(items):
        run.append(name)
        if i + 1 == len(items) or items[i + 1][1] != tag:
            parts.append(f"{', '.join(run)} ({tag})")
            run = []
    return ", ".join(parts)


def _source_help() -> str:
    from prefalign.data.prompts import PROMPT_SOURCES

    return ", ".join(PROMPT_SOURCES)


def _backend_help() -> str:
    from prefalign.generate.backends import BACKENDS

    return one_of(BACKENDS)


# From the registries (strategies, prompt sources, backends), so the help cannot drift from them.
STRATEGY_HELP = strategy_help()
SOURCE_HELP = _source_help()
BACKEND_HELP = _backend_help()


def generate(
    strategy: Optional[str] = typer.Option(None, "--strategy", "-s", help=STRATEGY_HELP),
    prompts: Optional[str] = typer.Option(None, "--prompts", help=f"prompt set: {SOURCE_HELP} [default: advbench]"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="JSONL/JSON/CSV/Parquet/datasets folder (implies --prompts file)"),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="the prompt column of --prompts-file [default: prompt]"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N prompts (after --split)"),
    split: Optional[str] = typer.Option(None, "--split", help="train or eval: one side of the stable split by prompt id"),
    option_order: Optional[str] = typer.Option(None, "--option-order", help="two-option questions: as-given, both (each also with its options swapped) or balanced (half swapped)"),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="model (repeat for nparam/leaderboard/popalign) [default: smollm2-135m-instruct]"),
    backend: Optional[str] = typer.Option(None, "--backend", help=f"{BACKEND_HELP} [default: transformers]"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server URL (…/v1) for --backend openai"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL output; re-running skips prompts already done"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="prompts per step, written after each [default: 8]"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="cut each response at this string (repeatable), e.g. $'\\n'"),
    principle: Optional[str] = typer.Option(None, "--principle", help="critique: safety, roleplay, sycophancy (or custom in --config)"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="samples per prompt (sample-pairs, toxic-sft-data, toxic-control)"),
    k: Optional[int] = typer.Option(None, "--k", help="anchors per prompt (anchors, D2O's K)"),
    toxic_model: Optional[str] = typer.Option(None, "--toxic-model", help="toxic-control: the [TOXIC]-control model (trained with loss sft on toxic-sft-data)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Generate preference data from a prompt set (resumable: re-run the same command after a stop)."""
    from rich.console import Console

    from prefalign.console import fail
    from prefalign.data.errors import DataError
    from prefalign.generate.config import GenerateConfigError, load_generate_config
    from prefalign.generate.runner import run_from_config

    console = Console()

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prefalign").setLevel(logging.WARNING)
    prompt_settings = {k2: v for k2, v in dict(source=prompts, path=prompts_file, prompt_field=prompt_field,
                                                limit=limit, split=split, option_order=option_order).items() if v is not None}
    overrides = dict(strategy=strategy, prompts=prompt_settings or None, models=list(model) if model else None,
                     backend=backend, base_url=base_url, output=output, seed=seed, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop) if stop else None)
    params = {"principle": principle, "n": num_samples, "k": k, "toxic_model": toxic_model}
    try:
        if config is None and strategy is None:
            fail("give --strategy (or a --config with strategy:)")
        if config is None and output is None:
            fail("give --output FILE.jsonl (or a --config with output:)")
        cfg = load_generate_config(config, overrides, params)
    except GenerateConfigError as exc:
        fail(str(exc))
    try:
        run_from_config(cfg, show_progress=not quiet, echo=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    except (DataError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        fail(str(exc))
