"""Generation with vLLM's offline engine (``vllm.LLM``); needs a CUDA GPU and ``pip install vllm``.

vLLM is imported only when a :class:`VLLMBackend` is constructed, so importing this module (or the
backend registry) costs nothing where vLLM is absent. Prompts are rendered with the same chat
template logic as the transformers backend and passed as token ids, so both backends see the same
prompt. Each request carries ``params.seed``, which makes a conversation's samples independent of
what else is in the batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

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

log = logging.getLogger("prefalign.generate")

INSTALL_HINT = "VLLMBackend needs vLLM, which is not installed: pip install vllm (it needs a CUDA GPU)"


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str | os.PathLike, *, show_progress: bool = True, **engine_kwargs) -> None:
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_id = _resolve(model)
        self.show_progress = show_progress
        engine_kwargs.setdefault("trust_remote_code", False)
        self.llm = vllm.LLM(model=self.model_id, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.last_stats = GenerationStats()

    def __repr__(self) -> str:
        return f"VLLMBackend(model_id={self.model_id!r})"

    def render(self, conversation: Conversation) -> str:
        return render_with_tokenizer(self.tokenizer, conversation)

    def sampling_params(self, params: SamplingParams):
        """Our :class:`SamplingParams` as vLLM's (greedy requests are made once and repeated)."""
        greedy = params.temperature == 0
        return self._vllm.SamplingParams(
            n=1 if greedy else params.n,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=-1 if greedy or params.top_k <= 0 else params.top_k,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
        )

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        check_conversations(conversations)
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, c)} for c in conversations]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.sampling_params(params), use_tqdm=self.show_progress)
        seconds = time.perf_counter() - start
        results: list[list[str]] = []
        new_tokens = 0
        for request in outputs:
            texts = [Completion(cut_at_stop(o.text, params.stop), getattr(o, "finish_reason", None) == "length")
                     for o in request.outputs]
            new_tokens += sum(len(o.token_ids) for o in request.outputs)
            if params.temperature == 0:
                texts = texts[:1] * params.n
            results.append(texts)
        self.last_stats = GenerationStats(
            prompts=len(conversations), new_tokens=new_tokens, seconds=seconds,
            extra={"backend": self.name, "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts)},
        )
        log.info(
            "generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)",
            new_tokens, len(conversations), seconds, self.last_stats.tokens_per_s,
        )
        return results


def _resolve(model: str | os.PathLike) -> str:
    """Registry names, local folders and ``.gguf`` files become a local folder; anything else is
    passed to vLLM unchanged (it may be a model name vLLM resolves from its own cache)."""
    from prefalign.models.registry import resolve_model

    try:
        return str(resolve_model(model))
    except FileNotFoundError:
        return str(model)
