"""The reward-model network both ``prefalign train-rm`` and the ``reward-model`` scorer use.

Two folder layouts load through :func:`load_reward_model`:

* any ``AutoModelForSequenceClassification`` folder (``train-rm`` on a causal LM writes one);
* a *mean-pool* folder (``train-rm`` on an encoder such as MiniLM): the encoder as a normal HF
  folder plus ``reward_head.safetensors`` and ``prefalign_reward.json``; the score is a linear head
  on the attention-masked mean of the last hidden states.

Inputs (:func:`encode_pairs`): a causal tokenizer renders the prompt with the one prompt renderer
(:mod:`prefalign.data.render`: the chat template, or the plain-role fallback, per
``chat_template: auto|always|never``), so the reward model reads the prompt tokens the policy was
sampled and trained with, followed by the response as the closed assistant turn. A cross-encoder
tokenizer (BERT-style) without a chat template gets a text pair (``[CLS] prompt [SEP] response
[SEP]``); with no prompt, the response alone. Too long? A rendered exchange is cut from the left
(the prompt goes first, the end of the response stays); a text pair loses tokens from the longer
of its two parts. Batches are padded on the right.

Scoring (:func:`exchange_rewards`): on a causal classifier whose attention takes a 4-D mask, the
responses that share a prompt are scored in one block, the prompt encoded once (the training
layout of :mod:`prefalign.train.sequences`); every response sees its prompt and itself only, so
each score equals the one of its exchange alone, up to float rounding. A Bradley-Terry step scores
chosen and rejected under the same prompt: with prompts several times longer than the answers (the
sycophancy questions: ~250 prompt tokens, ~30 answer tokens) that is nearly half the work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from prefalign.data.render import encode_exchange, encode_prompt, uses_chat_template

from .base import Prompt, prompt_text

MEAN_POOL_MARKER = "prefalign_reward.json"
MEAN_POOL_HEAD = "reward_head.safetensors"
MEAN_POOL_FORMAT = "prefalign-mean-pool-reward/1"


class MeanPoolRewardModel(torch.nn.Module):
    """An encoder (``AutoModel``) + attention-masked mean pooling + a linear head -> one score."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids, attention_mask, **kwargs):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)  # [batch, 1]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.encoder.save_pretrained(folder)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(folder / MEAN_POOL_HEAD))
        (folder / MEAN_POOL_MARKER).write_text(
            json.dumps({"format": MEAN_POOL_FORMAT, "pooling": "mean", "hidden_size": self.encoder.config.hidden_size}, indent=2)
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype=None) -> "MeanPoolRewardModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        folder = Path(folder)
        meta = json.loads((folder / MEAN_POOL_MARKER).read_text())
        if meta.get("format") != MEAN_POOL_FORMAT:
            raise ValueError(f"{folder / MEAN_POOL_MARKER}: unknown format {meta.get('format')!r}")
        model = cls(AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype))
        model.head.load_state_dict(load_file(str(folder / MEAN_POOL_HEAD)))
        if dtype is not None:
            model.head.to(dtype)
        return model


def is_mean_pool_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MEAN_POOL_MARKER).is_file()


def load_reward_model(model: str | os.PathLike, *, dtype: str = "float32", trust_remote_code: bool = False):
    """``(model, tokenizer, folder)`` for a reward-model folder of either layout (eval mode)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefalign.models.registry import resolve_model

    given = Path(model)
    if given.is_dir() and not (given / "config.json").exists() and (given / "model" / "config.json").exists():
        model = given / "model"  # a train-rm output dir
    folder = resolve_model(model)
    torch_dtype = getattr(torch, dtype)
    if is_mean_pool_folder(folder):
        net = MeanPoolRewardModel.from_pretrained(folder, dtype=torch_dtype)
    else:
        net, info = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        if info.get("missing_keys"):
            missing = ", ".join(sorted(info["missing_keys"])[:4])
            raise ValueError(
                f"{folder} is not a trained reward model: its classifier weights ({missing}) are missing, so "
                "its scores would be random; train one with `prefalign train-rm` or give a classifier folder"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer, net)
    return net.eval(), tokenizer, Path(folder)


def prepare_tokenizer(tokenizer, model) -> None:
    """Right padding, a pad token, and the model's ``pad_token_id`` set (sequence classifiers on
    causal LMs find the last real token through it)."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # cut the start (the prompt), keep the end of the response
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def use_chat_template(tokenizer, mode: str) -> bool:
    """Whether ``mode`` renders with the chat template (``always`` without one: a ``ValueError``)."""
    return uses_chat_template(tokenizer, mode)


def reads_text_pairs(tokenizer, mode: str) -> bool:
    """A cross-encoder tokenizer (BERT-style, with a separator token) reads ``prompt [SEP] response``
    when no chat template renders the prompt; causal tokenizers go through the prompt renderer."""
    return getattr(tokenizer, "sep_token_id", None) is not None and not uses_chat_template(tokenizer, mode)


def encode_pairs(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *, max_length: int,
                 chat_template: str = "auto"):
    """Token ids + attention mask for (prompt, response) pairs, padded on the right.

    With a causal tokenizer each row is :func:`prefalign.data.render.encode_exchange`: the prompt's
    ids exactly as generation and training render them (:func:`prefalign.data.render.encode_prompt`),
    then the response as the closed assistant turn; rows longer than ``max_length`` lose tokens from
    the left. A cross-encoder tokenizer without a chat template gets a text pair."""
    if all(p is None for p in prompts):
        return tokenizer(list(responses), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if reads_text_pairs(tokenizer, chat_template):
        firsts = [prompt_text(p) for p in prompts]
        return tokenizer(firsts, list(responses), padding=True, truncation="longest_first", max_length=max_length,
                         return_tensors="pt")
    rows = []
    for p, r in zip(prompts, responses):
        if p is None:
            ids = list(tokenizer(r, add_special_tokens=True)["input_ids"])
        else:
            ids = encode_exchange(tokenizer, p, r, chat_template)
        rows.append(ids[-max_length:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reward_logits(model, batch):
    """``[batch, num_labels]`` logits for either layout."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.logits


def exchange_rewards(model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *, max_length: int,
                     chat_template: str = "auto", device=None) -> torch.Tensor:
    """``[N, num_labels]`` logits of each (prompt, response), prompts shared where the model allows
    (see the module docstring); otherwise, and for exchanges longer than ``max_length`` (cut from
    the left, so their prompt is not the shared one), :func:`encode_pairs` and one row per exchange."""
    device = device if device is not None else next(model.parameters()).device
    shared = _shared_prompt_batch(model, tokenizer, prompts, responses, max_length, chat_template)
    if shared is None:
        batch = encode_pairs(tokenizer, prompts, responses, max_length=max_length, chat_template=chat_template)
        return reward_logits(model, {k: v.to(device) for k, v in batch.items()})
    batch, order, last_cols, alone = shared
    parts, where = [], []
    if order:
        batch = batch.to(device)
        bias = batch.attention_bias.to(next(model.parameters()).dtype)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=bias, position_ids=batch.position_ids,
                                  use_cache=False).last_hidden_state
        rows, cols = (torch.tensor(v, device=device) for v in zip(*last_cols))
        parts.append(model.score(hidden[rows, cols]))
        where += order
    if alone:
        rows_batch = encode_pairs(tokenizer, [prompts[i] for i in alone], [responses[i] for i in alone],
                                  max_length=max_length, chat_template=chat_template)
        parts.append(reward_logits(model, {k: v.to(device) for k, v in rows_batch.items()}))
        where += alone
    scores = torch.cat(parts)
    out = torch.empty_like(scores)
    out[torch.tensor(where, device=device)] = scores
    return out


def _shared_prompt_batch(model, tokenizer, prompts, responses, max_length, chat_template):
    """``(SharedPromptBatch, original index of each of its responses in block order, (row, column)
    each score is read at, indices of the exchanges to score one row each)``, or ``None`` where the
    one-row-per-exchange layout must be used for all."""
    from prefalign.data.tokenize import TokenizedExample
    from prefalign.train.sequences import SHARED_PROMPT_ATTENTION, collate_blocks

    if (isinstance(model, MeanPoolRewardModel) or not isinstance(getattr(model, "score", None), torch.nn.Linear)
            or getattr(model, "base_model", model) is model  # no decoder to call apart from the head
            or getattr(model.config, "_attn_implementation", None) not in SHARED_PROMPT_ATTENTION
            or any(p is None for p in prompts) or reads_text_pairs(tokenizer, chat_template)):
        return None
    blocks: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    alone = []
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        head = encode_prompt(tokenizer, prompt, chat_template)
        ids = encode_exchange(tokenizer, prompt, response, chat_template)
        if len(ids) > max_length or ids[: len(head)] != head or len(ids) == len(head):
            alone.append(index)  # cut from the left (its prompt is not the shared one), or an odd template
        else:
            blocks.setdefault(tuple(head), []).append((index, ids[len(head):]))
    if not blocks:
        return None
    slots = [f"r{j}" for j in range(max(len(members) for members in blocks.values()))]
    examples = [TokenizedExample(b, list(head), {slots[j]: [rest] for j, (_, rest) in enumerate(members)})
                for b, (head, members) in enumerate(blocks.items())]
    pad = model.config.pad_token_id
    batch = collate_blocks(examples, slots, pad if pad is not None else 0)
    order = [index for members in blocks.values() for index, _ in members]
    # The score is read where the classifier reads it on a lone exchange: its last token that is not
    # the pad token (the prompt's last token when the whole response is pad tokens).
    last: dict[int, tuple[int, int]] = {}
    for row, col, source, number in zip(batch.token_row.tolist(), batch.token_col.tolist(),
                                        batch.source_col.tolist(), batch.token_response.tolist()):
        if number not in last:
            last[number] = (row, source)
        if int(batch.input_ids[row, col]) != pad:
            last[number] = (row, col)
    return batch, order, [last[n] for n in range(len(order))], alone


def resolve_label(model, label: int | str | None) -> int:
    """The output index to read: the only one, or ``label`` (an index or a ``label2id`` name)."""
    config = model.config
    num = 1 if isinstance(model, MeanPoolRewardModel) else int(getattr(config, "num_labels", 1) or 1)
    if label is None:
        if num != 1:
            names = ", ".join(f"{i}={n}" for i, n in sorted(getattr(config, "id2label", {}).items()))
            raise ValueError(f"label: the model has {num} outputs ({names}); choose one with 'label'")
        return 0
    if isinstance(label, str):
        if isinstance(model, MeanPoolRewardModel):
            raise ValueError("label: a mean-pool reward model has one unnamed output")
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if label not in label2id:
            raise ValueError(f"label: '{label}' is not one of the model's labels {sorted(label2id)}")
        return label2id[label]
    if not 0 <= label < num:
        raise ValueError(f"label: index {label} out of range for a model with {num} outputs")
    return label


