"""Pack (prompt, responses) into one batch and compute per-response summed log-probs.

Two layouts, one interface (``collate(...)`` → batch, ``sequence_logps(model, batch)`` → [N]):

* ``PairBatch`` — one row per (prompt, response): ``[left-padded prompt | right-padded response]``.
  Works with any causal LM.
* ``SharedPromptBatch`` — (prompt, responses) *blocks*: a prompt followed by all of its responses
  (chosen and rejected, D²O's K anchors, ADPO's toxic sample), with a 4-D attention mask in which
  every response sees its prompt and itself, never the other responses or another block, and
  position ids that restart after the prompt for each response. The prompt is encoded once for
  all of its responses, and gradients flow through it from every response. One block per row
  (prompts left-padded, ``share_prompt``), or packed padding-free (``pack``): whole blocks placed
  one after another in rows no longer than the longest block (first-fit decreasing). Used when
  the model's attention accepts a custom 4-D mask (``sdpa`` or ``eager``); otherwise the pair
  layout is used and the reason logged once. Packing also needs a plain ``lm_head`` (no logit
  scaling or soft-capping); otherwise one block per row.

The decoder runs once, and the LM head only on the hidden states that predict response tokens
(never on prompt tokens or padding), fused with the log-softmax (``head.linear_token_logps``). A
response's first token is predicted from the prompt's last position. In the unpacked layouts
prompts are left-padded so every response region starts at the same column: models whose logits
are not plain ``lm_head(hidden)`` (logit scaling, soft-capping) run whole, with ``logits_to_keep``
limiting the head to those columns.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from prefalign.data.records import RESPONSE_GROUPS, is_list_group
from prefalign.data.tokenize import TokenizedExample
from prefalign.train.head import linear_token_logps

log = logging.getLogger("prefalign.train")

SHARED_PROMPT_ATTENTION = {"sdpa", "eager"}
_fallback_logged: set[str] = set()


@dataclass
class _Segment:
    group: str
    example_pos: int
    response: list[int]


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [R, P + L]
    attention_mask: torch.Tensor  # [R, P + L]
    response_mask: torch.Tensor  # [R, L] True where a response token sits
    prompt_width: int  # P
    rows: dict[str, torch.Tensor]  # group -> response indices, [B] or [B, K] for anchors

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "PairBatch":
        self.input_ids, self.attention_mask, self.response_mask = (
            t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)
        )
        return self


@dataclass
class SharedPromptBatch:
    input_ids: torch.Tensor  # [N, P + W]: one row per prompt
    position_ids: torch.Tensor  # [N, P + W]
    attention_bias: torch.Tensor  # [N, 1, P + W, P + W] additive: 0 = attend, dtype-min = masked
    token_row: torch.Tensor  # [M] row of every response token
    token_col: torch.Tensor  # [M] column of every response token
    source_col: torch.Tensor  # [M] column whose logits predict it
    token_response: torch.Tensor  # [M] which response it belongs to
    num_responses: int
    prompt_width: int
    rows: dict[str, torch.Tensor]
    real_tokens: int
    packed: bool = False  # blocks packed into rows: no common prompt column (see _shared_tokens)

    @property
    def num_tokens(self) -> int:
        return self.real_tokens

    def to(self, device) -> "SharedPromptBatch":
        for name in ("input_ids", "position_ids", "attention_bias", "token_row", "token_col", "source_col", "token_response"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _segments(examples: Sequence[TokenizedExample], groups: Sequence[str]) -> list[tuple[list[int], list[_Segment]]]:
    """Per example, its prompt and the responses it holds of ``groups``, in group order."""
    return [(ex.prompt_ids, [_Segment(g, pos, r) for g in groups for r in ex.responses.get(g, ())])
            for pos, ex in enumerate(examples)]


def _rows_by_group(examples: Sequence[TokenizedExample], groups: Sequence[str], segments: list[_Segment]) -> dict[str, torch.Tensor]:
    """Group -> the indices of its responses, over the examples that hold the group, in their
    order: ``[B]``, or ``[B, K]`` for a list group (D²O's anchors). A batch may mix examples that
    hold different groups: ADPO's toxic reference scores a batch with its ``[TOXIC]`` views, which
    hold only ``toxic_ref``, in one pass."""
    slots = {g: {pos: [] for pos, ex in enumerate(examples) if g in ex.responses} for g in groups}
    for index, seg in enumerate(segments):
        slots[seg.group][seg.example_pos].append(index)
    rows = {}
    for group, per_example in slots.items():
        if not any(per_example.values()):
            continue
        sizes = {len(s) for s in per_example.values()}
        if len(sizes) != 1:
            raise ValueError(f"every example in a batch needs the same number of '{group}' responses, got {sorted(sizes)}")
        tensor = torch.tensor(list(per_example.values()), dtype=torch.long)
        # A list group stays [B, K]; one response per example (and a group that is not a record
        # group, as the toxic reference's rows) becomes [B].
        rows[group] = tensor if group in RESPONSE_GROUPS and is_list_group(group) else tensor[:, 0]
    return rows


def collate_pairs(examples, groups, pad_id) -> PairBatch:
    items = [(p, seg) for p, segs in _segments(examples, groups) for seg in segs]
    width_p = max(len(p) for p, _ in items)
    width_r = max(len(seg.response) for _, seg in items)
    n = len(items)
    input_ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_r), dtype=torch.long)
    response_mask = torch.zeros((n, width_r), dtype=torch.bool)
    for row, (prompt, seg) in enumerate(items):
        start, length = width_p - len(prompt), len(seg.response)
        input_ids[row, start:width_p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, width_p : width_p + length] = torch.tensor(seg.response, dtype=torch.long)
        attention[row, start : width_p + length] = 1
        response_mask[row, :length] = True
    return PairBatch(input_ids, attention, response_mask, width_p, _rows_by_group(examples, groups, [s for _, s in items]))


def _block_attention_bias(block: torch.Tensor, part: torch.Tensor, dtype) -> torch.Tensor:
    """Additive 4-D mask [N, 1, T, T] from per-column ``block`` (-1 = padding) and ``part`` (0 = the
    block's prompt, j = its j-th response): a token attends causally within its own block, to the
    prompt and to its own response only."""
    total = block.shape[1]
    q_block, k_block = block.unsqueeze(2), block.unsqueeze(1)
    q_part, k_part = part.unsqueeze(2), part.unsqueeze(1)
    causal = torch.ones((total, total), dtype=torch.bool).tril()
    visible = causal & (k_block >= 0) & (k_block == q_block) & ((k_part == 0) | (k_part == q_part))
    # Padding queries see themselves only, so no softmax row is empty (their outputs are unused).
    visible |= torch.eye(total, dtype=torch.bool) & (q_block < 0)
    bias = torch.zeros((block.shape[0], 1, total, total), dtype=dtype)
    return bias.masked_fill_(~visible.unsqueeze(1), torch.finfo(dtype).min)


def _pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """First-fit decreasing: block indices per row, no row longer than the longest block."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[index] <= free:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def collate_blocks(examples, groups, pad_id, *, pack=False, dtype=torch.float32) -> SharedPromptBatch:
    """(prompt, responses) blocks: one per row, each prompt left-padded to end at the same column
    (``prompt_width``), or with ``pack`` packed into rows no longer than the longest block."""
    blocks = _segments(examples, groups)
    lengths = [len(p) + sum(len(s.response) for s in segs) for p, segs in blocks]
    if pack:
        layout, prompt_width, total = _pack_rows(lengths), 0, max(lengths)
        row_start = [0] * len(layout)
    else:
        layout = [[b] for b in range(len(blocks))]
        prompt_width = max(len(p) for p, _ in blocks)
        total = prompt_width + max(length - len(p) for length, (p, _) in zip(lengths, blocks))
        row_start = [prompt_width - len(p) for p, _ in blocks]
    n = len(layout)
    input_ids = torch.full((n, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, total), dtype=torch.long)
    block_id = torch.full((n, total), -1, dtype=torch.long)  # which block a column holds, -1 = padding
    part = torch.zeros((n, total), dtype=torch.long)  # 0 = the block's prompt, j = its j-th response
    token_row, token_col, source_col, token_response = [], [], [], []
    # Responses are numbered in block order, whatever row a block lands in.
    first_response = [0]
    for _, segs in blocks:
        first_response.append(first_response[-1] + len(segs))
    for row, members in enumerate(layout):
        col = row_start[row]
        for b in members:
            prompt, segs = blocks[b]
            input_ids[row, col : col + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            position_ids[row, col : col + len(prompt)] = torch.arange(len(prompt))
            block_id[row, col : col + len(prompt)] = b
            last_prompt_col = col + len(prompt) - 1
            col += len(prompt)
            for j, seg in enumerate(segs, start=1):
                length = len(seg.response)
                input_ids[row, col : col + length] = torch.tensor(seg.response, dtype=torch.long)
                position_ids[row, col : col + length] = torch.arange(len(prompt), len(prompt) + length)
                block_id[row, col : col + length] = b
                part[row, col : col + length] = j
                token_row += [row] * length
                token_col += list(range(col, col + length))
                source_col += [last_prompt_col] + list(range(col, col + length - 1))
                token_response += [first_response[b] + j - 1] * length
                col += length
    bias = _block_attention_bias(block_id, part, dtype)
    all_segments = [seg for _, segs in blocks for seg in segs]
    return SharedPromptBatch(
        input_ids, position_ids, bias,
        torch.tensor(token_row), torch.tensor(token_col), torch.tensor(source_col), torch.tensor(token_response),
        len(all_segments), prompt_width, _rows_by_group(examples, groups, all_segments), sum(lengths), packed=pack,
    )


# Config attributes of models whose logits are not just lm_head(hidden): the decoder path would skip them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")


def _decoder_path_blocker(model) -> str | None:
    """Why the decoder and the LM head cannot be called apart on ``model`` (None: they can)."""
    config = getattr(model, "config", None)
    if not (hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")):
        return "the model exposes no decoder / output embeddings"
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return "the model transforms its logits (scaling or soft-capping)"
    engine = distributed_wrapper(model)
    if engine is not None:
        return f"calling the decoder alone would bypass {engine}"
    return None


def distributed_wrapper(model) -> str | None:
    """The engine that wraps or shards ``model`` (DDP, FSDP, FSDP2's ``fully_shard``, DeepSpeed),
    or None. Their forward pass is what gathers sharded weights (FSDP, ZeRO-3) and syncs gradients
    (DDP); calling the inner decoder, or reading the LM head's weight, outside it would skip that."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):  # by name: deepspeed is optional
        return "DeepSpeed"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # FSDP shards over a process group: one plain process skips the walk below (per batch)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    fsdp2 = getattr(torch.distributed.fsdp, "FSDPModule", None)
    for module in model.modules():  # a sharded submodule anywhere (the head, a layer) counts
        if isinstance(module, FullyShardedDataParallel):
            return "FullyShardedDataParallel"
        if fsdp2 is not None and isinstance(module, fsdp2):
            return "FSDP (fully_shard)"
    return None


def _log_once(message: str) -> None:
    if message not in _fallback_logged:
        _fallback_logged.add(message)
        log.info(message)


def supports_packing(model) -> bool:
    """Packing needs the shared-prompt attention, a decoder we can call alone, and logits that are
    plain ``lm_head(hidden)``."""
    if not supports_shared_prompt(model):
        return False
    reason = _decoder_path_blocker(model)
    if reason is not None:
        _log_once(f"packing off: {reason}; one prompt per row")
    return reason is None


def supports_shared_prompt(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in SHARED_PROMPT_ATTENTION:
        return True
    _log_once(f"prompt sharing off: attention implementation {impl!r} takes no custom 4-D mask; "
              "scoring one (prompt, response) row at a time")
    return False


def collate(examples, groups, pad_id, *, share_prompt=False, pack=False, dtype=torch.float32):
    if share_prompt or pack:
        return collate_blocks(examples, groups, pad_id, pack=pack, dtype=dtype)
    return collate_pairs(examples, groups, pad_id)


def _accepts_logits_to_keep(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _pair_tokens(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every response token ``[M]`` and the response it belongs to ``[M]``."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    width_r = batch.response_mask.shape[1]
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids, use_cache=False)
    targets = batch.input_ids[:, batch.prompt_width :]
    row, col = batch.response_mask.nonzero(as_tuple=True)
    if _decoder_path_blocker(model) is None:
        hidden = model.get_decoder()(**kwargs).last_hidden_state[:, batch.prompt_width - 1 : -1]
        return _head_logps(model, hidden[row, col], targets[row, col]), row
    if _accepts_logits_to_keep(model):
        # Logits at the column before each response token predict it: the last L + 1 columns.
        logits = model(**kwargs, logits_to_keep=width_r + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, batch.prompt_width - 1 : -1]
    return _token_logps(logits, targets)[row, col], row


def _sum_per_response(token_logps: torch.Tensor, response_of_token: torch.Tensor, num_responses: int) -> torch.Tensor:
    out = torch.zeros(num_responses, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, response_of_token, token_logps)


def _head_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target from the hidden state that predicts it (``[M, H]`` → ``[M]``)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return linear_token_logps(hidden, head.weight, targets)
    return _token_logps(head(hidden), targets)  # e.g. a LoRA-wrapped head: call it as it is


def _decoder_tokens(model, batch: SharedPromptBatch) -> torch.Tensor:
    """The decoder once over the batch, then the LM head on exactly the hidden states that predict
    response tokens."""
    bias = batch.attention_bias.to(next(model.parameters()).dtype)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=bias, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    return _head_logps(model, hidden[batch.token_row, batch.source_col], batch.input_ids[batch.token_row, batch.token_col])


def _shared_tokens(model, batch: SharedPromptBatch) -> torch.Tensor:
    if batch.packed or _decoder_path_blocker(model) is None:
        return _decoder_tokens(model, batch)  # packed batches are only built where this holds
    total = batch.input_ids.shape[1]
    keep = total - batch.prompt_width + 1  # columns P-1 .. end
    bias = batch.attention_bias.to(next(model.parameters()).dtype)
    logits = model(
        input_ids=batch.input_ids, attention_mask=bias, position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep
    ).logits
    offset = batch.prompt_width - 1
    selected = logits[batch.token_row, batch.source_col - offset]  # [M, V]
    return _token_logps(selected, batch.input_ids[batch.token_row, batch.token_col])


def _response_tokens(model, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every response token's log-prob ``[M]``, the response it belongs to ``[M]``, and the number
    of responses."""
    if isinstance(batch, SharedPromptBatch):
        return _shared_tokens(model, batch), batch.token_response, batch.num_responses
    token_logps, row = _pair_tokens(model, batch)
    return token_logps, row, batch.response_mask.shape[0]


def sequence_logps(model, batch) -> torch.Tensor:
    """Summed log-prob of each response (prompt tokens never count): shape [number of responses]."""
    token_logps, response, num = _response_tokens(model, batch)
    return _sum_per_response(token_logps, response.to(token_logps.device), num)


def sequence_token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For losses that read per-token log-probs: the summed log-prob of each response ``[N]`` (as
    :func:`sequence_logps`), each response's token log-probs ``[N, T]`` in order (0 past its end;
    ``T`` the longest response) and the mask of real tokens ``[N, T]``. One forward pass."""
    token_logps, response, num = _response_tokens(model, batch)
    response = response.to(token_logps.device)
    summed = _sum_per_response(token_logps, response, num)
    # Tokens of one response are contiguous and in order in every layout, but a packed row may hold
    # responses out of their numbering: a stable sort by response keeps each one's order.
    order = torch.sort(response, stable=True).indices
    sorted_response = response[order]
    counts = torch.bincount(sorted_response, minlength=num)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(sorted_response), device=response.device) - starts[sorted_response]
    width = int(counts.max()) if len(sorted_response) else 0
    per_token = token_logps.new_zeros((num, width)).index_put((sorted_response, position), token_logps[order])
    mask = torch.zeros((num, width), dtype=torch.bool, device=response.device)
    mask[sorted_response, position] = True
    return summed, per_token, mask


def split_groups(logps: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-response log-probs -> ``{group: [B] or [B, K]}``."""
    return {group: logps[index.to(logps.device)] for group, index in rows.items()}
