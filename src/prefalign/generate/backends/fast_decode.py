"""A decode loop for Llama-family models written for CPU generation, used by the transformers backend.

Where HF ``model.generate``'s time went on the 2-core machine these were measured on
(``benchmarks/README.md``): an OpenMP pool of as many threads as cores while other processes held
them (every matmul then waits on a descheduled thread at each barrier: a 16-row projection took
16 ms instead of 0.4 ms, a whole decode step ~0.3 s), fp32 matmuls on a CPU that multiplies bf16
natively, MKL kernels that take a slow path on AMD CPUs, and smaller per-step costs (a
``DynamicCache`` concatenated every step, masks rebuilt, seven projections per layer, logits
processors sorting the vocabulary). This module runs the same model with:

- the weights of each layer fused (q/k/v in one matmul, gate/up in one), in bf16 where the CPU
  multiplies bf16 natively (AVX512-BF16/AMX) and prepacked once in oneDNN's blocked layout (each
  matmul then skips re-laying-out its weight); norms, rotary embeddings, attention, the KV cache and
  the residual stream stay fp32;
- a KV cache allocated once per batch (``[layers, 2, rows, kv heads, length, head dim]``),
  written in place; attention folds the query heads of a KV group into one matmul (no repeat);
- each prompt prefilled once and its cache copied to its ``n`` sample rows;
- rows that ended (EOS or a stop string) dropped from the batch once a quarter of it has ended;
- the intra-op thread count chosen per decoder layer by timing layers
  (:class:`~prefalign.models.threads.ThreadTuner`, re-checked as the machine's load changes),
  restored afterwards;
- sampling seeded per row (each row has its own uniform numbers, drawn once), applied as HF's
  warpers do (temperature, then top-k, then top-p) without sorting the whole vocabulary: a row's
  tokens depend only on its prompt, its sample index and the sampling settings, never on which
  other rows share its batch.

In fp32 its logits are HF's (to ~1e-5) and greedy decoding gives HF ``generate``'s tokens
(``tests/generate/test_fast_decode.py``); in bf16 the next-token distribution of SmolLM2-135M differs from
fp32 by ~1e-3 nats (KL at temperature 0.7). Models it does not cover (:func:`unsupported_reason`)
go through ``model.generate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefalign.models.threads import ThreadTuner  # also shared by evaluation's log-prob passes

log = logging.getLogger("prefalign.generate")

# Generation-config fields that make HF generate do more than temperature/top-k/top-p sampling or
# greedy decoding (processors, penalties, beams); a model whose config sets one goes through HF.
_NEUTRAL_GENERATION_FIELDS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "temperature", "top_p", "top_k", "do_sample", "max_length", "max_new_tokens",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "cache_implementation", "num_return_sequences",
}
_STATIC_ROPE_TYPES = {"default", "linear", "llama3"}


def unsupported_reason(model) -> str | None:
    """Why :class:`FastDecoder` cannot run ``model`` (``None`` when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the fast path covers llama)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(getattr(inner, "rotary_emb", None), "inv_freq"):
        return "unexpected module layout"
    if getattr(model, "lm_head", None) is None or getattr(model.lm_head, "bias", None) is not None:
        return "lm_head with a bias"
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            diff = gen.to_diff_dict()
        except Exception:  # pragma: no cover - older configs
            diff = {}
        extra = sorted(k for k in diff if k not in _NEUTRAL_GENERATION_FIELDS)
        if extra:
            return f"generation config sets {', '.join(extra)}"
    if any(p.device.type == "meta" for p in model.parameters()):
        return "weights on the meta device"
    return None


_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _fused(tensors, device, dtype) -> torch.Tensor:
    """The weights ``tensors`` stacked along the output dimension, as one contiguous matrix."""
    t = torch.cat([x.detach() for x in tensors], 0) if len(tensors) > 1 else tensors[0].detach()
    return t.to(device=device, dtype=dtype).contiguous()


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor  # [(heads + 2 kv heads) * head_dim, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor  # [2 * intermediate, hidden]
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None


class FastDecoder:
    """Greedy or sampled decoding of a Llama-family ``LlamaForCausalLM`` (see the module docstring).

    ``compute_dtype``: the dtype of the matmul weights (``torch.float32`` or ``torch.bfloat16``);
    norms, rotary embeddings, attention, the KV cache and the residual stream stay in fp32.
    ``threads``: a fixed intra-op thread count, or ``None`` to tune it while decoding (CPU only).
    """

    def __init__(self, model, compute_dtype: torch.dtype = torch.float32, threads: int | None = None,
                 device: torch.device | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"FastDecoder does not cover this model: {reason}")
        self.model = model
        self.compute_dtype = compute_dtype
        self.device = device or next(model.parameters()).device
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.eps = float(config.rms_norm_eps)
        self.vocab = config.vocab_size
        self.fixed_threads = threads
        self.tuner = ThreadTuner(torch.get_num_threads()) if self.device.type == "cpu" and threads is None else None
        self._signature: tuple | None = None
        self._layers: list[_Layer] = []
        self._packed = False

    # ------------------------------------------------------------------ weights

    def _weights_signature(self) -> tuple:
        # In-place updates (an optimizer step) bump a tensor's version; a new tensor has a new pointer.
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _refresh(self) -> None:
        """(Re)build the fused weights when the model's parameters changed since the last call."""
        signature = self._weights_signature()
        if signature == self._signature:
            return
        dt, dev = self.compute_dtype, self.device
        inner = self.model.model

        def b(*mods):
            if all(getattr(m, "bias", None) is None for m in mods):
                return None
            parts = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=m.weight.device)
                     for m in mods]
            return torch.cat(parts).to(device=dev, dtype=dt)

        pack = self._packer()

        def w(*tensors):  # the fused weight, prepacked for oneDNN where possible
            return pack(_fused(tensors, dev, dt))

        layers = []
        with torch.no_grad():
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                layers.append(_Layer(
                    ln1=layer.input_layernorm.weight.detach().to(dev, torch.float32),
                    ln2=layer.post_attention_layernorm.weight.detach().to(dev, torch.float32),
                    wqkv=w(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                    bqkv=b(a.q_proj, a.k_proj, a.v_proj),
                    wo=w(a.o_proj.weight), bo=b(a.o_proj),
                    wgu=w(m.gate_proj.weight, m.up_proj.weight), bgu=b(m.gate_proj, m.up_proj),
                    wd=w(m.down_proj.weight), bd=b(m.down_proj),
                ))
            self._layers = layers
            self._embed = inner.embed_tokens.weight.detach()
            self._norm = inner.norm.weight.detach().to(dev, torch.float32)
            self._head = w(self.model.lm_head.weight)
            rotary = inner.rotary_emb
            self._inv_freq = rotary.inv_freq.detach().to(dev, torch.float32)
            self._rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self._signature = signature

    # ------------------------------------------------------------------ forward

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin of ``positions`` (any shape), as HF's rotary embedding computes
        them; the sin table's first half is negated so that :meth:`_rotate` needs no negation."""
        freqs = positions[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * self._rope_scale
        half = sin.shape[-1] // 2
        sin[..., :half].neg_()
        return emb.cos() * self._rope_scale, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """HF's ``x * cos + rotate_half(x) * sin`` (``(-a) * b == a * (-b)`` exactly in floating point)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin

    def _packer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """How weights are stored: prepacked in oneDNN's blocked layout on a CPU (each matmul then
        skips re-laying-out the weight: 1.3-2.4x faster per projection, identical bf16 results),
        else as they are. Probed once; any failure means plain ``F.linear``."""
        self._packed = False
        if self.device.type != "cpu" or not _ONEDNN_LINEAR:
            return lambda t: t
        try:
            probe = torch.randn(16, 8).to(self.compute_dtype)
            x = torch.randn(3, 8).to(self.compute_dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(probe, 8), None, "none", [], "")
            torch.testing.assert_close(got.float(), F.linear(x, probe).float(), rtol=1e-2, atol=1e-2)
        except Exception as exc:  # pragma: no cover - builds without oneDNN
            log.debug("oneDNN prepacked linear not available (%s); using F.linear", exc)
            return lambda t: t
        self._packed = True
        return lambda t: torch.ops.mkldnn._reorder_linear_weight(t, 32)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _norm_rows(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF's LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then the weight (in fp32 here).
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, start: int,
                 key_mask: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Run ``ids`` ``[rows, s]`` at cache slots ``start .. start+s``; return the last position's
        hidden state ``[rows, hidden]`` after the final norm (every position's, ``[rows, s, hidden]``,
        with ``all_positions``).

        ``key_mask``: additive fp32 ``[rows, 1, 1, slots]`` (0 where a slot holds a real token,
        -inf at left padding); a query attends to slots up to its own (causal inside the chunk).
        """
        rows, s = ids.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        group = nh // nkv
        end = start + s
        x = F.embedding(ids, self._embed).float()  # [rows, s, hidden], a new tensor updated in place
        cos, sin = self._rope_tables(positions)  # [rows, s, hd]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        mask = key_mask[..., :end]
        if s > 1:  # causal inside the chunk; a padded query sees itself only, so no row is all -inf
            causal = torch.full((s, end), float("-inf"), device=ids.device).triu(start + 1)
            mask = mask + causal
            eye = torch.arange(s, device=ids.device)
            mask = mask.clone()
            mask[:, :, eye, start + eye] = 0.0
        scale = hd ** -0.5
        tuner = self.tuner
        for li, L in enumerate(self._layers):
            if tuner is not None:
                threads = tuner.next_threads()
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                t0 = time.perf_counter()
            h = self._norm_rows(x, L.ln1)
            qkv = self._linear(h, L.wqkv, L.bqkv).float().view(rows, s, nh + 2 * nkv, hd).transpose(1, 2)
            qk = self._rotate(qkv[:, : nh + nkv], cos, sin)  # q and k heads in one op
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]
            cache[li, 0, :, :, start:end] = k
            cache[li, 1, :, :, start:end] = v
            keys, values = cache[li, 0, :, :, :end], cache[li, 1, :, :, :end]
            if s == 1:
                # The query heads of a KV group become rows of one matmul against that group's keys.
                qg = q.reshape(rows, nkv, group, hd)
                scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale).add_(mask)
                out = torch.matmul(scores.softmax(-1), values).reshape(rows, 1, nh * hd)
            else:
                out = F.scaled_dot_product_attention(
                    q, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), attn_mask=mask, scale=scale,
                ).transpose(1, 2).reshape(rows, s, nh * hd)
            x.add_(self._linear(out, L.wo, L.bo))  # a bf16 output is widened exactly inside the add
            h = self._norm_rows(x, L.ln2)
            gu = self._linear(h, L.wgu, L.bgu)
            gate, up = gu.chunk(2, dim=-1)
            x.add_(self._linear(F.silu(gate) * up, L.wd, L.bd))
            if tuner is not None:
                tuner.record(threads, time.perf_counter() - t0)
        return self._norm_rows(x if all_positions else x[:, -1], self._norm)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self._head, None).float()

    @torch.inference_mode()
    def sequence_logits(self, seq: Sequence[int]) -> torch.Tensor:
        """fp32 logits ``[len(seq), vocab]`` at every position of one token sequence (for checks
        against the model's own forward)."""
        self._refresh()
        n, dev = len(seq), self.device
        cache = torch.zeros((len(self._layers), 2, 1, self.n_kv, n, self.head_dim), device=dev)
        hidden = self._forward(torch.tensor([list(seq)], device=dev), torch.arange(n, device=dev)[None], cache, 0,
                               torch.zeros((1, 1, 1, n), device=dev), all_positions=True)
        return self._logits(hidden[0])

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        rows_per_prompt: int,
        max_new_tokens: int,
        sampler: "Sampler",
        end_ids: set[int],
        stop_check: Callable[[list[int]], bool] | None = None,
        prefill_chunk: int = 512,
    ) -> list[list[int]]:
        """New token ids for each prompt's ``rows_per_prompt`` rows (prompt-major order), each cut
        before its first end token, or after the token that completed a stop string
        (``stop_check(ids)`` true)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        self._refresh()
        old_threads = torch.get_num_threads()
        try:
            return self._generate(prompts, rows_per_prompt, max_new_tokens, sampler, end_ids, stop_check, prefill_chunk)
        finally:
            torch.set_num_threads(old_threads)

    def _set_threads(self, n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def _generate(self, prompts, rows_per_prompt, max_new_tokens, sampler, end_ids, stop_check, prefill_chunk):
        dev = self.device
        n_prompts = len(prompts)
        width = max(len(p) for p in prompts)
        slots = width + max_new_tokens
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        ids = torch.zeros((n_prompts, width), dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):  # left padding: every row's next token goes to the same slot
            ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        pad = width - lengths  # first real slot of each prompt
        slot_index = torch.arange(slots, device=dev)
        key_mask = torch.where(slot_index[None] >= pad[:, None], 0.0, float("-inf"))[:, None, None, :]
        positions = (torch.arange(width, device=dev)[None] - pad[:, None]).clamp_min(0)

        if self.fixed_threads is not None:
            self._set_threads(self.fixed_threads)
        # Prefill each prompt once (in chunks along the prompt, bounding activation memory).
        cache = torch.zeros((len(self._layers), 2, n_prompts, self.n_kv, slots, self.head_dim), device=dev)
        step_rows = max(1, prefill_chunk // max(1, width)) if width < prefill_chunk else 1
        hidden = torch.empty((n_prompts, self.hidden), device=dev)
        for r0 in range(0, n_prompts, step_rows):
            sl = slice(r0, r0 + step_rows)
            sub_cache = cache[:, :, sl]  # a view: the forward's cache writes land in ``cache``
            h = None
            for c0 in range(0, width, prefill_chunk):
                c1 = min(width, c0 + prefill_chunk)
                h = self._forward(ids[sl, c0:c1], positions[sl, c0:c1], sub_cache, c0, key_mask[sl])
            hidden[sl] = h
        logits = self._logits(hidden)
        n_rows = n_prompts * rows_per_prompt
        if rows_per_prompt > 1:  # every sample row starts from its prompt's cache
            expand = torch.arange(n_prompts, device=dev).repeat_interleave(rows_per_prompt)
            cache = cache[:, :, expand]
            logits = logits[expand]
            key_mask = key_mask[expand]
            lengths = lengths[expand]

        out = torch.zeros((n_rows, max_new_tokens), dtype=torch.long)
        produced = [0] * n_rows
        done = [False] * n_rows
        live = list(range(n_rows))  # batch row -> output row
        uniforms = sampler.uniforms(max_new_tokens)  # [n_rows, max_new_tokens] (None when greedy)
        row_uniforms = uniforms
        for step in range(max_new_tokens):
            u = None if row_uniforms is None else row_uniforms[:, step]
            tokens = sampler.sample(logits, u)
            tok_list = tokens.tolist()
            for b, row in enumerate(live):
                if done[row]:  # ended at an earlier step, still in the batch until the next compaction
                    continue
                t = tok_list[b]
                if t in end_ids:
                    done[row] = True
                    continue
                out[row, step] = t
                produced[row] = step + 1
                if stop_check is not None and stop_check(out[row, : step + 1].tolist()):
                    done[row] = True
            if step == max_new_tokens - 1:
                break
            keep = [b for b, row in enumerate(live) if not done[row]]
            if not keep:
                break
            if len(keep) <= 0.75 * len(live):  # drop ended rows: a quarter of the batch is free work
                index = torch.tensor(keep, device=dev)
                cache = cache[:, :, index]
                key_mask = key_mask[index]
                lengths = lengths[index]
                tokens = tokens[index]
                live = [live[b] for b in keep]
                if row_uniforms is not None:
                    row_uniforms = row_uniforms[index.cpu()]
            hidden = self._forward(tokens[:, None].to(dev), (lengths + step)[:, None], cache, width + step, key_mask)
            logits = self._logits(hidden)
        return [out[r, : produced[r]].tolist() for r in range(n_rows)]


class Sampler:
    """Next tokens from logits as HF's warpers make them: ``logits / temperature``, then top-k
    (keep scores >= the k-th largest), then top-p (keep the most likely tokens while the mass
    ranked above a token is below ``top_p``: HF's "cumulative probability of the ascending sort
    > 1 - top_p"), then one draw from what is left by inverse CDF with the row's own uniform number.

    Each row's uniform numbers come from :func:`row_seed` (the user's seed, the sampling settings,
    the prompt's ids, the sample's index), so a row draws the same tokens in any batch.
    ``temperature == 0``: argmax (HF's greedy decoding). Top-p looks at the 64, then the 1024
    most likely tokens, and sorts the whole vocabulary only for a row whose nucleus is larger.
    """

    CANDIDATES = (64, 1024)

    def __init__(self, temperature: float, top_p: float = 1.0, top_k: int = 0, row_seeds: Sequence[int] | None = None):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.row_seeds = list(row_seeds or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def uniforms(self, steps: int) -> torch.Tensor | None:
        """``[rows, steps]`` uniform numbers in [0, 1), one stream per row seed."""
        if self.greedy:
            return None
        return torch.from_numpy(np.stack([np.random.default_rng(s).random(steps) for s in self.row_seeds]))

    def sample(self, logits: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        u = u.to(device=scores.device, dtype=torch.float64)
        vocab = scores.shape[-1]
        top_k = min(self.top_k, vocab) if self.top_k else 0
        if top_k:
            vals, idx = scores.topk(top_k, dim=-1)  # sorted, largest first
            if (scores >= vals[:, -1:]).sum(-1).max().item() > top_k:  # ties at the k-th score: HF keeps them all
                return self._sample_sorted(scores.masked_fill(scores < vals[:, -1:], float("-inf")), u)
            probs = (vals - vals.logsumexp(-1, keepdim=True)).exp()
            return idx.gather(-1, _draw(self._nucleus(probs), u)[:, None]).squeeze(-1)
        if self.top_p >= 1.0:
            return _draw(scores.softmax(-1), u)
        log_z = scores.logsumexp(-1, keepdim=True)
        out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        todo = torch.arange(scores.shape[0], device=scores.device)
        for n_cand in self.CANDIDATES:
            if n_cand >= vocab:
                break
            vals, idx = scores[todo].topk(n_cand, dim=-1)
            probs = (vals - log_z[todo]).exp()
            fits = probs.sum(-1) >= self.top_p  # the nucleus lies among the candidates
            if fits.any():
                sel = fits.nonzero().squeeze(-1)
                picks = _draw(self._nucleus(probs[sel]), u[todo[sel]])
                out[todo[sel]] = idx[sel].gather(-1, picks[:, None]).squeeze(-1)
            todo = todo[~fits]
            if todo.numel() == 0:
                return out
        out[todo] = self._sample_sorted(scores[todo], u[todo])
        return out

    def _nucleus(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` (sorted, largest first) with the tokens outside the top-p nucleus zeroed."""
        if self.top_p >= 1.0:
            return probs
        above = probs.cumsum(-1) - probs
        return torch.where(above < self.top_p, probs, torch.zeros_like(probs))

    def _sample_sorted(self, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The same draw after a full sort of the vocabulary (ties at the k-th score, or a nucleus
        larger than the candidates)."""
        vals, idx = scores.sort(-1, descending=True)
        return idx.gather(-1, _draw(self._nucleus(vals.softmax(-1)), u)[:, None]).squeeze(-1)


def _draw(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of ``probs`` ``[rows, vocab]`` (not necessarily
    normalised) with the uniform numbers ``u`` ``[rows]``: the first index whose cumulative
    probability exceeds ``u`` times the total. Two levels (block sums, then one block's cumulative
    sum) instead of a cumulative sum over the whole vocabulary."""
    rows, vocab = probs.shape
    n_blocks = -(-vocab // block)
    if n_blocks * block != vocab:
        probs = F.pad(probs, (0, n_blocks * block - vocab))
    blocks = probs.view(rows, n_blocks, block)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [rows, n_blocks]
    target = (u * cdf[:, -1]).unsqueeze(-1)
    b = torch.searchsorted(cdf, target, right=True).clamp_max(n_blocks - 1)  # [rows, 1]
    before = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    inner = blocks[torch.arange(rows, device=probs.device), b.squeeze(-1)].double().cumsum(-1)
    j = torch.searchsorted(inner, target - before, right=True).clamp_max(block - 1)
    # Rounding can point past the block's last non-zero entry: step back to one that can be drawn.
    pick = (b * block + j).squeeze(-1)
    bad = probs.gather(-1, pick[:, None]).squeeze(-1) <= 0
    if bad.any():
        pick = torch.where(bad, _last_positive(probs, pick), pick)
    return pick


def _last_positive(probs: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The last index with positive probability at or before ``pick`` in each row (else the first
    positive one)."""
    idx = torch.arange(probs.shape[-1], device=probs.device)
    ok = probs > 0
    before = torch.where(ok & (idx <= pick[:, None]), idx, torch.full_like(idx, -1)).amax(-1)
    first = torch.where(ok, idx, torch.full_like(idx, probs.shape[-1])).amin(-1)
    return torch.where(before >= 0, before, first)


def row_seed(seed: int, temperature: float, top_p: float, top_k: int, prompt: Sequence[int], sample: int) -> int:
    """The seed of one sample row: the user's seed, the sampling settings, the prompt's ids and the
    sample's index (not the token budget, ``n`` or the stop strings, so a longer budget or a larger
    ``n`` extends the same samples)."""
    payload = json.dumps([seed, float(temperature), float(top_p), int(top_k), list(prompt), sample])
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big")
