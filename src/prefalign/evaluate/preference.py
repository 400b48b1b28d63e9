"""Held-out preference pairs scored by a model: the summed log-probabilities of the chosen and the
rejected response, from which the evaluation runner computes preference accuracy."""

from __future__ import annotations

from typing import Sequence

from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings, tokenize_record
from prefalign.evaluate.logps import response_logps


def pair_logps(model, tokenizer, records: Sequence[PreferenceRecord], settings: TokenizeSettings, batch_size: int = 8):
    """Summed response log-probs of chosen and rejected for each record: two [N] tensors."""
    examples = [tokenize_record(r, i, tokenizer, ("chosen", "rejected"), settings) for i, r in enumerate(records)]
    scores = response_logps(model, examples, ("chosen", "rejected"), tokenizer.pad_token_id, batch_size=batch_size)
    return scores["chosen"], scores["rejected"]
