"""Running a strategy over a prompt set, resumably.

* Output is JSON Lines, appended and flushed once per batch of prompts
  (:func:`prefalign.data.io.write_jsonl` with ``append=True``). Filtered outputs go, with their
  reason and intermediate texts, to ``<output>.filtered.jsonl`` next to it.
* Every row carries ``meta.gen_key``, a hash of (prompt id, prompt text, strategy, model ids,
  seed, strategy config and sampling settings), and ``meta.gen_part = [i, n]``: output ``i`` of
  the ``n`` the prompt produced (records and filtered rows together). A prompt is done when all
  its parts are on disk; re-running the same command skips it.
* After a kill: a torn last line is dropped, and so are the rows of a prompt whose parts are
  incomplete (its batch was being written); the files are rewritten atomically and those
  prompts are generated again. No duplicate, no lost record.
* Batches are cut from the full prompt list, so a resumed run sends the same batches as an
  uninterrupted one (with a seeded backend it writes the same records).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefalign.data.io import read_resumable_lines, rewrite_lines, write_jsonl
from prefalign.data.prompts import Prompt
from prefalign.data.records import RECORD_SCHEMA
from prefalign.generate.core import Candidate, Strategy
from prefalign.sharding import distributed_state, from_main, is_main, sharded_rounds

log = logging.getLogger("prefalign.generate")

RECORD_FIELDS = tuple(f for f in RECORD_SCHEMA.fields if f != RECORD_SCHEMA.meta)  # meta is built below


def filtered_log_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".filtered.jsonl")


def generation_key(prompt: Prompt, strategy: Strategy, seed: int | None) -> str:
    """What identifies one prompt's work: same key, same outputs (the resume key)."""
    s = strategy.ctx.sampling
    payload = {
        "prompt_id": prompt.id,
        "prompt": prompt.prompt,
        "strategy": strategy.name,
        "models": strategy.model_ids(),
        "seed": seed,
        "config": strategy.config.model_dump(mode="json"),
        "sampling": [s.max_new_tokens, s.temperature, s.top_p, s.top_k, list(s.stop)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class GenerateSummary:
    strategy: str
    output: Path
    filtered_log: Path
    prompts_total: int = 0
    already_done: int = 0  # skipped: done by an earlier run
    prompts_processed: int = 0
    records_written: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # reason -> count
    records_by_strategy: dict[str, int] = field(default_factory=dict)
    truncated_responses: int = 0  # responses the token limit cut (meta.truncated), in this run's records
    recovered_torn_lines: int = 0
    recovered_incomplete_rows: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def filtered_total(self) -> int:
        return sum(self.filtered.values())

    def lines(self) -> list[str]:
        out = [
            f"strategy {self.strategy}: {self.records_written} records written to {self.output} "
            f"({self.prompts_processed} prompts in {self.seconds:.1f}s)",
            f"  prompts: {self.prompts_total} total, {self.already_done} skipped as already done",
        ]
        if len(self.records_by_strategy) > 1:
            out.append("  records by strategy: " + ", ".join(f"{k} {v}" for k, v in sorted(self.records_by_strategy.items())))
        if self.filtered:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items(), key=lambda kv: (-kv[1], kv[0])))
            out.append(f"  filtered: {self.filtered_total} ({reasons}); see {self.filtered_log}")
        else:
            out.append("  filtered: 0")
        if self.truncated_responses:
            out.append(f"  responses cut by the token limit: {self.truncated_responses} (listed in meta.truncated; "
                       "trained without an end token; raise --max-new-tokens to get whole answers)")
        if self.recovered_torn_lines or self.recovered_incomplete_rows:
            out.append(f"  recovered from an interrupted run: dropped {self.recovered_torn_lines} torn line(s) and "
                       f"{self.recovered_incomplete_rows} row(s) of unfinished prompts")
        for key, value in self.info.items():
            if value not in (None, {}, []):
                out.append(f"  {key.replace('_', ' ')}: {value}")
        return out

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy, "output": str(self.output), "filtered_log": str(self.filtered_log),
            "prompts_total": self.prompts_total, "already_done": self.already_done,
            "prompts_processed": self.prompts_processed, "records_written": self.records_written,
            "filtered": dict(self.filtered), "records_by_strategy": dict(self.records_by_strategy),
            "truncated_responses": self.truncated_responses, "recovered_torn_lines": self.recovered_torn_lines,
            "recovered_incomplete_rows": self.recovered_incomplete_rows, "seconds": self.seconds, "info": self.info,
        }


# ----------------------------------------------------------------------------- resume


def _part(obj: dict) -> tuple[str, int, int] | None:
    meta = obj.get("meta") if "meta" in obj else None
    holder = meta if isinstance(meta, dict) and "gen_key" in meta else obj
    key, part = holder.get("gen_key"), holder.get("gen_part")
    if isinstance(key, str) and isinstance(part, list) and len(part) == 2 and all(isinstance(x, int) for x in part):
        return key, part[0], part[1]
    return None


def recover(output: Path, filtered_log: Path) -> tuple[set[str], int, int]:
    """Make the files consistent after a possible kill; returns (done keys, torn lines dropped,
    rows of unfinished prompts dropped)."""
    files = {output: read_resumable_lines(output), filtered_log: read_resumable_lines(filtered_log)}
    parts: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    for rows, _torn in files.values():
        for _raw, obj in rows:
            found = _part(obj)
            if found:
                key, i, n = found
                parts.setdefault(key, set()).add(i)
                expected[key] = n
    done = {k for k, seen in parts.items() if seen == set(range(expected[k]))}
    torn_total = dropped_total = 0
    for path, (rows, torn) in files.items():
        keep = []
        dropped = 0
        for raw, obj in rows:
            found = _part(obj)
            if found and found[0] not in done:
                dropped += 1
            else:
                keep.append(raw)
        if torn or dropped:
            log.warning("%s: recovering from an interrupted run: dropping %d torn line(s) and %d row(s) of unfinished prompts",
                        path, int(torn), dropped)
            rewrite_lines(path, keep)
        torn_total += int(torn)
        dropped_total += dropped
    return done, torn_total, dropped_total


# ----------------------------------------------------------------------------- rows


def _record_row(c: Candidate, prompt: Prompt, base_meta: dict, key: str, i: int, n: int) -> dict:
    # Candidate.keep admits only schema fields, so nothing of the record is left out here.
    row = {k: c.record[k] for k in RECORD_FIELDS if c.record.get(k) is not None}
    prompt_meta = {k: v for k, v in prompt.meta.items() if k not in RECORD_FIELDS}
    row["meta"] = {**c.meta, **({"prompt_meta": prompt_meta} if prompt_meta else {}), **base_meta,
                   "strategy": c.tag, "gen_key": key, "gen_part": [i, n]}
    return row


def _filtered_row(c: Candidate, prompt: Prompt, base_meta: dict, key: str, i: int, n: int) -> dict:
    return {"reason": c.filtered, "strategy": c.tag, "prompt_id": prompt.id, "prompt": prompt.prompt,
            "detail": c.meta, **{k: v for k, v in base_meta.items() if k in ("run_strategy", "models", "seed")},
            "gen_key": key, "gen_part": [i, n]}


def _base_meta(strategy: Strategy, prompt: Prompt, seed: int | None) -> dict:
    return {
        "id": prompt.id,
        "run_strategy": strategy.name,
        "models": strategy.model_ids(),
        "seed": seed,
        "prompt_source": prompt.source,
        "licence": prompt.licence,
        "attribution": prompt.attribution,
    }


# ----------------------------------------------------------------------------- run


def run_generation(
    strategy: Strategy,
    prompts: Sequence[Prompt],
    output: str | Path,
    *,
    seed: int | None = 0,
    batch_size: int = 8,
    show_progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> GenerateSummary:
    """Run ``strategy`` over ``prompts`` into ``output`` (JSONL), skipping prompts already done;
    prints (``echo``) and returns a :class:`GenerateSummary`.

    Under ``accelerate launch`` / ``torchrun`` with N processes, each process generates every N-th
    batch; after each round of N batches the results are gathered and the main process writes
    them in input order, so the files (and resuming them) are the same as with one process."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    output = Path(output)
    flog = filtered_log_path(output)
    start = time.perf_counter()
    strategy.check_prompts(prompts)
    state = distributed_state()
    main = is_main(state)
    done, torn, incomplete = from_main(lambda: _recover(output, flog), state)
    keys = [generation_key(p, strategy, seed) for p in prompts]
    summary = GenerateSummary(strategy.name, output, flog, prompts_total=len(prompts),
                              recovered_torn_lines=torn, recovered_incomplete_rows=incomplete)
    seen: set[str] = set()
    todo_index = []
    for i, k in enumerate(keys):
        if k in done or k in seen:
            summary.already_done += k in done
            continue
        seen.add(k)
        todo_index.append(i)
    todo_set = set(todo_index)
    filtered: Counter[str] = Counter()
    by_strategy: Counter[str] = Counter()

    if todo_index:
        strategy.setup(prompts)
        # Batches are cut from the full list, then thinned: the same batches as an uninterrupted run.
        batches = [[i for i in range(s, min(s + batch_size, len(prompts))) if i in todo_set]
                   for s in range(0, len(prompts), batch_size)]
        work = [b for b in batches if b]
        with tqdm(total=len(todo_index), desc=f"generate {strategy.name}", unit="prompt",
                  disable=not show_progress or not main, dynamic_ncols=True) as bar:
            # A round of N batches at a time, written after each: a killed run resumes after the last round.
            for generated in sharded_rounds(work, lambda batch: _generate_batch(strategy, prompts, batch, keys, seed), state):
                for batch in generated:
                    if main:
                        if batch.rejects:
                            write_jsonl(flog, batch.rejects, append=True)
                        if batch.records:
                            write_jsonl(output, batch.records, append=True)
                    filtered.update(batch.filtered)
                    by_strategy.update(batch.by_strategy)
                    summary.truncated_responses += batch.truncated_responses
                    summary.records_written += len(batch.records)
                    summary.prompts_processed += batch.num_prompts
                    bar.update(batch.num_prompts)
                bar.set_postfix(records=summary.records_written, filtered=sum(filtered.values()))

    summary.filtered = dict(filtered)
    summary.records_by_strategy = dict(by_strategy)
    summary.info = strategy.info()
    summary.seconds = time.perf_counter() - start
    for line in summary.lines() if main else ():
        if echo is not None:
            echo(line)
        else:
            log.info(line)
    return summary


def _recover(output: Path, flog: Path) -> tuple[set[str], int, int]:
    """What a killed run left (done keys, torn lines, incomplete rows), the output file made."""
    recovered = recover(output, flog)
    if not output.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
    return recovered


@dataclass
class _BatchOutput:
    """One batch of prompts, generated and turned into rows, not yet written."""

    num_prompts: int
    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    by_strategy: Counter = field(default_factory=Counter)
    truncated_responses: int = 0


def _generate_batch(strategy: Strategy, prompts: Sequence[Prompt], batch: list[int], keys: list[str],
                    seed: int | None) -> _BatchOutput:
    batch_prompts = [prompts[i] for i in batch]
    results = strategy.generate(batch_prompts, seed)
    if len(results) != len(batch):
        raise RuntimeError(f"strategy {strategy.name} returned {len(results)} results for {len(batch)} prompts")
    out = _BatchOutput(len(batch))
    for i, prompt, candidates in zip(batch, batch_prompts, results):
        if not candidates:
            candidates = [Candidate.drop(strategy.name, "no_output")]
        base = _base_meta(strategy, prompt, seed)
        n = len(candidates)
        for part, c in enumerate(candidates):
            if c.kept:
                out.records.append(_record_row(c, prompt, base, keys[i], part, n))
                out.by_strategy[c.tag] += 1
                out.truncated_responses += len(c.meta.get("truncated", ()))
            else:
                out.rejects.append(_filtered_row(c, prompt, base, keys[i], part, n))
                out.filtered[c.filtered] += 1
    return out


# ----------------------------------------------------------------------------- from a config

#: Constructor arguments of each backend kind from the run's config (``backend_options`` add to them).
_BACKEND_ARGS: dict[str, Callable[[Any, str], dict]] = {
    "transformers": lambda cfg, model: {"model": model, "batch_size": cfg.batch_size, "show_progress": False,
                                        **_process_device()},
    "openai": lambda cfg, model: {"model": model, "base_url": cfg.base_url},
    "vllm": lambda cfg, model: {"model": model, "show_progress": False},
    "llamacpp": lambda cfg, model: {"model": model},
}


def _process_device() -> dict:
    """Under several processes, each puts its model on its own device (its GPU, or the CPU)."""
    state = distributed_state()
    return {} if state is None else {"device": str(state.device)}


def backend_factory(cfg) -> Callable[[str], Any]:
    """``model name -> backend`` for the config's backend kind."""
    from prefalign.generate.backends import make_backend

    def build(model: str):
        return make_backend(cfg.backend, **{**_BACKEND_ARGS[cfg.backend](cfg, model), **cfg.backend_options})

    return build


def run_from_config(
    cfg,
    *,
    backends: list | None = None,
    make_backend: Callable[[str], Any] | None = None,
    scorer: Callable | None = None,
    show_progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> GenerateSummary:
    """Load the prompts, build the backends and the strategy of a :class:`GenerateConfig`, run.

    ``backends`` (one per ``cfg.models``) and ``make_backend`` replace the ones the config would
    build (tests wrap them); ``scorer`` is a ``texts -> floats`` callable for the strategies that
    score (it wins over the config's ``scorer``).
    """
    from prefalign.data.prompts import load_prompts
    from prefalign.generate.backends.base import SamplingParams
    from prefalign.generate.core import StrategyContext
    from prefalign.generate.registry import get_strategy

    if cfg.backend == "vllm" and distributed_state() is not None:
        # Each process would start its own vLLM engine on the first visible GPU.
        raise ValueError("backend vllm runs one engine over all its GPUs: start this generate stage as one process "
                         "(not under accelerate launch / torchrun) and set backend_options: {tensor_parallel_size: N}")
    strategy_cls = get_strategy(cfg.strategy)
    strategy_config = cfg.strategy_config()
    p = cfg.prompts
    prompts = load_prompts(p.source, path=p.path, prompt_field=p.prompt_field, limit=p.limit, split=p.split,
                           eval_fraction=p.eval_fraction, where=p.where,
                           shuffle_seed=p.shuffle_seed, option_order=p.option_order)
    if make_backend is None:
        make_backend = backend_factory(cfg)
    if backends is None:
        backends = [make_backend(m) for m in cfg.models]
    ctx = StrategyContext(
        backends=list(backends),
        sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                stop=tuple(cfg.stop), seed=cfg.seed),
        make_backend=make_backend,
        scorer=scorer,
        output=Path(cfg.output),
        model_names=list(cfg.models),
        show_progress=show_progress,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    strategy = strategy_cls(strategy_config, ctx)
    return run_generation(strategy, prompts, cfg.output, seed=cfg.seed, batch_size=cfg.batch_size,
                          show_progress=show_progress, echo=echo)
