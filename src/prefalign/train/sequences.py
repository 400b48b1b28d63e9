"""Pack (prompt, response) pairs into one batch and compute per-sequence summed log-probs.

Layout: every row is ``[left-padded prompt | right-padded response]``, so all responses start at
the same column. One forward pass then needs the LM head only over the response columns
(``logits_to_keep``), which skips the vocabulary projection for every prompt token — on a 49k
vocabulary that projection dominates a small model's step. Position ids are recomputed from the
attention mask, so a left-padded prompt gets exactly the positions it would have unpadded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from prefalign.data.tokenize import TokenizedExample


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [R, P + L]
    attention_mask: torch.Tensor  # [R, P + L]
    response_mask: torch.Tensor  # [R, L] True where a response token sits
    prompt_width: int  # P
    rows: dict[str, torch.Tensor]  # group -> row indices, [B] or [B, K] for anchors

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def group_pairs(
    examples: Sequence[TokenizedExample], groups: Sequence[str], *, toxic_reference: bool = False
) -> list[tuple[str, int, list[int], list[int]]]:
    """List ``(group, example_pos, prompt_ids, response_ids)`` for every row of the batch.

    ``toxic_ref`` rows hold the toxic response behind the ``[TOXIC]``-prefixed prompt: the
    reference model scoring them plays the inner toxic model (ADPO).
    """
    items = []
    for group in groups:
        for pos, ex in enumerate(examples):
            for response in ex.responses[group]:
                items.append((group, pos, ex.prompt_ids, response))
    if toxic_reference:
        for pos, ex in enumerate(examples):
            if ex.toxic_prompt_ids is None:
                raise ValueError(f"example {ex.index} has no [TOXIC] prompt; tokenise with with_toxic_prompt=True")
            for response in ex.responses["toxic"]:
                items.append(("toxic_ref", pos, ex.toxic_prompt_ids, response))
    return items


def collate(
    examples: Sequence[TokenizedExample], groups: Sequence[str], pad_id: int, *, toxic_reference: bool = False
) -> SequenceBatch:
    items = group_pairs(examples, groups, toxic_reference=toxic_reference)
    width_p = max(len(p) for _, _, p, _ in items)
    width_r = max(len(r) for _, _, _, r in items)
    n = len(items)
    input_ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_r), dtype=torch.long)
    response_mask = torch.zeros((n, width_r), dtype=torch.bool)
    per_group: dict[str, list[list[int]]] = {}
    for row, (group, pos, prompt, response) in enumerate(items):
        start = width_p - len(prompt)
        input_ids[row, start:width_p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, width_p : width_p + len(response)] = torch.tensor(response, dtype=torch.long)
        attention[row, start : width_p + len(response)] = 1
        response_mask[row, : len(response)] = True
        slots = per_group.setdefault(group, [[] for _ in examples])
        slots[pos].append(row)
    rows = {}
    for group, slots in per_group.items():
        sizes = {len(s) for s in slots}
        if len(sizes) != 1:
            raise ValueError(f"every example in a batch needs the same number of '{group}' responses, got {sorted(sizes)}")
        tensor = torch.tensor(slots, dtype=torch.long)
        rows[group] = tensor if group == "anchors" else tensor[:, 0]
    return SequenceBatch(input_ids, attention, response_mask, width_p, rows)


def _accepts_logits_to_keep(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def sequence_logps(model, batch: SequenceBatch) -> torch.Tensor:
    """Summed log-prob of each row's response tokens (prompt tokens never count), shape [R]."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    width_r = batch.response_mask.shape[1]
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids, use_cache=False)
    if _accepts_logits_to_keep(model):
        # Logits at the column before each response token predict it: the last L + 1 columns.
        logits = model(**kwargs, logits_to_keep=width_r + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, batch.prompt_width - 1 : -1]
    targets = batch.input_ids[:, batch.prompt_width :]
    logits = logits.float()
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * batch.response_mask).sum(-1)


def split_groups(logps: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row log-probs -> ``{group: [B] or [B, K]}``."""
    return {group: logps[index] for group, index in rows.items()}
