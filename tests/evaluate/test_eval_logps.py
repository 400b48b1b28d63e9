"""Evaluation's log-prob pass against the plain computation (full logits → log_softmax → gather, one
sequence at a time), in padded batches of mixed lengths, results in input order."""

from __future__ import annotations

import pytest
import torch

from prefalign.data.tokenize import TokenizedExample
from prefalign.evaluate.logps import longest_first_batches, response_logps


@pytest.fixture(scope="module")
def peaked_model(tiny_model):
    """tiny-random with std-0.5 weights: peaked next-token distributions, so log-probs differ from
    token to token and a response scored at the wrong position or in the wrong row shows."""
    from prefalign.models.loading import load_model

    model = load_model(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def plain_logp(model, prompt: list[int], response: list[int]) -> float:
    """Σ log p(response | prompt) from the model's full logits, one unpadded sequence."""
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(response)
    return logps[len(prompt) - 1 : len(prompt) - 1 + len(response)].gather(1, targets[:, None]).sum().item()


def mixed_examples(vocab: int, n: int = 7, seed: int = 0) -> list[TokenizedExample]:
    """Prompts of 1-12 tokens and chosen/rejected responses of 1-9 tokens, in no length order."""
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedExample(i, ids(1, 13), {"chosen": [ids(1, 10)], "rejected": [ids(1, 10)]}) for i in range(n)]


def test_response_logps_equal_full_logits_log_softmax_gather(peaked_model):
    examples = mixed_examples(peaked_model.config.vocab_size)
    # Batches of 3 pad prompts and responses of different lengths; the order is not the input's.
    got = response_logps(peaked_model, examples, ("chosen", "rejected"), pad_id=0, batch_size=3)
    for group in ("chosen", "rejected"):
        want = torch.tensor([plain_logp(peaked_model, ex.prompt_ids, ex.responses[group][0]) for ex in examples], dtype=torch.float64)
        assert got[group].dtype == torch.float32 and got[group].shape == (len(examples),)
        torch.testing.assert_close(got[group].double(), want, rtol=1e-5, atol=1e-4)


def test_results_follow_the_input_order(peaked_model):
    examples = mixed_examples(peaked_model.config.vocab_size, n=9, seed=1)
    reordered = [examples[i] for i in (4, 8, 0, 2, 7, 1, 5, 3, 6)]
    first = response_logps(peaked_model, examples, ("chosen",), pad_id=0, batch_size=4)["chosen"]
    second = response_logps(peaked_model, reordered, ("chosen",), pad_id=0, batch_size=2)["chosen"]
    torch.testing.assert_close(second, first[[4, 8, 0, 2, 7, 1, 5, 3, 6]], rtol=1e-5, atol=1e-4)
    assert response_logps(peaked_model, [], ("chosen",), pad_id=0)["chosen"].shape == (0,)


def test_longest_first_batches():
    assert longest_first_batches([3, 9, 3, 1, 9], 2) == [[1, 4], [0, 2], [3]]
    assert longest_first_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        longest_first_batches([1], 0)
