"""Generation with a local ``transformers`` model, batched with left padding and a KV cache.

Two engines run the model:

- ``fast`` (the default on a CPU for Llama-family models, :mod:`.fast_decode`): a hand-written
  decode loop with fused weights (bf16 where the CPU multiplies bf16 natively, prepacked for
  oneDNN), a KV cache
  allocated once per batch, each prompt prefilled once for its ``n`` samples, ended rows dropped
  from the batch, the thread count tuned to the machine's load, and a sampler that does not sort
  the vocabulary. In fp32 its greedy tokens are HF ``generate``'s.
- ``hf``: ``model.generate`` (any model, any device; the fallback).

In both:

- Conversations are rendered with the tokenizer's chat template (``add_generation_prompt=True``), or
  as ``User: ...\\nAssistant:`` text when the tokenizer has none (:meth:`TransformersBackend.render`).
- Prompts are sorted by token length and cut into batches, so little compute goes to padding;
  results come back in the input order.
- Sampling is seeded: the same inputs give the same outputs whatever ran before, and the global
  torch RNG is left untouched. ``fast`` seeds each sample row from (seed, sampling settings,
  prompt, sample index), so a row's tokens do not depend on the rest of its batch; ``hf`` seeds
  each batch from (seed, batch contents, sampling settings).
- Only the new tokens are decoded (special tokens skipped); texts are cut at the first stop string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from prefalign.generate.backends.base import (
    Completion,
    Conversation,
    GenerationStats,
    SamplingParams,
    check_conversations,
    cut_at_stop,
    encode_prompt,
    render_with_tokenizer,
)
from prefalign.sharding import longest_first_batches

log = logging.getLogger("prefalign.generate")


ENGINES = ("auto", "fast", "hf")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


class TransformersBackend:
    """The default backend: a local causal LM, run by the fast decode loop or ``model.generate``.

    ``model`` is a registry name (``smollm2-135m-instruct``, ``tiny-random``), a local HF folder, a
    ``.gguf`` file, or an already loaded model (then pass ``tokenizer`` too, or the tokenizer is
    loaded from ``model.name_or_path``). ``batch_size`` counts sequences per batch, so with
    sampling and ``n > 1`` each batch holds ``batch_size // n`` prompts (at least one).

    ``engine``: ``auto`` (``fast`` for a Llama-family model on a CPU whose generation config asks
    for nothing but temperature/top-k/top-p, else ``hf``), ``fast`` or ``hf``
    (:mod:`prefalign.generate.backends.fast_decode`). ``compute_dtype``: the fast engine's matmul
    precision; ``auto`` is bf16 on a CPU with native bf16 (AVX512-BF16/AMX, as ``dtype: auto``
    decides for training) and fp32 elsewhere; norms, attention and the residual stream stay fp32.
    ``threads``: the fast engine's intra-op threads (``None``: tuned while decoding).
    """

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer=None,
        batch_size: int = 32,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        *,
        device: str | None = None,
        show_progress: bool = True,
        engine: str = "auto",
        compute_dtype: str = "auto",
        threads: int | None = None,
    ) -> None:
        from prefalign.models.loading import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.last_stats = GenerationStats()

        if isinstance(model, (str, os.PathLike)):
            from prefalign.models.loading import model_folder

            folder = model_folder(model)
            self.model_id = str(folder)
            self.model = load_model(folder, dtype=dtype, trust_remote_code=trust_remote_code)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model.to(device)
            if tokenizer is None:
                tokenizer = folder
        else:
            if not hasattr(model, "generate"):
                raise TypeError(f"model must be a name, a folder or a loaded causal LM, got {type(model).__name__}")
            self.model = model
            self.model_id = str(getattr(model, "name_or_path", "") or type(model).__name__)
            if device is not None:
                self.model.to(device)
            if tokenizer is None:
                if not getattr(model, "name_or_path", ""):
                    raise ValueError("pass tokenizer= with a loaded model that has no name_or_path")
                tokenizer = model.name_or_path
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.model.eval()

        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        # A finished row is filled with pad tokens; when pad is a special token it ends the text too.
        self._end_ids = set(self.eos_token_ids)
        if self.pad_token_id in set(getattr(tokenizer, "all_special_ids", []) or []):
            self._end_ids.add(self.pad_token_id)
        self._stop_support: dict[tuple[str, ...], bool] = {}
        self.engine, self.engine_reason = self._choose_engine(engine)
        self.compute_dtype = self._choose_compute_dtype(compute_dtype) if self.engine == "fast" else None
        self._decoder = None
        self._threads = threads
        log.info("transformers backend: %s engine%s (%s)", self.engine,
                 f", {self.compute_dtype} matmuls" if self.compute_dtype else "", self.engine_reason)

    def __repr__(self) -> str:
        return f"TransformersBackend(model_id={self.model_id!r}, batch_size={self.batch_size}, engine={self.engine!r})"

    def _choose_engine(self, requested: str) -> tuple[str, str]:
        from prefalign.generate.backends.fast_decode import unsupported_reason

        if requested == "hf":
            return "hf", "asked for"
        reason = unsupported_reason(self.model)
        if requested == "fast":
            if reason:
                raise ValueError(f"engine 'fast' cannot run this model: {reason}; use engine 'hf'")
            return "fast", "asked for"
        if reason:
            return "hf", f"fast path not available: {reason}"
        if self.model.device.type != "cpu":
            return "hf", f"on {self.model.device.type}, model.generate is the tested path"
        return "fast", "llama-family model on the CPU"

    def _choose_compute_dtype(self, requested: str) -> str:
        if requested != "auto":
            return requested
        from prefalign.train.precision import bf16_is_fast

        if self.model.dtype in (torch.float32, torch.bfloat16) and bf16_is_fast(self.model.device.type)[0]:
            return "bfloat16"
        return "float32"

    @property
    def decoder(self):
        """The fast engine's :class:`~prefalign.generate.backends.fast_decode.FastDecoder` (built
        on first use; it re-reads the weights when the model's parameters changed)."""
        if self._decoder is None:
            from prefalign.generate.backends.fast_decode import FastDecoder

            self._decoder = FastDecoder(self.model, getattr(torch, self.compute_dtype), threads=self._threads,
                                        device=self.model.device)
        return self._decoder

    # ------------------------------------------------------------------ prompts

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, conversation: Conversation) -> str:
        """The exact prompt text the model sees for ``conversation``."""
        return render_with_tokenizer(self.tokenizer, conversation)

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of the rendered prompt (a chat template already carries its special tokens)."""
        return encode_prompt(self.tokenizer, conversation)

    # --------------------------------------------------------------- generation

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        ids = self.generate_token_ids(conversations, params)
        out = []
        for per_conv in ids:
            texts = self.tokenizer.batch_decode(per_conv, skip_special_tokens=True)
            completions = []
            for row, text in zip(per_conv, texts):
                cut = cut_at_stop(text, params.stop)
                # No end token within the budget and no stop string: the limit cut it.
                completions.append(Completion(cut, len(row) >= params.max_new_tokens and cut == text))
            out.append(completions)
        return out

    def generate_token_ids(
        self, conversations: Sequence[Conversation], params: SamplingParams
    ) -> list[list[list[int]]]:
        """For each conversation, ``params.n`` lists of new token ids (cut after the first eos)."""
        check_conversations(conversations)
        prompts = [self.encode(c) for c in conversations]
        greedy = params.temperature == 0
        n_rows = 1 if greedy else params.n  # greedy samples are identical: generate once, repeat
        per_batch = max(1, self.batch_size // n_rows)
        # Longest first: similar lengths share a batch, and an out-of-memory shows up at once.
        batches = longest_first_batches([len(p) for p in prompts], per_batch)

        results: list[list[list[int]] | None] = [None] * len(prompts)
        stats = GenerationStats(prompts=len(prompts))
        prompt_tokens = padded = 0
        start = time.perf_counter()
        with tqdm(total=len(batches), desc="generate", unit="batch", disable=not self.show_progress) as bar:
            for batch in batches:
                rows = self._generate_batch([prompts[i] for i in batch], params, n_rows)
                width = max(len(prompts[i]) for i in batch)
                prompt_tokens += sum(len(prompts[i]) for i in batch)
                padded += sum(width - len(prompts[i]) for i in batch)
                for j, i in enumerate(batch):
                    mine = rows[j * n_rows : (j + 1) * n_rows]
                    stats.new_tokens += sum(len(r) for r in mine)
                    results[i] = mine * params.n if greedy else mine
                bar.update(1)
        stats.seconds = time.perf_counter() - start
        stats.extra = {
            "backend": self.name,
            "engine": self.engine,
            "compute_dtype": self.compute_dtype,
            "batches": len(batches),
            "prompt_tokens": prompt_tokens,
            "padding_tokens": padded,
            "sequences": len(prompts) * n_rows,
        }
        self.last_stats = stats
        if self.engine == "fast" and self.decoder.tuner is not None:
            stats.extra["threads"] = self.decoder.tuner.best
        log.info(
            "generated %d tokens for %d prompts in %.2fs (%.1f tokens/s, %d batches, %s engine)",
            stats.new_tokens, stats.prompts, stats.seconds, stats.tokens_per_s, len(batches), self.engine,
        )
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, n_rows: int) -> list[list[int]]:
        """New token ids of ``n_rows`` rows per prompt (prompt-major), cut before the first end token."""
        if self.engine == "fast":
            return self._generate_batch_fast(prompts, params, n_rows)
        return self._generate_batch_hf(prompts, params, n_rows)

    def _generate_batch_fast(self, prompts: list[list[int]], params: SamplingParams, n_rows: int) -> list[list[int]]:
        from prefalign.generate.backends.fast_decode import Sampler, row_seed

        seeds: list[int] = []
        if params.temperature > 0:
            for p in prompts:
                for j in range(n_rows):
                    if params.seed is None:  # unseeded: the global torch RNG decides, as with model.generate
                        seeds.append(int(torch.randint(0, 2**62, (1,)).item()))
                    else:
                        seeds.append(row_seed(params.seed, params.temperature, params.top_p, params.top_k, p, j))
        sampler = Sampler(params.temperature, params.top_p, params.top_k, row_seeds=seeds)
        stop_check = None
        if params.stop:
            stops = [s for s in params.stop if s]

            def stop_check(ids: list[int]) -> bool:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                return any(s in text for s in stops)

        return self.decoder.generate(prompts, n_rows, params.max_new_tokens, sampler, self._end_ids, stop_check)

    def _generate_batch_hf(self, prompts: list[list[int]], params: SamplingParams, n_rows: int) -> list[list[int]]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: the new tokens line up at the right edge
            if p:
                input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[r, width - len(p) :] = 1

        kwargs: dict = dict(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if params.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, num_return_sequences=n_rows,
            )
        if params.stop and self._supports_stop_strings(params.stop):
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)

        with torch.inference_mode():
            if params.seed is None or params.temperature == 0:
                out = self.model.generate(**kwargs)
            else:
                fork_devices = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=fork_devices):
                    torch.manual_seed(_batch_seed(params, prompts))
                    out = self.model.generate(**kwargs)
        new = out[:, width:].tolist()
        return [self._trim(row) for row in new]

    def _trim(self, row: list[int]) -> list[int]:
        """Keep tokens up to the first eos (excluded); what follows is padding of a finished row."""
        for k, t in enumerate(row):
            if t in self._end_ids:
                return row[:k]
        return row

    def _supports_stop_strings(self, stop: tuple[str, ...]) -> bool:
        if stop not in self._stop_support:
            try:
                from transformers import StopStringCriteria

                StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
                self._stop_support[stop] = True
            except Exception as exc:  # texts are still cut afterwards; generation just runs longer
                log.debug("stop_strings not supported with this tokenizer (%s); cutting afterwards", exc)
                self._stop_support[stop] = False
        return self._stop_support[stop]


def _batch_seed(params: SamplingParams, prompts: list[list[int]]) -> int:
    """A seed derived from the user's seed, the sampling params and the exact batch contents."""
    payload = json.dumps([asdict(params), prompts], sort_keys=True, default=list)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big") & ((1 << 63) - 1)
