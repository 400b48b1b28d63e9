"""What every generation strategy shares: the strategy base class, the context it runs in, the
``Candidate`` it returns for each prompt, and the degenerate-output checks.

A strategy turns a batch of prompts into, for each prompt, a list of :class:`Candidate` outputs:
each is either a record (``prompt``/``chosen``/``rejected``/``anchors``/``toxic``/rewards plus
``meta`` with the intermediate texts) or a filtered output with the reason it was dropped. The
runner (:mod:`prefalign.generate.runner`) adds the provenance (strategy, model ids, seed, prompt
id, licence), the resume key, writes the records and counts the filtered ones per reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from prefalign.data.prompts import Prompt
from prefalign.data.records import RECORD_SCHEMA, response_name
from prefalign.generate.backends.base import Conversation, GenerationBackend, SamplingParams, is_truncated, same_ending

log = logging.getLogger("prefalign.generate")

Scorer = Callable[[Sequence[str]], Sequence[float]]  # texts -> one float per text


class StrategyConfig(BaseModel):
    """Base of every strategy's typed configuration: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/nan: an error naming the field


# ----------------------------------------------------------------------------- outputs


@dataclass
class Candidate:
    """One output of a strategy for one prompt: a record to write, or a filtered output.

    ``tag`` names the (sub-)strategy that made it (PopAlign's contrast); ``meta`` holds the
    intermediate texts (critique, thoughts, all samples and scores...), kept for records and
    for the filtered log alike.
    """

    tag: str
    record: dict | None = None
    filtered: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def keep(cls, tag: str, meta: dict | None = None, **record: Any) -> "Candidate":
        """A record; responses the token limit cut are listed in ``meta["truncated"]``. Its fields
        are the record schema's (anything else belongs in ``meta``): an unknown one is a bug in the
        strategy, refused here rather than dropped when the row is written."""
        unknown = [k for k in record if k not in RECORD_SCHEMA.fields or k == RECORD_SCHEMA.meta]
        if unknown:
            raise ValueError(f"strategy {tag!r}: record field(s) {unknown} are not in the record schema "
                             f"({', '.join(RECORD_SCHEMA.fields[:-1])}); pass them in meta")
        meta = dict(meta or {})
        cut = truncated_responses(record)
        if cut:
            meta["truncated"] = cut
        return cls(tag=tag, record={k: v for k, v in record.items() if v is not None}, meta=meta)

    @classmethod
    def drop(cls, tag: str, reason: str, meta: dict | None = None) -> "Candidate":
        return cls(tag=tag, filtered=reason, meta=meta or {})

    @property
    def kept(self) -> bool:
        return self.filtered is None


def truncated_responses(record: dict) -> list[str]:
    """Names of the record's responses that the token limit cut: ``"chosen"``, ``"anchors.2"``..."""
    names = []
    # Single responses before list groups: the order generated files already carry.
    for group in sorted(RECORD_SCHEMA.groups, key=lambda g: g.many):
        value = record.get(group.name)
        if value is not None:
            texts = value if group.many else [value]
            names += [response_name(group.name, k) for k, text in enumerate(texts) if is_truncated(text)]
    return names


def stripped(text: str) -> str:
    """``text.strip()`` keeping whether the token limit cut it."""
    return same_ending(text, text.strip())


def normalise(text: str) -> str:
    """Whitespace-collapsed, case-folded text, for "identical" checks."""
    return " ".join(text.split()).casefold()


def pair_problem(chosen: str | None, rejected: str | None) -> str | None:
    """Why a (chosen, rejected) pair is degenerate, or ``None`` when it is fine."""
    if chosen is None or not chosen.strip():
        return "empty_chosen"
    if rejected is None or not rejected.strip():
        return "empty_rejected"
    if normalise(chosen) == normalise(rejected):
        return "identical_chosen_rejected"
    return None


def make_pair(tag: str, prompt: Any, chosen: str, rejected: str, meta: dict | None = None, **extra: Any) -> Candidate:
    """A pair candidate, or a filtered one when the pair is degenerate."""
    problem = pair_problem(chosen, rejected)
    meta = dict(meta or {})
    if problem is not None:
        return Candidate.drop(tag, problem, {**meta, "chosen": chosen, "rejected": rejected})
    return Candidate.keep(tag, meta, prompt=prompt, chosen=stripped(chosen), rejected=stripped(rejected), **extra)


def matches_any(text: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, text, flags=re.IGNORECASE) for p in patterns)


# ----------------------------------------------------------------------------- conversations


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


def derive_seed(seed: int | None, *parts: Any) -> int | None:
    """A seed for one step of one batch, stable across runs: ``hash(seed, parts)``."""
    if seed is None:
        return None
    payload = json.dumps([seed, *parts], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:4], "big")


# ----------------------------------------------------------------------------- context


@dataclass
class StrategyContext:
    """What a strategy may use.

    ``backends``: the models, in the order given (``--model`` repeated). ``sampling``: the base
    sampling parameters (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``).
    ``make_backend``: builds a backend for another model (the toxic-control model).
    ``scorer``: a ``texts -> floats`` callable given programmatically (overrides a configured one).
    ``output``: the output file, next to which strategies keep their working files.
    """

    backends: list[GenerationBackend]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    make_backend: Callable[[str], GenerationBackend] | None = None
    scorer: Scorer | None = None
    output: Any = None  # pathlib.Path of the output JSONL
    model_names: list[str] = field(default_factory=list)
    show_progress: bool = True
    seed: int | None = 0  # the run's seed (strategies that work outside the batches use it)
    batch_size: int = 8  # prompts per step

    def params(self, seed: int | None, step: str, **changes: Any) -> SamplingParams:
        """Sampling parameters for one step (``answer``, ``critique``...) of one batch."""
        return replace(self.sampling, seed=derive_seed(seed, step), **changes)


def complete(backend: GenerationBackend, conversations: list[Conversation], params: SamplingParams) -> list[list[str]]:
    """``backend.generate`` with its answer's shape checked (one list of ``n`` texts per conversation)."""
    if not conversations:
        return []
    out = backend.generate(conversations, params)
    if len(out) != len(conversations) or any(len(texts) != params.n for texts in out):
        raise RuntimeError(
            f"backend {getattr(backend, 'name', type(backend).__name__)} ({backend.model_id}) returned "
            f"{[len(t) for t in out]} texts for {len(conversations)} conversations, expected {params.n} each"
        )
    return [[t if isinstance(t, str) else "" for t in texts] for texts in out]


def complete_one(backend: GenerationBackend, conversations: list[Conversation], params: SamplingParams) -> list[str]:
    """One text per conversation."""
    return [texts[0] for texts in complete(backend, conversations, replace(params, n=1))]


# ----------------------------------------------------------------------------- strategies


class Strategy:
    """Base class: set ``name``, ``Config`` and ``description``; implement :meth:`generate`.

    ``min_models``: how many backends it needs. :meth:`setup` runs once before the first batch
    (only when some prompts are left to do); :meth:`info` adds lines to the run summary.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    description: ClassVar[str] = ""
    min_models: ClassVar[int] = 1

    def __init__(self, config: StrategyConfig, ctx: StrategyContext) -> None:
        if not isinstance(config, self.Config):
            config = self.Config.model_validate(config or {})
        self.config = config
        self.ctx = ctx
        if len(ctx.backends) < self.min_models:
            raise ValueError(
                f"strategy '{self.name}' needs at least {self.min_models} models (give --model "
                f"{self.min_models} times), got {len(ctx.backends)}"
            )

    @property
    def backend(self) -> GenerationBackend:
        return self.ctx.backends[0]

    def model_ids(self) -> list[str]:
        """The models whose outputs go into the records (part of the resume key)."""
        return [self.backend.model_id]

    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Raise before any work when the prompts cannot be used (e.g. no ``rejected`` for D2O)."""

    def setup(self, prompts: Sequence[Prompt]) -> None:
        """Work needed before the first batch (all prompts of the run are given)."""

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        raise NotImplementedError

    def info(self) -> dict:
        return {}
