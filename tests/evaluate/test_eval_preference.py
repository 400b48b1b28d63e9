"""Held-out preference log-probs: batched by length, returned in input order."""

from __future__ import annotations

import torch

from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings
from prefalign.evaluate.preference import pair_logps
from prefalign.models.loading import load_model, load_tokenizer
from conftest import pair_rows


def test_pair_logps_batched_by_length_equal_one_at_a_time_in_input_order(tiny_model):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    rows = pair_rows(7)
    rows[2]["chosen"] = "A much longer chosen answer that forces this pair to the front of the length order. " * 3
    records = [PreferenceRecord(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows]
    settings = TokenizeSettings()
    with torch.no_grad():
        batched = pair_logps(model, tok, records, settings, batch_size=3)
        single = [pair_logps(model, tok, [r], settings, batch_size=1) for r in records]
    for got, want in zip(batched, (torch.cat([c for c, _ in single]), torch.cat([r for _, r in single]))):
        assert got.shape == (7,)
        assert torch.allclose(got, want, atol=1e-4)
