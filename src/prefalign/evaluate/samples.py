"""Metrics on sampled responses: KL to the reference, perplexity under it, distinct-n."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings, tokenize_record
from prefalign.evaluate.stats import Estimate, mean
from prefalign.train.reference import score_examples


def response_logps(model, tokenizer, prompts: Sequence, responses: Sequence[str], settings: TokenizeSettings | None = None,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each response after its prompt, and its length in tokens (eos included)."""
    settings = settings or TokenizeSettings()
    examples = [
        tokenize_record(PreferenceRecord(prompt=p, chosen=r or " "), i, tokenizer, ("chosen",), settings)
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    out = []
    for start in range(0, len(examples), batch_size):
        out.append(score_examples(model, examples[start : start + batch_size], ("chosen",), tokenizer.pad_token_id)["chosen"])
    lengths = torch.tensor([len(ex.responses["chosen"][0]) for ex in examples], dtype=torch.float32)
    return (torch.cat(out) if out else torch.zeros(0)), lengths


def kl_to_reference(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> Estimate:
    """KL(π‖π_ref) ≈ mean over responses sampled from π of log π(y|x) − log π_ref(y|x)
    (sequence level, in nats), with its standard error."""
    return mean((policy_logps - reference_logps).tolist())


def perplexity(logps: torch.Tensor, lengths: torch.Tensor) -> Estimate:
    """Per-response perplexity exp(−log p / tokens) under the scoring model; mean and interval."""
    return mean(torch.exp(-logps / lengths.clamp(min=1)).tolist())


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
