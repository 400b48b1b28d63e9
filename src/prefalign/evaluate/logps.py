"""Summed response log-probs: the one log-prob pass of ``prefalign eval``.

KL and perplexity on sampled responses (:mod:`.samples`), held-out preference pairs and sycophancy
(:mod:`.preference`) and perplexity on reference texts (:mod:`.runner`) all score through
:func:`response_logps`:

- examples are cut into batches longest first, so each batch holds similar lengths and little is
  spent on padding; the results come back in the input order;
- each batch is scored as training scores its reference (``train.reference.score_examples``): the
  prompt encoded once for its responses, the decoder run once, and the LM head fused with the
  log-softmax (``train.head``) run only on the hidden states that predict response tokens, so no
  ``[tokens × vocab]`` logits are made for prompt tokens or padding;
- under N processes (``accelerate launch``, ``torchrun``) each scores every N-th of those batches
  and the values are gathered in item order (:mod:`prefalign.sharding`): the same batches, so the
  same values, as one process; every process must call it with the same examples;
- the intra-op thread count is chosen per decoder layer by timing (:mod:`prefalign.models.threads`):
  on the shared 2-core machine, with other runs holding the cores, torch's default of two threads
  made these passes about 4x slower than one (``benchmarks/eval_stage.py``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from prefalign.data.tokenize import TokenizedExample
from prefalign.models.threads import tuned_threads
from prefalign.sharding import distributed_state, longest_first_batches, sharded_map
from prefalign.train.reference import score_examples


def response_logps(model, examples: Sequence[TokenizedExample], groups: Sequence[str], pad_id: int,
                   *, batch_size: int = 8, autocast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Summed log-prob of each example's response in each of ``groups`` (one per example and group;
    prompt tokens never count): ``{group: [len(examples)]}``, float32, in the input order.
    ``autocast``: run the matmuls in that dtype (``torch.autocast``; weights and the log-softmax
    stay fp32), None: fp32 throughout."""
    batches = longest_first_batches([ex.num_tokens() for ex in examples], batch_size)
    device_type = next(model.parameters()).device.type
    precision = nullcontext() if autocast is None else torch.autocast(device_type, dtype=autocast)
    with tuned_threads(model), precision:
        scores = sharded_map(batches, lambda batch: score_examples(model, [examples[i] for i in batch], groups, pad_id),
                             distributed_state())
    out = {group: torch.zeros(len(examples)) for group in groups}
    for batch, score in zip(batches, scores):
        for group in groups:
            out[group][batch] = score[group].float()
    return out
