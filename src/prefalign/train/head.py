"""Log-probs of given tokens straight from hidden states: the LM head, the log-softmax and the pick
of each target's entry in one chunked pass, with a hand-written backward.

The plain path (``lm_head`` → ``[M, V]`` logits → ``logsumexp`` → ``gather``, then autograd) makes
about ten element-wise passes over ``[M, V]`` tensors (V ≈ 50k) and allocates several of them
whole; on a CPU those passes cost a good part of what the head's matmuls do. Here each chunk of
rows makes its logits, turns them into probabilities in place (max, subtract, exp, sum, divide:
no second buffer) and keeps them for the backward, where the gradient ``g · (onehot − p)`` is
formed chunk by chunk and fed to two matmuls. Same values and gradients as the plain path
(tests/train/test_head.py); ``benchmarks/profile_step.py`` shows where a step's time goes.
"""

from __future__ import annotations

import torch

# Logits per chunk: small on a CPU (cache-friendly, no huge allocations); on an accelerator large
# enough that the chunks' kernels stay big.
CHUNK_BYTES = {"cpu": 16 * 2**20}
ACCELERATOR_CHUNK_BYTES = 512 * 2**20


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, ACCELERATOR_CHUNK_BYTES) // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # The matmuls run in the autocast dtype when autocast is on (as nn.Linear would), else in the
    # hidden states' dtype; log-softmax and probabilities in float32 or wider.
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunked_logps(hidden, weight, targets, keep_probs: bool):
    """Per-token log-probs, and (``keep_probs``) each chunk's softmax for the backward."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    rows = _chunk_rows(weight.shape[0], weight.device)
    out = torch.empty(hidden.shape[0], dtype=wide, device=hidden.device)
    probs = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        logits = (h @ weight.t()).to(wide)
        picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)
        # logsumexp in place, one buffer: shift by the row max, exponentiate, sum.
        top = logits.amax(dim=1, keepdim=True)
        total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
        out[start : start + rows] = picked - (top + total.log()).squeeze(1)
        if keep_probs:
            probs.append(logits.div_(total))  # the softmax, for the backward
    return out, probs


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (hidden.dtype, weight.dtype)
        dtype = _compute_dtype(hidden)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        out, ctx.probs = _chunked_logps(hidden, weight, targets, keep_probs=True)
        ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        probs = ctx.probs
        rows = _chunk_rows(weight.shape[0], weight.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for i, start in enumerate(range(0, hidden.shape[0], rows)):
            h, t, g = hidden[start : start + rows], targets[start : start + rows], grad_out[start : start + rows].to(probs[i].dtype)
            # d logp_t / d logits = onehot(t) - softmax, scaled by the incoming gradient. Not in
            # place: the probabilities must survive for a second backward (retain_graph).
            dlogits = probs[i] * -g.unsqueeze(1)
            dlogits[torch.arange(len(t), device=t.device), t] += g
            dlogits = dlogits.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[start : start + rows])
            if ctx.needs_input_grad[1]:
                grad_weight = dlogits.t() @ h if grad_weight is None else grad_weight.addmm_(dlogits.t(), h)
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` for every row ``i``, in float32 (float64
    for float64 inputs).

    ``hidden``: ``[M, H]``, ``weight``: the LM head's ``[V, H]`` (no bias), ``targets``: ``[M]``.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32)) + 0 * weight.sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearTokenLogps.apply(hidden, weight, targets)
    dtype = _compute_dtype(hidden)  # scoring only: nothing kept for a backward
    return _chunked_logps(hidden.to(dtype), weight.to(dtype), targets, keep_probs=False)[0]
