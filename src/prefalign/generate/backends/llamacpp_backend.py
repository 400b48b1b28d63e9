"""Generation in-process with llama.cpp (``llama-cpp-python``) from a ``.gguf`` file — the engine
users compare against, and the way to sample a policy written by ``prefalign export``.

Prompts are rendered by the one prompt renderer (:func:`render_with_tokenizer`) with the HF
tokenizer read from the same GGUF (or from ``tokenizer``, an HF folder), then tokenized by
llama.cpp itself, so the ids are the ones the GGUF's vocabulary gives.
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from prefalign.generate.backends.base import (
    Completion,
    Conversation,
    GenerationStats,
    SamplingParams,
    check_conversations,
    render_with_tokenizer,
)

log = logging.getLogger("prefalign.generate")

LLAMA_CPP_INSTALL = "pip install llama-cpp-python (compiles llama.cpp; `make test` builds it)"
# llama.cpp built with -march=native on a CPU with AMX (Intel Sapphire Rapids and later) runs its
# quantized matmuls on AMX tiles, which crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the
# machines this was measured on; the Makefile builds it with these flags.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CPP_REBUILD = (f'CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" pip install --force-reinstall --no-cache-dir '
                     "--no-deps llama-cpp-python")

_PROBE = ("import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False); "
          "m.eval(m.tokenize(b'Hello there, how are you?', add_bos=True)); print('ok')")


@functools.lru_cache(maxsize=None)
def _probe(path: str, mtime: float) -> str | None:
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not decode a few tokens of {path} within 300 s (in a probe process)"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        how = f"crashed ({signal.Signals(-proc.returncode).name})"
    else:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        how = f"failed (exit {proc.returncode}: {last})"
    return (f"llama.cpp {how} decoding a few tokens of {path} in a probe process; if llama-cpp-python was "
            f"built on a CPU with AMX, rebuild it without: {LLAMA_CPP_REBUILD}")


def llama_cpp_problem(gguf: str | Path) -> str | None:
    """Why llama.cpp cannot run ``gguf`` here (``None`` when it decodes a few tokens). It runs in a
    child process: a crash inside llama.cpp kills the process it runs in, and must not kill ours."""
    path = Path(gguf).resolve()
    return _probe(str(path), path.stat().st_mtime)


def _llama_class():
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ImportError(f"the llamacpp backend needs llama-cpp-python: {LLAMA_CPP_INSTALL}") from exc
    return Llama


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, model: str, tokenizer: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
                 show_progress: bool = False) -> None:
        path = Path(model).expanduser()
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(f"llamacpp backend: model must be a .gguf file, got {model!r} "
                             "(write one with: prefalign export MODEL_DIR --gguf out.gguf)")
        Llama = _llama_class()
        problem = llama_cpp_problem(path)
        if problem:
            raise RuntimeError(problem)
        from transformers import AutoTokenizer

        self.model_id = str(path.resolve())
        self.tokenizer = (AutoTokenizer.from_pretrained(tokenizer, local_files_only=True) if tokenizer
                          else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self.last_stats = GenerationStats()

    def __repr__(self) -> str:
        return f"LlamaCppBackend(model={self.model_id!r})"

    def encode(self, conversation: Conversation) -> list[int]:
        text = render_with_tokenizer(self.tokenizer, conversation)
        # add_bos: llama.cpp adds BOS only where the GGUF's vocabulary says the model wants one.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _sample(self, prompt_ids: list[int], params: SamplingParams, seed: int | None, stats: GenerationStats) -> Completion:
        out = self.llm.create_completion(
            prompt=prompt_ids, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, stop=list(params.stop) or None, seed=seed,
            # Plain sampling as the other backends do it: llama-cpp-python's own defaults add a
            # min-p filter and would change the distribution.
            min_p=0.0, repeat_penalty=1.0,
        )
        choice = out["choices"][0]
        stats.new_tokens += out["usage"]["completion_tokens"]
        return Completion(choice["text"], truncated=choice.get("finish_reason") == "length")

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        check_conversations(conversations)
        stats = GenerationStats(prompts=len(conversations), extra={"backend": self.name})
        start = time.perf_counter()
        out = []
        for conversation in conversations:
            prompt_ids = self.encode(conversation)
            # Sample j gets seed + j: n samples differ, and a rerun repeats them.
            seeds = [None if params.seed is None else params.seed + j for j in range(params.n)]
            out.append([self._sample(prompt_ids, params, seed, stats) for seed in seeds])
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        log.info("llama.cpp generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)",
                 stats.new_tokens, stats.prompts, stats.seconds, stats.tokens_per_s)
        return out

    def close(self) -> None:
        self.llm.close()
