"""A retain term: language modelling on text the model did not write, added to a preference loss.

Negative-only and push-down objectives (D²O, unlearning) lower the likelihood of whole responses;
what they lower spreads to text in general, and the model's perplexity on human-written text rises
(``d2o-harmless`` in the README: +22.5% with D²O alone). The remedy the unlearning literature uses
is a retain set: keep the model's likelihood of ordinary text up while the main loss pushes the
negatives down ("gradient difference", Liu et al. 2022, arXiv:2203.12817; NPO + RT, Zhang et al.
2024, arXiv:2404.05868). Here each micro-batch of the main loss comes with a micro-batch of retain
records (``prompt`` + ``chosen``: a written answer), and the step minimises::

    loss = main_loss + retain_weight * (sum of the retain answers' token NLLs / their token count)

The retain batches cycle through the retain file in an order fixed by (seed, micro-batch number),
so a resumed run draws the same batches as one that never stopped; under N processes each process
takes its slice of the same global retain batch, and the term is the global per-token mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prefalign.data.tokenize import TokenizedExample, TokenizeSettings, tokenize_record
from prefalign.data.validate import load_for_loss
from prefalign.losses import get_loss
from prefalign.train.distributed import rank_slice, sum_over_processes

#: The record fields a retain file needs (those of the ``sft`` loss: ``prompt`` and ``chosen``).
RETAIN_LOSS = "sft"


def load_retain_examples(config, tokenizer) -> list[TokenizedExample]:
    """The retain file's records, checked as for the ``sft`` loss and tokenised like the training
    data (the same chat template and length limits)."""
    checked = load_for_loss(config.retain_data, get_loss(RETAIN_LOSS), skip_invalid=config.skip_invalid)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, config.chat_template, config.toxic_control_token)
    return [tokenize_record(r, i, tokenizer, ("chosen",), settings) for i, r in enumerate(checked.records)]


def retain_batch(num_examples: int, batch_size: int, seed: int, micro_batch: int) -> list[int]:
    """The retain rows of the ``micro_batch``-th micro-batch of a run (counted from 0 over all
    steps): consecutive slices of a shuffled order, a new order each pass over the file; the last
    slice of a pass wraps into the next one's start, so every batch has ``batch_size`` rows."""
    batch_size = min(batch_size, num_examples)
    start = micro_batch * batch_size
    rows = []
    while len(rows) < batch_size:
        lap, offset = divmod(start + len(rows), num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_019 + lap)).tolist()
        rows += order[offset : offset + batch_size - len(rows)]
    return rows


@dataclass
class RetainTerm:
    """What one micro-batch's retain term gives: the tensor to back-propagate (this process's share,
    scaled so that averaging the processes' gradients gives the global mean's) and the global
    per-token NLL for the logs."""

    backward: torch.Tensor
    nll_per_token: float


def retain_term(trainer, examples: Sequence[TokenizedExample], micro_batch: int) -> RetainTerm:
    """The retain term of one micro-batch: ``trainer.config.retain_weight`` times the mean token NLL
    of its retain answers under the policy being trained."""
    from prefalign.train.sequences import collate, sequence_logps

    config, accelerator = trainer.config, trainer.accelerator
    # Per process, as batch_size is: N processes draw N times the rows, and each takes its slice.
    per_process = config.retain_batch_size or config.batch_size
    global_rows = retain_batch(len(examples), per_process * accelerator.num_processes, config.seed, micro_batch)
    share = rank_slice(global_rows, accelerator.process_index, accelerator.num_processes)
    batch_examples = [examples[i] for i in share.indices]
    batch = collate(batch_examples, ("chosen",), trainer.pad_id, share_prompt=trainer.share_prompt,
                    pack=trainer.pack).to(accelerator.device)
    with accelerator.autocast():
        nll = -sequence_logps(trainer.model, batch).sum()
    tokens = 0 if share.is_stand_in else sum(len(ex.responses["chosen"][0]) for ex in batch_examples)
    local = 0.0 if share.is_stand_in else nll.detach().double().item()
    total = sum_over_processes(accelerator, {"nll": local, "tokens": tokens})
    scale = 0.0 if share.is_stand_in else accelerator.num_processes / total["tokens"]
    return RetainTerm(backward=config.retain_weight * scale * nll, nll_per_token=total["nll"] / total["tokens"])
