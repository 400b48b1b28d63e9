"""Pack (prompt, responses) into one batch and compute per-response summed log-probs.

Two layouts, one interface (``collate(...)`` → batch, ``sequence_logps(model, batch)`` → [N]):

* ``PairBatch`` — one row per (prompt, response): ``[left-padded prompt | right-padded response]``.
  Works with any causal LM.
* ``SharedPromptBatch`` — one row per prompt: ``[left-padded prompt | resp_1 | resp_2 | ...]`` with a
  4-D attention mask in which every response sees the prompt and itself, never the other
  responses, and position ids restart after the prompt for each response. The prompt is encoded
  once for all of its responses (chosen and rejected, D²O's K anchors, ADPO's toxic sample), and
  gradients flow through it from every response. Used when the model's attention accepts a custom
  4-D mask (``sdpa`` or ``eager``); otherwise the pair layout is used and the reason logged once.

In both, prompts are left-padded so every response region starts at the same column. The decoder
runs once, and the LM head only on the hidden states that predict response tokens (never on prompt
tokens or padding), fused with the log-softmax (``head.linear_token_logps``). A response's first
token is predicted from the prompt's last position. Models whose logits are not plain
``lm_head(hidden)`` (logit scaling, soft-capping) run whole, with ``logits_to_keep`` limiting the
head to the response columns.

* Packed (``collate(..., pack=True)``, a ``SharedPromptBatch`` with ``packed=True``) — padding-free:
  whole (prompt, responses) blocks are placed one after another in rows no longer than the longest
  block (first-fit decreasing), the 4-D mask keeps every block to itself, and position ids restart
  per block. Needs the shared-prompt attention and a plain ``lm_head`` (no logit scaling or
  soft-capping); otherwise the unpacked layout is used.
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
    packed: bool = False  # blocks packed into rows: no common prompt column, see _packed_logps

    @property
    def num_tokens(self) -> int:
        return self.real_tokens

    def to(self, device) -> "SharedPromptBatch":
        for name in ("input_ids", "position_ids", "attention_bias", "token_row", "token_col", "source_col", "token_response"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _segments(examples: Sequence[TokenizedExample], groups: Sequence[str], toxic_reference: bool):
    """Per prompt, the responses scored behind it. ``toxic_ref`` rows hold the toxic response
    behind the ``[TOXIC]``-prefixed prompt: the reference scoring them plays ADPO's inner toxic
    model."""
    prompts: list[tuple[list[int], list[_Segment]]] = []
    for pos, ex in enumerate(examples):
        prompts.append((ex.prompt_ids, [_Segment(g, pos, r) for g in groups for r in ex.responses[g]]))
    if toxic_reference:
        for pos, ex in enumerate(examples):
            if ex.toxic_prompt_ids is None:
                raise ValueError(f"example {ex.index} has no [TOXIC] prompt; tokenise with with_toxic_prompt=True")
            prompts.append((ex.toxic_prompt_ids, [_Segment("toxic_ref", pos, r) for r in ex.responses["toxic"]]))
    return prompts


def _rows_by_group(segments: list[_Segment], num_examples: int) -> dict[str, torch.Tensor]:
    slots: dict[str, list[list[int]]] = {}
    for index, seg in enumerate(segments):
        slots.setdefault(seg.group, [[] for _ in range(num_examples)])[seg.example_pos].append(index)
    rows = {}
    for group, per_example in slots.items():
        sizes = {len(s) for s in per_example}
        if len(sizes) != 1:
            raise ValueError(f"every example in a batch needs the same number of '{group}' responses, got {sorted(sizes)}")
        tensor = torch.tensor(per_example, dtype=torch.long)
        # A list group (D2O's anchors) stays [B, K]; one response per example (and the toxic
        # reference rows, which are not a record group) becomes [B].
        rows[group] = tensor if group in RESPONSE_GROUPS and is_list_group(group) else tensor[:, 0]
    return rows


def collate_pairs(examples, groups, pad_id, *, toxic_reference=False) -> PairBatch:
    items = [(p, seg) for p, segs in _segments(examples, groups, toxic_reference) for seg in segs]
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
    return PairBatch(input_ids, attention, response_mask, width_p, _rows_by_group([s for _, s in items], len(examples)))


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


def collate_shared(examples, groups, pad_id, *, toxic_reference=False, dtype=torch.float32) -> SharedPromptBatch:
    prompts = _segments(examples, groups, toxic_reference)
    width_p = max(len(p) for p, _ in prompts)
    width_w = max(sum(len(s.response) for s in segs) for _, segs in prompts)
    n, total = len(prompts), width_p + width_w
    input_ids = torch.full((n, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, total), dtype=torch.long)
    # Segment id per column: 0 = prompt, j = j-th response, -1 = padding.
    segment = torch.full((n, total), -1, dtype=torch.long)
    token_row, token_col, source_col, token_response = [], [], [], []
    all_segments: list[_Segment] = []
    real = 0
    for row, (prompt, segs) in enumerate(prompts):
        start = width_p - len(prompt)
        input_ids[row, start:width_p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[row, start:width_p] = torch.arange(len(prompt))
        segment[row, start:width_p] = 0
        col = width_p
        for j, seg in enumerate(segs, start=1):
            length = len(seg.response)
            input_ids[row, col : col + length] = torch.tensor(seg.response, dtype=torch.long)
            position_ids[row, col : col + length] = torch.arange(len(prompt), len(prompt) + length)
            segment[row, col : col + length] = j
            token_row += [row] * length
            token_col += list(range(col, col + length))
            source_col += [width_p - 1] + list(range(col, col + length - 1))
            token_response += [len(all_segments)] * length
            all_segments.append(seg)
            col += length
        real += len(prompt) + col - width_p
    # One block per row: every real column belongs to block 0, its part is its segment.
    bias = _block_attention_bias(torch.where(segment >= 0, 0, -1), segment.clamp(min=0), dtype)
    return SharedPromptBatch(
        input_ids, position_ids, bias,
        torch.tensor(token_row), torch.tensor(token_col), torch.tensor(source_col), torch.tensor(token_response),
        len(all_segments), width_p, _rows_by_group(all_segments, len(examples)), real,
    )


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


def collate_packed(examples, groups, pad_id, *, toxic_reference=False, dtype=torch.float32) -> SharedPromptBatch:
    blocks = _segments(examples, groups, toxic_reference)
    lengths = [len(p) + sum(len(s.response) for s in segs) for p, segs in blocks]
    layout = _pack_rows(lengths)
    n, total = len(layout), max(lengths)
    input_ids = torch.full((n, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, total), dtype=torch.long)
    block_id = torch.full((n, total), -1, dtype=torch.long)  # which block a column holds, -1 = padding
    part = torch.zeros((n, total), dtype=torch.long)  # 0 = the block's prompt, j = its j-th response
    token_row, token_col, source_col, token_response = [], [], [], []
    # Responses are numbered in block order, as in the unpacked layouts, whatever row they land in.
    first_response = [0]
    for _, segs in blocks:
        first_response.append(first_response[-1] + len(segs))
    for row, members in enumerate(layout):
        col = 0
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
        len(all_segments), 0, _rows_by_group(all_segments, len(examples)), sum(lengths), packed=True,
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
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "calling the decoder alone would bypass DistributedDataParallel"
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


def collate(examples, groups, pad_id, *, toxic_reference=False, share_prompt=False, pack=False, dtype=torch.float32):
    if pack:
        return collate_packed(examples, groups, pad_id, toxic_reference=toxic_reference, dtype=dtype)
    if share_prompt:
        return collate_shared(examples, groups, pad_id, toxic_reference=toxic_reference, dtype=dtype)
    return collate_pairs(examples, groups, pad_id, toxic_reference=toxic_reference)


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
