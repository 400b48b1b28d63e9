"""The fused LM head + log-softmax against the plain autograd computation."""

import pytest
import torch

from prefalign.train import head
from prefalign.train.head import linear_token_logps


def plain(hidden, weight, targets):
    return (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)).log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])  # one row per chunk, uneven chunks, one chunk
def test_values_and_gradients_match_the_plain_path(monkeypatch, chunk_rows):
    monkeypatch.setattr(head, "_chunk_rows", lambda vocab, device: chunk_rows)
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    targets = torch.tensor([0, 3, 10, 3, 7, 1, 1])
    upstream = torch.randn(7, dtype=torch.float64)
    grads = []
    for fn in (plain, linear_token_logps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(h, w, targets)
        (out.double() * upstream).sum().backward()
        grads.append((out.detach().double(), h.grad, w.grad))
    for got, want in zip(grads[1], grads[0]):
        assert torch.allclose(got, want, atol=1e-6), (got, want)


def test_gradcheck():
    torch.manual_seed(1)
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([5, 0, 2, 2])
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, targets), (hidden, weight))


def test_no_graph_kept_without_gradients():
    hidden, weight = torch.randn(3, 4), torch.randn(9, 4)
    with torch.no_grad():
        out = linear_token_logps(hidden, weight, torch.tensor([1, 2, 3]))
    assert out.shape == (3,) and out.dtype == torch.float32 and out.grad_fn is None
    assert torch.all(out <= 0)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_returns_float32():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_token_logps(hidden, weight, targets)
    out.sum().backward()
    assert out.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.allclose(out, plain(hidden.detach(), weight.detach(), targets), atol=0.1)


def test_empty_selection():
    weight = torch.randn(9, 4, requires_grad=True)
    out = linear_token_logps(torch.zeros(0, 4), weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()  # a batch without response tokens still backpropagates (zero gradient)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
