"""Metrics on sampled responses: KL to the reference, perplexity under it, distinct-n."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from prefalign.data.tokenize import TokenizedExample
from prefalign.evaluate.logps import response_logps
from prefalign.evaluate.stats import Estimate, mean


def sampled_logps(model, pad_id: int, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                  max_length: int = 4096, batch_size: int = 8, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of exactly the sampled tokens after exactly the prompt the sampler saw, and
    their count. Nothing is re-tokenized and no end-of-sequence token is added to a response that
    stopped at the token limit: both would bias a KL estimate from samples. Prompts longer than
    ``max_length`` minus the response lose tokens from the left."""
    examples = []
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        response = list(response)[:max_length - 1] or [pad_id]
        prompt = list(prompt)[-(max_length - len(response)):]
        examples.append(TokenizedExample(i, prompt, {"chosen": [response]}))
    logps = response_logps(model, examples, ("chosen",), pad_id, batch_size=batch_size, autocast=autocast)["chosen"]
    lengths = torch.tensor([len(ex.responses["chosen"][0]) for ex in examples], dtype=torch.float32)
    return logps, lengths


def kl_to_reference(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> Estimate:
    """KL(π‖π_ref) ≈ mean over responses sampled from π of log π(y|x) − log π_ref(y|x)
    (sequence level, in nats), with its standard error. Unbiased when the samples come from π
    itself (temperature 1, no top-p/top-k) and the log-probs are of exactly the sampled tokens
    (:func:`sampled_logps`); at another temperature it is the log-ratio under that sampler."""
    return mean((policy_logps - reference_logps).tolist())


def perplexity_items(logps: torch.Tensor, lengths: torch.Tensor) -> list[float]:
    """Per-response perplexity exp(−log p / tokens) under the scoring model, one per response."""
    return torch.exp(-logps / lengths.clamp(min=1)).tolist()


def perplexity(logps: torch.Tensor, lengths: torch.Tensor) -> Estimate:
    """Per-response perplexity exp(−log p / tokens) under the scoring model; mean and interval."""
    return mean(perplexity_items(logps, lengths))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams in the responses (words, lower-cased): 1 = no repetition."""
    total, unique = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else float("nan")


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]
