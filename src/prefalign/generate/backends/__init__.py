"""Generation backends: conversations + :class:`SamplingParams` in, ``n`` completions each out.

``make_backend("transformers", model="smollm2-135m-instruct")`` builds one by name; the registry
(:data:`BACKENDS`) maps each name to its class, so a new backend is one class and one entry.
"""

from __future__ import annotations

from prefalign.generate.backends.base import (
    Conversation,
    GenerationBackend,
    GenerationStats,
    Message,
    SamplingParams,
)
from prefalign.generate.backends.llamacpp_backend import LlamaCppBackend
from prefalign.generate.backends.openai_backend import OpenAIBackend, OpenAIBackendError
from prefalign.generate.backends.transformers_backend import TransformersBackend
from prefalign.generate.backends.vllm_backend import VLLMBackend

BACKENDS: dict[str, type] = {
    "transformers": TransformersBackend,
    "openai": OpenAIBackend,
    "vllm": VLLMBackend,
    "llamacpp": LlamaCppBackend,
}


def make_backend(kind: str, **kwargs) -> GenerationBackend:
    """Construct the backend registered as ``kind`` with ``kwargs``."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown backend {kind!r}; known: {', '.join(sorted(BACKENDS))}") from None
    return cls(**kwargs)


__all__ = [
    "BACKENDS",
    "Conversation",
    "GenerationBackend",
    "GenerationStats",
    "LlamaCppBackend",
    "Message",
    "OpenAIBackend",
    "OpenAIBackendError",
    "SamplingParams",
    "TransformersBackend",
    "VLLMBackend",
    "make_backend",
]
