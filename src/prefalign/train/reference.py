"""The reference a loss compares the policy with, made in one place.

``reference:`` in the training config names a kind of ``REFERENCE_KINDS`` (``auto`` is
``precompute``):

* ``precompute`` — the starting weights score the training and evaluation data once, before any
  update, and the table is cached on disk, keyed by the model's identity and the exact token ids
  (no second model in memory; a re-run or a resumed run reuses it). Under N processes each scores
  every N-th batch, the parts are gathered, and only the main process reads or writes the cache.
* ``copy`` — a frozen copy of the starting weights scores each batch.
* ``disable-adapters`` — the LoRA policy itself, with its adapters switched off, scores each batch.

``reference_model`` makes another model the starting weights. What is scored comes from the loss:
its ``reference_groups``, and for ADPO ``toxic_ref`` too, the toxic response behind the
``[TOXIC]`` prompt, scored by the inner toxic model: the toxic-control model when
``toxic_reference_model`` names one, else the reference itself, in the same pass. A kind that
scores batches as they come (``live``) also scores the anchors D²O's online refresh replaces
during training; the config refuses a refresh with a kind that is not live.

Every reference answers one call, ``reference.logps(examples) -> {group: logps}``; the trainer
gets it from :func:`build_reference` and asks nothing else. A new kind is a builder in this file
and its line in ``REFERENCE_KINDS``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from prefalign.data.tokenize import TokenizedExample
from prefalign.models.lora import is_peft_model
from prefalign.sharding import from_main, is_main, longest_first_batches, main_writes, sharded_map
from prefalign.train.sequences import collate, sequence_logps, split_groups, supports_packing, supports_shared_prompt

if TYPE_CHECKING:
    from prefalign.losses import AnyLoss
    from prefalign.train.config import TrainConfig

log = logging.getLogger("prefalign.train")

#: The group under which ADPO's toxic response is scored behind the ``[TOXIC]`` prompt.
TOXIC_REF = "toxic_ref"


class Reference(Protocol):
    def logps(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        """``{group: summed log-probs}``: ``[B]``, or ``[B, K]`` for anchors, on the CPU."""
        ...


@dataclass(frozen=True)
class ReferenceSetup:
    """What a reference is built from. ``policy`` is at its starting weights (with LoRA, its
    adapters are attached and still untrained), on its process's device, not yet wrapped by the
    engine."""

    config: TrainConfig
    spec: AnyLoss
    policy: Any
    pad_id: int
    train_examples: Sequence[TokenizedExample]
    eval_examples: Sequence[TokenizedExample] = ()
    accelerator: Any = None


# ------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def score_examples(
    model,
    examples: Sequence[TokenizedExample],
    groups: Sequence[str],
    pad_id: int,
    *,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    share_prompt: bool = True,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """Score ``groups`` of ``examples`` with ``model`` in eval mode (inside ``context``)."""
    was_training = model.training
    model.eval()
    try:
        with context():
            shared = share_prompt and supports_shared_prompt(model)
            packed = pack and shared and supports_packing(model)
            batch = collate(examples, groups, pad_id, share_prompt=shared, pack=packed)
            batch = batch.to(_device_of(model))
            return {k: v.detach().float().cpu() for k, v in split_groups(sequence_logps(model, batch), batch.rows).items()}
    finally:
        model.train(was_training)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ModelScorer:
    """A model that scores reference log-probs, called inside ``context`` (e.g. with its LoRA
    adapters off), in the batch layout the config asks for."""

    model: Any
    pad_id: int
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    share_prompt: bool = True
    pack: bool = False

    def __call__(self, examples: Sequence[TokenizedExample], groups: Sequence[str]) -> dict[str, torch.Tensor]:
        return score_examples(self.model, examples, groups, self.pad_id, context=self.context,
                              share_prompt=self.share_prompt, pack=self.pack)


def toxic_views(examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
    """Each example's toxic response behind its ``[TOXIC]`` prompt, as an example whose one group
    is ``toxic_ref``: what ADPO's inner toxic model scores."""
    views = []
    for ex in examples:
        if ex.toxic_prompt_ids is None:
            raise ValueError(f"example {ex.index} has no [TOXIC] prompt; tokenise with with_toxic_prompt=True")
        views.append(TokenizedExample(ex.index, ex.toxic_prompt_ids, {TOXIC_REF: ex.responses["toxic"]}))
    return views


@dataclass
class ScoredReference:
    """Scores each batch when asked: ``groups`` by ``scorer``; with ``toxic``, also ``toxic_ref``, by
    ``toxic_scorer`` (the toxic-control model), or by ``scorer`` in the same pass when there is none."""

    scorer: ModelScorer
    groups: tuple[str, ...]
    toxic: bool = False
    toxic_scorer: ModelScorer | None = None

    def logps(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not self.toxic:
            return self.scorer(examples, self.groups)
        views = toxic_views(examples)
        if self.toxic_scorer is None:
            return self.scorer([*examples, *views], (*self.groups, TOXIC_REF))
        return {**self.scorer(examples, self.groups), **self.toxic_scorer(views, (TOXIC_REF,))}


class PrecomputedReference:
    """Tables scored once (the training data's, the evaluation data's), looked up by example index."""

    def __init__(self, tables: Sequence[tuple[dict[str, torch.Tensor], Sequence[TokenizedExample]]]):
        self.rows = {ex.index: (table, row) for table, examples in tables for row, ex in enumerate(examples)}

    def logps(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        found = [self.rows[ex.index] for ex in examples]
        return {group: torch.stack([table[group][row] for table, row in found]) for group in found[0][0]}


class NoReference:
    """A reference-free loss (SFT, SimPO) compares with nothing."""

    def logps(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        return {}


# -------------------------------------------------------------------------------- precompute


def cache_key(model_id: str, toxic_model_id: str | None, groups: Sequence[str], examples: Sequence[TokenizedExample],
              *, toxic_reference: bool = False, precision: str = "no") -> str:
    """Keyed by the model's identity, what is scored (``groups``, the toxic reference), the
    precision it is scored in (accelerate's ``mixed_precision``) and the exact token ids, so any
    change to the data, the tokenizer or the truncation settings gives a new key."""
    h = hashlib.sha256()
    h.update(f"{model_id}|{toxic_model_id}|{','.join(groups)}".encode())
    if precision != "no":  # fp32 keys stay as they were
        h.update(f"|{precision}".encode())
    if toxic_reference:
        h.update(b"|toxic_ref")
    for ex in examples:
        toxic = ex.responses.get("toxic") if toxic_reference else None
        h.update(repr((ex.index, ex.prompt_ids, ex.toxic_prompt_ids, [ex.responses[g] for g in groups], toxic)).encode())
    return h.hexdigest()[:32]


def precompute_table(
    reference: Reference,
    examples: Sequence[TokenizedExample],
    path: Path,
    *,
    batch_size: int = 8,
    desc: str = "reference log-probs",
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """``reference``'s log-probs of every example, ``{group: [len(examples), ...]}`` in data order,
    read from ``path`` or computed and written there. With an ``accelerator`` of N processes, each
    scores every N-th batch, the parts are gathered and put in data order on every process, and
    only the main process reads or writes the cache (its decision and table are sent to the
    others: no shared filesystem is assumed)."""
    main = is_main(accelerator)
    # The main process's copy decides for all: no shared filesystem is assumed.
    cached = from_main(lambda: torch.load(path) if path.exists() else None, accelerator)
    if cached is not None:
        if main:
            log.info("reference log-probs: cache hit %s", path)
        return cached
    batches = longest_first_batches([ex.num_tokens() for ex in examples], batch_size)
    scores = sharded_map(batches, lambda idx: reference.logps([examples[i] for i in idx]), accelerator,
                         progress=lambda ks: tqdm(ks, desc=desc, unit="batch", disable=not main))
    table = _table_in_data_order(list(zip(batches, scores)), len(examples))
    with main_writes(accelerator) as main:
        if main:
            _write_cache(table, path)
            log.info("reference log-probs: cached %d examples at %s", len(examples), path)
    return table


def _table_in_data_order(parts: list[tuple[list[int], dict[str, torch.Tensor]]], num_examples: int) -> dict[str, torch.Tensor]:
    """``(example positions, {group: values})`` parts, in any order → ``{group: [num_examples, ...]}``."""
    table = {}
    for group in parts[0][1]:
        first = parts[0][1][group]
        out = torch.empty((num_examples, *first.shape[1:]), dtype=torch.float32)
        for idx, values in parts:
            out[torch.tensor(idx)] = values[group]
        table[group] = out
    return table


def _write_cache(table: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(table, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the kinds


def _with_adapters_off(model) -> Callable[[], contextlib.AbstractContextManager]:
    """How ``model`` computes with its starting weights: a LoRA model with its adapters off (they
    are still zero at the start, and switched off they cost nothing), any other as it is."""
    return model.disable_adapter if is_peft_model(model) else contextlib.nullcontext


def _frozen_model(setup: ReferenceSetup, name: str):
    """Another model (``reference_model``, the toxic-control model): frozen, on the policy's device."""
    from prefalign.models.loading import load_model

    model = load_model(name, trust_remote_code=setup.config.trust_remote_code).to(_device_of(setup.policy))
    return model.requires_grad_(False).eval()


def _scorer(setup: ReferenceSetup, model, context=contextlib.nullcontext) -> ModelScorer:
    """The reference computes as the policy does: under the accelerator's autocast (bf16 when the
    run trains in bf16), so at the starting weights the policy's log-ratio to it is ~0, not bf16's
    rounding of each response (a median 0.17 nats, benchmarks/eval_precision.py)."""
    autocast = setup.accelerator.autocast if setup.accelerator is not None else contextlib.nullcontext

    @contextlib.contextmanager
    def scoring():
        with context(), autocast():
            yield

    return ModelScorer(model, setup.pad_id, scoring, share_prompt=setup.config.share_prompt, pack=setup.config.pack)


def _precision(setup: ReferenceSetup) -> str:
    """The matmul precision the reference scores in (part of the cache key)."""
    return str(getattr(setup.accelerator, "mixed_precision", "no"))


def _starting_weights(setup: ReferenceSetup) -> Any:
    """The model whose starting weights are the reference: ``reference_model``, else the policy."""
    name = setup.config.reference_model
    return setup.policy if name is None else _frozen_model(setup, name)


def _scored(setup: ReferenceSetup, model) -> ScoredReference:
    """``model`` (at its starting weights) scoring what the loss compares, with ADPO's toxic model."""
    name = setup.config.toxic_reference_model
    toxic = setup.spec.needs_toxic_reference
    toxic_scorer = _scorer(setup, _frozen_model(setup, name)) if toxic and name is not None else None
    return ScoredReference(_scorer(setup, model, _with_adapters_off(model)), tuple(setup.spec.reference_groups),
                           toxic, toxic_scorer)


def precomputed(setup: ReferenceSetup) -> PrecomputedReference:
    """Score the training and evaluation data now, before any update, and cache the tables."""
    from prefalign.models.registry import cache_root, model_fingerprint, resolve_model

    config, spec = setup.config, setup.spec
    scorer = _scored(setup, _starting_weights(setup))
    cache_dir = Path(config.ref_cache_dir or cache_root() / "ref-logps")
    model_id = model_fingerprint(resolve_model(config.reference_model or config.model))
    toxic_id = model_fingerprint(resolve_model(config.toxic_reference_model)) if scorer.toxic_scorer is not None else None
    tables = []
    for name, examples in (("train", setup.train_examples), ("eval", setup.eval_examples)):
        if examples:
            key = cache_key(model_id, toxic_id, spec.reference_groups, examples, toxic_reference=spec.needs_toxic_reference,
                            precision=_precision(setup))
            table = precompute_table(scorer, examples, cache_dir / f"{key}.pt", batch_size=config.batch_size * 2,
                                     desc=f"reference log-probs ({name})", accelerator=setup.accelerator)
            tables.append((table, examples))
    return PrecomputedReference(tables)


def frozen_copy(setup: ReferenceSetup) -> ScoredReference:
    """A frozen copy of the starting weights, scoring each batch."""
    model = _starting_weights(setup)
    if model is setup.policy:
        model = copy.deepcopy(model).requires_grad_(False).eval()
    return _scored(setup, model)


def adapters_off(setup: ReferenceSetup) -> ScoredReference:
    """The LoRA policy itself with its adapters off, scoring each batch: no second model."""
    return _scored(setup, setup.policy)


def score_through_engine(reference: Reference, policy, prepared) -> Reference:
    """A reference on the policy's own weights (``disable-adapters``) scoring through ``prepared``,
    the policy as the engine wrapped it: under FSDP and ZeRO-3 its weights exist whole only inside
    that forward pass. The adapters are still switched off on ``policy``: the same LoRA layers."""
    if isinstance(reference, ScoredReference) and reference.scorer.model is policy:
        reference.scorer = replace(reference.scorer, model=prepared)
    return reference


@dataclass(frozen=True)
class ReferenceKind:
    """How one kind of reference is made. ``live``: it scores each batch as it comes, so it also
    scores anchors refreshed during training (D²O online). ``on_lora_policy``: it runs the LoRA
    policy's own weights, so it needs LoRA (and, on a sharded engine, scores through the engine:
    :func:`score_through_engine`)."""

    name: str
    build: Callable[[ReferenceSetup], Reference]
    description: str
    live: bool
    on_lora_policy: bool = False


REFERENCE_KINDS: dict[str, ReferenceKind] = {
    kind.name: kind
    for kind in (
        ReferenceKind("precompute", precomputed, "the starting weights score the data once, cached on disk", live=False),
        ReferenceKind("copy", frozen_copy, "a frozen copy of the starting weights", live=True),
        ReferenceKind("disable-adapters", adapters_off, "the LoRA policy with its adapters off", live=True,
                      on_lora_policy=True),
    )
}

#: ``reference: auto``: no second model in memory, and a re-run reuses the table.
AUTO_REFERENCE = "precompute"
REFERENCE_NAMES: tuple[str, ...] = ("auto", *REFERENCE_KINDS)


def reference_kind(name: str) -> ReferenceKind:
    """The kind ``reference: name`` means (``auto`` is :data:`AUTO_REFERENCE`)."""
    try:
        return REFERENCE_KINDS[AUTO_REFERENCE if name == "auto" else name]
    except KeyError:
        raise ValueError(f"unknown reference kind '{name}'; choose one of {', '.join(REFERENCE_NAMES)}") from None


def build_reference(setup: ReferenceSetup) -> Reference:
    """The reference the config asks for; for a reference-free loss, one that returns nothing."""
    if not setup.spec.needs_reference:
        return NoReference()
    return reference_kind(setup.config.reference).build(setup)
