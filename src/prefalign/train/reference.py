"""Reference log-probs: precomputed and cached on disk, a frozen copy, or the policy with its
LoRA adapters disabled. All three answer the same call: examples in, ``{group: logps}`` out."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from prefalign.data.tokenize import TokenizedExample
from prefalign.train.sequences import collate, sequence_logps, split_groups, supports_packing, supports_shared_prompt

log = logging.getLogger("prefalign.train")

ReferenceFn = Callable[[Sequence[TokenizedExample]], dict[str, torch.Tensor]]


@torch.no_grad()
def score_examples(
    model,
    examples: Sequence[TokenizedExample],
    groups: Sequence[str],
    pad_id: int,
    *,
    toxic_reference: bool = False,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    share_prompt: bool = True,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """Score ``groups`` (and ``toxic_ref`` rows) of ``examples`` with ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with context():
            shared = share_prompt and supports_shared_prompt(model)
            packed = pack and shared and supports_packing(model)
            batch = collate(examples, groups, pad_id, toxic_reference=toxic_reference, share_prompt=shared, pack=packed)
            batch = batch.to(_device_of(model))
            return {k: v.detach().float().cpu() for k, v in split_groups(sequence_logps(model, batch), batch.rows).items()}
    finally:
        model.train(was_training)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class ModelReference:
    """Scores each batch with a frozen model: a copy, or the policy with adapters disabled.

    ``groups`` are the response groups the loss compares with the reference (its
    ``reference_groups``); with ``toxic_reference`` (ADPO) the toxic response is also scored
    behind the ``[TOXIC]`` prompt (``"toxic_ref"``), by ``toxic_model`` when given, else by the
    reference itself."""

    def __init__(self, model, groups, pad_id, *, toxic_reference=False, toxic_model=None, context=contextlib.nullcontext,
                 share_prompt=True, pack=False):
        self.model, self.groups, self.pad_id = model, tuple(groups), pad_id
        self.toxic_reference = toxic_reference or toxic_model is not None
        self.toxic_model, self.context, self.share_prompt, self.pack = toxic_model, context, share_prompt, pack

    def __call__(self, examples):
        out = score_examples(
            self.model, examples, self.groups, self.pad_id,
            toxic_reference=self.toxic_reference and self.toxic_model is None,
            context=self.context, share_prompt=self.share_prompt, pack=self.pack,
        )
        if self.toxic_model is not None:
            out.update(score_examples(self.toxic_model, examples, (), self.pad_id, toxic_reference=True,
                                      share_prompt=self.share_prompt, pack=self.pack))
        return out


class PrecomputedReference:
    """Log-probs computed once per (model, tokenised data) and looked up by example index."""

    def __init__(self, table: dict[str, torch.Tensor], index_of: dict[int, int]):
        self.table, self.index_of = table, index_of

    def __call__(self, examples):
        rows = torch.tensor([self.index_of[ex.index] for ex in examples], dtype=torch.long)
        return {group: values[rows] for group, values in self.table.items()}


def cache_key(model_id: str, toxic_model_id: str | None, groups: Sequence[str], examples: Sequence[TokenizedExample],
              *, toxic_reference: bool = False) -> str:
    """Keyed by the model's identity, what is scored (``groups``, the toxic reference) and the exact
    token ids, so any change to the data, the tokenizer or the truncation settings gives a new key."""
    h = hashlib.sha256()
    h.update(f"{model_id}|{toxic_model_id}|{','.join(groups)}".encode())
    if toxic_reference:
        h.update(b"|toxic_ref")
    for ex in examples:
        toxic = ex.responses.get("toxic") if toxic_reference else None
        h.update(repr((ex.index, ex.prompt_ids, ex.toxic_prompt_ids, [ex.responses[g] for g in groups], toxic)).encode())
    return h.hexdigest()[:32]


def precompute_reference(
    model,
    examples: Sequence[TokenizedExample],
    groups: Sequence[str],
    pad_id: int,
    cache_dir: Path,
    key: str,
    *,
    toxic_reference: bool = False,
    toxic_model=None,
    batch_size: int = 8,
    desc: str = "reference log-probs",
    share_prompt: bool = True,
    pack: bool = False,
    accelerator=None,
) -> PrecomputedReference:
    """With an ``accelerator`` of N processes, each scores every N-th batch, the parts are gathered
    and put in data order on every process, and only the main process reads or writes the cache
    (its decision and table are sent to the others: no shared filesystem is assumed)."""
    path = cache_dir / f"{key}.pt"
    index_of = {ex.index: i for i, ex in enumerate(examples)}
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    cached = _main_process_cache(path, processes)
    if cached is not None:
        if rank == 0:
            log.info("reference log-probs: cache hit %s", path)
        return PrecomputedReference(cached, index_of)
    scorer = ModelReference(model, groups, pad_id, toxic_reference=toxic_reference, toxic_model=toxic_model,
                            share_prompt=share_prompt, pack=pack)
    # Longest first: similar lengths share a batch, so little is spent on padding.
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens())
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    parts = []
    for idx in tqdm(batches[rank::processes], desc=desc, unit="batch", disable=rank != 0):
        parts.append((idx, scorer([examples[i] for i in idx])))
    if processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    table = _table_in_data_order(parts, len(examples))
    if rank == 0:
        _write_cache(table, path)
        log.info("reference log-probs: cached %d examples at %s", len(examples), path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return PrecomputedReference(table, index_of)


def _main_process_cache(path: Path, processes: int) -> dict[str, torch.Tensor] | None:
    """The cached table if the main process finds one, on every process; None on all if not."""
    if processes == 1:
        return torch.load(path) if path.exists() else None
    from accelerate.state import PartialState
    from accelerate.utils import broadcast_object_list

    found = [torch.load(path) if PartialState().is_main_process and path.exists() else None]
    return broadcast_object_list(found, from_process=0)[0]


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
