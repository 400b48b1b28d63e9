"""Preference-optimisation losses of the DPO family.

Every loss here is a *pure function* of per-sequence **summed** log-probabilities
(``log pi(y | x) = sum_t log pi(y_t | x, y_<t)``) produced by the policy being
trained and (for most) by a frozen reference model, and, where a loss says so, of
response lengths in tokens (SimPO, RPO) or rewards.  Inputs are 1-D float tensors of shape
``[B]`` (one entry per example), or ``[B, K]`` for the K anchor responses of
D2O.  Every loss returns the **unreduced** per-example loss of shape ``[B]``;
the caller chooses how to reduce it (usually ``.mean()``).  None of these
functions holds or reads trainer state.

Notation used in the docstrings::

    h = (policy_chosen_logps - ref_chosen_logps)
        - (policy_rejected_logps - ref_rejected_logps)

is the difference between the chosen and the rejected log-ratio ("margin").
``sigma`` is the logistic sigmoid.  ``log sigma`` is always evaluated with
:func:`torch.nn.functional.logsigmoid`, which is finite and has finite
gradients for arbitrarily large margins of either sign.

The :data:`LOSSES` registry maps a loss name to a :class:`LossSpec`: the function,
the :class:`Input` s it reads from a typed :class:`LossInputs` (policy and
reference log-probs per response group, token counts, per-token log-probs,
rewards, ADPO's toxic reference) and its hyperparameters (with defaults). What
the trainer computes (which groups it scores, whether a reference exists at all)
and which record fields a data set must provide follow from those inputs. A new
loss is one function and one registry line; :func:`resolve_loss` mixes several
(``loss: [dpo, sft]``, ``loss_weights: [1.0, 0.5]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.data.records import RECORD_SCHEMA

__all__ = [
    "In",
    "Input",
    "LOSSES",
    "LossInputs",
    "LossSpec",
    "MixedLoss",
    "PUBLIC_LOSSES",
    "adpo_loss",
    "check_positive_reward_gap",
    "d2o_loss",
    "dpo_loss",
    "get_loss",
    "implicit_rewards",
    "ipo_loss",
    "loss_help",
    "odpo_loss",
    "rdpo_loss",
    "resolve_loss",
    "rpo_loss",
    "sft_loss",
    "simpo_loss",
    "unknown_loss_message",
]


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_1d(loss: str, **tensors: Tensor) -> None:
    """Every tensor must be 1-D and all must have the same length."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{loss}: {name} must be a 1-D tensor of shape [B] "
                f"(one summed log-prob or reward per example), got shape {tuple(t.shape)}"
            )
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"{loss}: all inputs must have the same batch size, got {desc}")


def _check_nonneg(loss: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{loss}: {name} must be a finite number >= 0, got {value!r}")


def _check_pos(loss: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{loss}: {name} must be a finite number > 0, got {value!r}")


def _margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """h = (pi_c - ref_c) - (pi_r - ref_r)."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _check_pair(loss, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    _check_1d(
        loss,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Direct Preference Optimization (sigmoid / Bradley-Terry) loss.

    Formula::

        loss = -log sigma(beta * h)
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", 2023,
    arXiv:2305.18290.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen (preferred)
            responses under the policy being trained.
        policy_rejected_logps: [B] summed log-probs of the rejected responses
            under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under
            the frozen reference model.
        ref_rejected_logps: [B] summed log-probs of the rejected responses
            under the reference model.
        beta: KL-regularisation strength (>= 0). ``beta -> 0`` gives
            ``log 2`` for every example.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("dpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_nonneg("dpo_loss", "beta", beta)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Identity Preference Optimization (IPO) loss.

    Formula::

        loss = (h - 1 / (2 * beta))^2
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    (The paper writes the regulariser as tau; ``beta`` plays that role here.)
    The loss is minimal (zero) at ``h = 1 / (2 * beta)``.

    Paper: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos, "A General
    Theoretical Paradigm to Understand Learning from Human Preferences", 2023,
    arXiv:2310.12036.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses
            under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected responses
            under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under
            the reference model.
        ref_rejected_logps: [B] summed log-probs of the rejected responses
            under the reference model.
        beta: regularisation strength; must be > 0 (``ValueError`` otherwise).

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("ipo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pos("ipo_loss", "beta", beta)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    beta: float = 0.1,
    tau: float = 1.0,
) -> Tensor:
    """Refined DPO (rDPO): DPO with a soft preference label from a reward model.

    Formula::

        p    = sigma((reward_chosen - reward_rejected) / tau)
        loss = -[ p * log sigma(beta * h) + (1 - p) * log sigma(-beta * h) ]
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    In rDPO the pairs are synthetic: the model critiques and revises its own
    answer, the revision is "chosen" and the original answer "rejected"; an
    external reward model scores both and ``p`` is the probability that the
    revision really is better.  With ``p = 1`` this is exactly DPO.

    Paper: Gallego, "Refined Direct Preference Optimization with Synthetic Data
    for Behavioral Alignment of LLMs", 2024, arXiv:2402.08005.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen (revised)
            responses under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected (original)
            responses under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under
            the reference model.
        ref_rejected_logps: [B] summed log-probs of the rejected responses
            under the reference model.
        reward_chosen: [B] external reward-model score of the chosen response.
        reward_rejected: [B] external reward-model score of the rejected
            response.  Rewards act as labels; pass tensors that do not require
            grad (or detach them) unless you intend to differentiate through
            the reward model.
        beta: KL-regularisation strength (>= 0).
        tau: temperature (> 0) turning the reward gap into a probability;
            larger ``tau`` gives softer labels.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("rdpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_1d("rdpo_loss", policy_chosen_logps=policy_chosen_logps,
              reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    _check_nonneg("rdpo_loss", "beta", beta)
    _check_pos("rdpo_loss", "tau", tau)
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    p = torch.sigmoid((reward_chosen - reward_rejected) / tau).to(z.dtype)
    return -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z))


def check_positive_reward_gap(reward_chosen: Tensor, reward_rejected: Tensor) -> None:
    """Raise ``ValueError`` unless ``reward_chosen - reward_rejected > 0`` in every row.

    ODPO takes the logarithm of the reward gap, so a zero, negative or NaN gap
    is an error in the data (the pair is mislabelled or tied).  The message
    names the offending row indices (and their gaps) so the records can be
    found and fixed.

    Args:
        reward_chosen: [B] reward of the chosen response.
        reward_rejected: [B] reward of the rejected response.
    """
    _check_1d("check_positive_reward_gap", reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    gap = (reward_chosen - reward_rejected).detach()
    bad = torch.nonzero(~(gap > 0), as_tuple=False).flatten().tolist()
    if bad:
        shown = bad[:20]
        gaps = [float(gap[i]) for i in shown]
        more = f" ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise ValueError(
            "odpo requires reward_chosen - reward_rejected > 0 in every row; "
            f"non-positive gap in row(s) {shown}{more} (gaps {gaps})"
        )


def odpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> Tensor:
    """DPO with an Offset (ODPO).

    Formula::

        loss = -log sigma(beta * h - alpha * log(reward_chosen - reward_rejected))
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    The offset demands a larger margin for pairs whose rewards differ more.
    With ``alpha = 0`` this is exactly DPO.  Every reward gap must be > 0;
    otherwise :func:`check_positive_reward_gap` raises ``ValueError`` naming
    the bad rows.

    Paper: Amini, Vieira, Cotterell, "Direct Preference Optimization with an
    Offset", 2024, arXiv:2402.10571.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses
            under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected responses
            under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under
            the reference model.
        ref_rejected_logps: [B] summed log-probs of the rejected responses
            under the reference model.
        reward_chosen: [B] reward (score) of the chosen response.
        reward_rejected: [B] reward of the rejected response; must be strictly
            smaller than ``reward_chosen`` in every row.
        beta: KL-regularisation strength (>= 0).
        alpha: scale (>= 0) of the offset ``log(reward gap)``.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("odpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_1d("odpo_loss", policy_chosen_logps=policy_chosen_logps,
              reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    _check_nonneg("odpo_loss", "beta", beta)
    _check_nonneg("odpo_loss", "alpha", alpha)
    check_positive_reward_gap(reward_chosen, reward_rejected)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    offset = alpha * torch.log(reward_chosen - reward_rejected).to(h.dtype)
    return -F.logsigmoid(beta * h - offset)


def d2o_loss(
    policy_rejected_logps: Tensor,
    ref_rejected_logps: Tensor,
    policy_anchor_logps: Tensor,
    ref_anchor_logps: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> Tensor:
    """Distributional Dispreference Optimization (D2O).

    Formula::

        loss = -log sigma( (beta / K) * sum_k (pi_anchor_k - ref_anchor_k)
                           - alpha * (pi_rejected - ref_rejected) )

    D2O needs only a negative (human-dispreferred) response per prompt; the
    K "anchor" responses are self-generated samples standing in for the
    positive side.  With ``K = 1`` and ``alpha = beta`` this is DPO with the
    anchor as the chosen response.

    Paper: Duan, Yi, Zhang, Lu, Xie, Gu, "Negating Negatives: Alignment with
    Human Negative Samples via Distributional Dispreference Optimization",
    2024, arXiv:2403.03419.

    Args:
        policy_rejected_logps: [B] summed log-probs of the negative
            (dispreferred) response under the policy.
        ref_rejected_logps: [B] summed log-probs of the negative response
            under the reference model.
        policy_anchor_logps: [B, K] summed log-probs of the K anchor
            responses of each example under the policy (K >= 1).
        ref_anchor_logps: [B, K] summed log-probs of the anchors under the
            reference model.
        beta: weight (>= 0) of the anchor (positive) term.
        alpha: weight (>= 0) of the negative term.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_1d("d2o_loss", policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    for name, t in (("policy_anchor_logps", policy_anchor_logps), ("ref_anchor_logps", ref_anchor_logps)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"d2o_loss: {name} must be a 2-D tensor of shape [B, K], got {shape}")
    if policy_anchor_logps.shape != ref_anchor_logps.shape:
        raise ValueError(
            "d2o_loss: policy_anchor_logps and ref_anchor_logps must have the same shape [B, K], "
            f"got {tuple(policy_anchor_logps.shape)} and {tuple(ref_anchor_logps.shape)}"
        )
    b, k = policy_anchor_logps.shape
    if k < 1:
        raise ValueError("d2o_loss: need at least one anchor per example (K >= 1), got K = 0")
    if b != policy_rejected_logps.shape[0]:
        raise ValueError(
            f"d2o_loss: anchors have batch size {b} but rejected log-probs have batch size "
            f"{policy_rejected_logps.shape[0]}"
        )
    _check_nonneg("d2o_loss", "beta", beta)
    _check_nonneg("d2o_loss", "alpha", alpha)
    anchor = (policy_anchor_logps - ref_anchor_logps).mean(dim=-1)  # (1/K) * sum_k
    negative = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta * anchor - alpha * negative)


def adpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    policy_toxic_logps: Tensor,
    toxic_ref_logps: Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.1,
) -> Tensor:
    """Adversarial DPO (ADPO).

    Formula::

        loss = -log sigma(beta * h - gamma * (pi_toxic - toxic_ref))
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    The toxic response is generated by the "inner toxic model": the reference
    model prompted with the ``[TOXIC]`` control token.  ``toxic_ref_logps``
    are that inner toxic model's log-probs of the toxic response, i.e. the
    reference model scoring it *with* ``[TOXIC]`` in the prompt, whereas
    ``policy_toxic_logps`` are the policy's log-probs of it under the normal
    prompt.  With ``gamma = 0`` this is exactly DPO.

    Paper: San Kim, Gary Geunbae Lee, "Adversarial DPO: Harnessing Harmful
    Data for Reducing Toxicity with Minimal Impact on Coherence and
    Evasiveness in Dialogue Agents", Findings of NAACL 2024,
    arXiv:2405.12900.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses
            under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected responses
            under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under
            the reference model.
        ref_rejected_logps: [B] summed log-probs of the rejected responses
            under the reference model.
        policy_toxic_logps: [B] summed log-probs of the toxic response under
            the policy (normal prompt).
        toxic_ref_logps: [B] summed log-probs of the toxic response under the
            reference model with ``[TOXIC]`` in the prompt.
        beta: KL-regularisation strength (>= 0) of the DPO term.
        gamma: weight (>= 0) of the toxic (adversarial) term.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("adpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_1d("adpo_loss", policy_chosen_logps=policy_chosen_logps,
              policy_toxic_logps=policy_toxic_logps, toxic_ref_logps=toxic_ref_logps)
    _check_nonneg("adpo_loss", "beta", beta)
    _check_nonneg("adpo_loss", "gamma", gamma)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h - gamma * (policy_toxic_logps - toxic_ref_logps))


def sft_loss(policy_logps: Tensor, num_tokens: Tensor | None = None) -> Tensor:
    """Supervised fine-tuning: negative log-likelihood of the target response.

    Formula::

        loss = -pi_target                 (summed over response tokens)
        loss = -pi_target / num_tokens    (when ``num_tokens`` is given: per-token mean)

    Not a preference loss: prefalign uses it where a method needs plain SFT, e.g. ADPO's
    toxic-control model (Kim & Lee 2024, arXiv:2405.12900), which learns to produce unsafe text
    when the ``[TOXIC]`` control token is in the prompt.

    Args:
        policy_logps: [B] summed log-probs of the target responses under the policy.
        num_tokens: optional [B] response lengths in tokens.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_1d("sft", policy_logps=policy_logps)
    if num_tokens is None:
        return -policy_logps
    return -policy_logps / num_tokens.clamp(min=1)


def anchor_sft_loss(policy_anchor_logps: Tensor) -> Tensor:
    """Negative log-likelihood of D2O's anchors, averaged over the K anchors of a prompt.

    Formula::

        loss = -(1 / K) * sum_k pi_anchor_k      (summed over each anchor's tokens)

    The positive side of D2O is a distribution of self-sampled responses (the anchors), not one
    chosen answer, so the NLL term that RPO adds to DPO (Pang et al. 2024, arXiv:2404.19733) is
    taken over that distribution: mixed with ``d2o`` (``loss: [d2o, anchor-sft]``) it makes the
    anchors' behaviour likely, not just preferred to the negative. D2O itself: Duan et al. 2024,
    arXiv:2403.03419.

    Args:
        policy_anchor_logps: [B, K] summed log-probs of the K anchors of each example.

    Returns:
        [B] per-example loss (unreduced).
    """
    if policy_anchor_logps.dim() != 2 or policy_anchor_logps.shape[1] < 1:
        raise ValueError(f"anchor-sft: policy_anchor_logps must be [B, K] with K >= 1, got {tuple(policy_anchor_logps.shape)}")
    return -policy_anchor_logps.mean(dim=1)


def _check_counts(loss: str, **counts: Tensor) -> None:
    for name, t in counts.items():
        if bool((t.detach() <= 0).any()):
            raise ValueError(f"{loss}: {name} must be > 0 in every row (a response has at least one token)")


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> Tensor:
    """Simple Preference Optimization (SimPO): length-normalised and reference-free.

    Formula::

        loss = -log sigma( beta / |y_w| * pi_chosen - beta / |y_l| * pi_rejected - gamma )

    ``pi`` is the summed log-prob of a response under the policy and ``|y|`` its length in tokens,
    so ``pi / |y|`` is the average per-token log-prob: the implicit reward the policy uses when it
    generates, with no reference model at all.  ``gamma`` is a target reward margin.  The paper's
    defaults are ``beta = 2.0`` and ``gamma / beta = 0.5`` (so ``gamma = 1.0``).

    Paper: Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    2024, arXiv:2405.14734.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected responses under the policy.
        chosen_num_tokens: [B] lengths of the chosen responses in tokens (> 0), the tokens summed
            in ``policy_chosen_logps``.
        rejected_num_tokens: [B] lengths of the rejected responses in tokens (> 0).
        beta: reward scale (>= 0).
        gamma: target reward margin (>= 0).

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_1d("simpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
              chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens)
    _check_counts("simpo_loss", chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens)
    _check_nonneg("simpo_loss", "beta", beta)
    _check_nonneg("simpo_loss", "gamma", gamma)
    chosen = policy_chosen_logps / chosen_num_tokens.to(policy_chosen_logps.dtype)
    rejected = policy_rejected_logps / rejected_num_tokens.to(policy_rejected_logps.dtype)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_num_tokens: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> Tensor:
    """DPO plus a length-normalised NLL term on the chosen response (RPO, "DPO+NLL").

    Formula::

        loss = -log sigma(beta * h)  +  alpha * ( -pi_chosen / |y_w| )
        h    = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)

    The NLL term keeps the chosen response's likelihood from falling while DPO widens the margin
    (plain DPO often lowers both).  The paper writes ``NLL + alpha' * DPO`` with ``alpha' = 1`` and
    normalises the NLL by the length of the whole sequence (prompt, chain of thought and answer);
    here, as in TRL's ``rpo_alpha``, ``alpha`` weights the NLL, normalised by the response length
    ``|y_w|`` in tokens: with ``alpha = 1`` the two weightings agree.  ``alpha = 0`` is DPO.

    Paper: Pang, Yuan, Cho, He, Sukhbaatar, Weston, "Iterative Reasoning Preference
    Optimization", 2024, arXiv:2404.19733 (beta = 0.1, alpha = 1).

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: [B] summed log-probs of the rejected responses under the policy.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under the reference.
        ref_rejected_logps: [B] summed log-probs of the rejected responses under the reference.
        chosen_num_tokens: [B] lengths of the chosen responses in tokens (> 0).
        beta: KL-regularisation strength (>= 0) of the DPO term.
        alpha: weight (>= 0) of the NLL term.

    Returns:
        [B] per-example loss (unreduced).
    """
    _check_pair("rpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_1d("rpo_loss", policy_chosen_logps=policy_chosen_logps, chosen_num_tokens=chosen_num_tokens)
    _check_counts("rpo_loss", chosen_num_tokens=chosen_num_tokens)
    _check_nonneg("rpo_loss", "beta", beta)
    _check_nonneg("rpo_loss", "alpha", alpha)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    nll = -policy_chosen_logps / chosen_num_tokens.to(policy_chosen_logps.dtype)
    return -F.logsigmoid(beta * h) + alpha * nll


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit DPO reward ``beta * (policy_logps - ref_logps)``, for logging.

    Args:
        policy_logps: [B] (or [B, K]) summed log-probs under the policy.
        ref_logps: same shape, summed log-probs under the reference model.
        beta: scale of the reward.

    Returns:
        [B]; for 2-D inputs (e.g. D2O anchors) the mean over the last dim.
        Not detached: wrap the call in ``torch.no_grad()`` or ``.detach()``
        the result when logging.
    """
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"implicit_rewards: shapes differ: {tuple(policy_logps.shape)} vs {tuple(ref_logps.shape)}"
        )
    r = beta * (policy_logps - ref_logps)
    return r.mean(dim=-1) if r.dim() == 2 else r


# --------------------------------------------------------------------------- #
# typed inputs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read, filled by the trainer with exactly what the loss's
    :class:`LossSpec` declares (a reference-free loss gets no reference values: none is computed).

    Shapes: ``[B]`` per example, ``[B, K]`` for the K anchors of D2O; per-token values add a last
    dimension ``T`` (the longest response of the group in the batch).

    Attributes:
        policy: response group -> summed log-probs under the policy being trained.
        reference: response group -> summed log-probs under the frozen reference model.
        toxic_reference: ADPO: the toxic response's summed log-probs under the reference model
            with the ``[TOXIC]`` control token in the prompt (the inner toxic model).
        rewards: ``reward_chosen`` / ``reward_rejected`` -> external rewards (float64).
        num_tokens: response group -> response lengths in tokens (the tokens summed in ``policy``).
        token_logps: response group -> per-token log-probs under the policy, 0 past each
            response's end (only for losses that ask for them).
        token_mask: response group -> ``True`` on each response's real tokens.
    """

    policy: Mapping[str, Tensor]
    reference: Mapping[str, Tensor] = field(default_factory=dict)
    toxic_reference: Tensor | None = None
    rewards: Mapping[str, Tensor] = field(default_factory=dict)
    num_tokens: Mapping[str, Tensor] = field(default_factory=dict)
    token_logps: Mapping[str, Tensor] = field(default_factory=dict)
    token_mask: Mapping[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_dicts(
        cls,
        policy: Mapping[str, Tensor],
        reference: Mapping[str, Tensor] | None = None,
        rewards: Mapping[str, Tensor] | None = None,
        num_tokens: Mapping[str, Tensor] | None = None,
    ) -> "LossInputs":
        """From plain dictionaries; a ``"toxic_ref"`` entry of ``reference`` is the toxic reference."""
        reference = dict(reference or {})
        toxic = reference.pop("toxic_ref", None)
        return cls(policy=dict(policy), reference=reference, toxic_reference=toxic, rewards=dict(rewards or {}),
                   num_tokens=dict(num_tokens or {}))

    def describe(self) -> str:
        parts = [f"policy {sorted(self.policy)}", f"reference {sorted(self.reference)}",
                 f"rewards {sorted(self.rewards)}", f"num_tokens {sorted(self.num_tokens)}"]
        if self.token_logps:
            parts.append(f"token_logps {sorted(self.token_logps)}")
        if self.toxic_reference is not None:
            parts.append("toxic_ref")
        return ", ".join(parts)


InputKind = Literal["policy", "reference", "toxic_reference", "reward", "num_tokens", "token_logps", "token_mask"]


@dataclass(frozen=True)
class Input:
    """One tensor a loss function takes, and where :class:`LossInputs` holds it. A registry entry
    lists these for its function's arguments; what the trainer computes follows from them."""

    kind: InputKind
    group: str  # the response group ("chosen", "anchors", ...), or the reward's side

    def __post_init__(self) -> None:
        # Groups are the record schema's (data/records.py): a typo here would otherwise surface
        # only as a missing input at the first training step.
        group = RECORD_SCHEMA.group(self.group)
        if self.kind == "reward" and group.reward is None:
            raise ValueError(f"response group {self.group!r} has no reward field in the record schema")

    @property
    def label(self) -> str:
        if self.kind == "toxic_reference":
            return "toxic_ref"
        if self.kind == "reward":
            return RECORD_SCHEMA.reward_field(self.group)
        return f"{self.kind}[{self.group}]"

    def read(self, inputs: LossInputs) -> Tensor:
        if self.kind == "toxic_reference":
            value = inputs.toxic_reference
        elif self.kind == "reward":
            value = inputs.rewards.get(RECORD_SCHEMA.reward_field(self.group))
        else:
            value = getattr(inputs, self.kind).get(self.group)
        if value is None:
            raise KeyError(self.label)
        return value


class In:
    """Shorthands for the inputs a registry entry names."""

    @staticmethod
    def policy(group: str) -> Input:
        return Input("policy", group)

    @staticmethod
    def ref(group: str) -> Input:
        return Input("reference", group)

    @staticmethod
    def tokens(group: str) -> Input:
        return Input("num_tokens", group)

    @staticmethod
    def token_logps(group: str) -> Input:
        return Input("token_logps", group)

    @staticmethod
    def token_mask(group: str) -> Input:
        return Input("token_mask", group)

    @staticmethod
    def reward(side: str) -> Input:
        return Input("reward", side)

    toxic_ref = Input("toxic_reference", "toxic")


class _Needs:
    """What a loss needs the trainer to compute, derived from the :class:`Input` s it reads."""

    inputs: tuple[Input, ...]

    def _groups(self, *kinds: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.group for i in self.inputs if i.kind in kinds))

    @property
    def responses(self) -> tuple[str, ...]:
        """Response groups to tokenise and score with the policy (the order of the inputs)."""
        return self._groups("policy", "reference", "toxic_reference", "num_tokens", "token_logps", "token_mask")

    @property
    def reference_groups(self) -> tuple[str, ...]:
        """Response groups the reference model scores (none: no reference is computed for them)."""
        return self._groups("reference")

    @property
    def needs_toxic_reference(self) -> bool:
        return any(i.kind == "toxic_reference" for i in self.inputs)

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_groups) or self.needs_toxic_reference

    @property
    def reward_fields(self) -> tuple[str, ...]:
        return tuple(RECORD_SCHEMA.reward_field(side) for side in self._groups("reward"))

    @property
    def token_count_groups(self) -> tuple[str, ...]:
        return self._groups("num_tokens")

    @property
    def token_logp_groups(self) -> tuple[str, ...]:
        return self._groups("token_logps", "token_mask")

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Record fields a data set must provide."""
        return RECORD_SCHEMA.required_fields(self)

    def compute(
        self,
        policy: Mapping[str, Tensor] | LossInputs,
        reference: Mapping[str, Tensor] | None = None,
        rewards: Mapping[str, Tensor] | None = None,
        **params: float,
    ) -> Tensor:
        """The loss from a :class:`LossInputs`, or from dictionaries (see :meth:`LossInputs.from_dicts`)."""
        inputs = policy if isinstance(policy, LossInputs) else LossInputs.from_dicts(policy, reference, rewards)
        return self(inputs, **params)  # type: ignore[operator]


@dataclass(frozen=True)
class LossSpec(_Needs):
    """A registry entry: a pure loss function and the inputs it reads.

    Attributes:
        name: registry key.
        fn: the pure loss function above.
        args: its tensor arguments, in order (``In.policy("chosen")``, ``In.ref("chosen")``, ...).
        kwargs: its keyword tensor arguments (``reward_chosen=In.reward("chosen")``).
        defaults: hyperparameters and their default values (read-only).
        positive: response group logged as the "preferred" side (D2O: ``"anchors"``, averaged
            over K).
        negative: response group logged as the "dispreferred" side.
        requires_positive_reward_gap: the data step drops (and counts) pairs whose
            ``reward_chosen - reward_rejected <= 0`` before training (ODPO's log of the gap).
        internal: used by prefalign itself (SFT of the toxic-control model, a term of a mixture),
            not offered in the list that the unknown-loss error and ``--help`` show.

    Derived from the inputs (:class:`_Needs`): ``responses`` (groups tokenised and scored by the
    policy), ``reference_groups``, ``needs_reference``, ``needs_toxic_reference``,
    ``reward_fields``, ``token_count_groups``, ``token_logp_groups`` and ``required_fields``.
    """

    name: str
    fn: Callable[..., Tensor]
    args: tuple[Input, ...]
    kwargs: Mapping[str, Input] = field(default_factory=dict)
    defaults: Mapping[str, float] = field(default_factory=dict)
    positive: str = "chosen"
    negative: str = "rejected"
    requires_positive_reward_gap: bool = False
    internal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    @property
    def inputs(self) -> tuple[Input, ...]:  # type: ignore[override]
        return (*self.args, *self.kwargs.values())

    @property
    def components(self) -> tuple[tuple["LossSpec", float], ...]:
        return ((self, 1.0),)

    def check_params(self, params: Mapping[str, float]) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"loss {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(self.defaults)}")

    def __call__(self, inputs: LossInputs, **params: float) -> Tensor:
        """Per-example loss [B]; ``params`` override :attr:`defaults`.

        Raises ``ValueError`` on a hyperparameter this loss does not take, or when ``inputs``
        lacks a value the loss reads.
        """
        self.check_params(params)
        try:
            args = [i.read(inputs) for i in self.args]
            kwargs = {k: i.read(inputs) for k, i in self.kwargs.items()}
        except KeyError as exc:
            raise ValueError(f"loss {self.name!r} is missing input {exc.args[0]!r} (it reads "
                             f"{[i.label for i in self.inputs]}; given {inputs.describe()})") from None
        return self.fn(*args, **kwargs, **{**self.defaults, **params})

    def terms(self, inputs: LossInputs, **params: float) -> dict[str, Tensor]:
        return {self.name: self(inputs, **params)}


@dataclass(frozen=True)
class MixedLoss(_Needs):
    """A weighted sum of registered losses, per example: ``sum_i w_i * loss_i`` (TRL's
    ``loss_type=[...]`` with ``loss_weights``), e.g. ``dpo`` + 0.5 ``sft``.

    It needs the union of its terms' inputs (and the records the union of their fields). A
    hyperparameter given applies to every term that takes it; each term keeps its own default
    otherwise (``defaults`` lists the accepted names, with the first term's default where two
    differ).
    """

    components: tuple[tuple[LossSpec, float], ...]

    @property
    def name(self) -> str:
        return "+".join(spec.name for spec, _ in self.components)

    @property
    def inputs(self) -> tuple[Input, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(i for spec, _ in self.components for i in spec.inputs))

    @property
    def defaults(self) -> Mapping[str, float]:
        merged: dict[str, float] = {}
        for spec, _ in self.components:
            for k, v in spec.defaults.items():
                merged.setdefault(k, v)
        return MappingProxyType(merged)

    @property
    def _logged(self) -> LossSpec:
        return next((s for s, _ in self.components if s.positive != s.negative), self.components[0][0])

    @property
    def positive(self) -> str:
        return self._logged.positive

    @property
    def negative(self) -> str:
        return self._logged.negative

    @property
    def requires_positive_reward_gap(self) -> bool:
        return any(spec.requires_positive_reward_gap for spec, _ in self.components)

    internal = False

    def check_params(self, params: Mapping[str, float]) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"loss {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(self.defaults)}")

    def terms(self, inputs: LossInputs, **params: float) -> dict[str, Tensor]:
        """Each term's unweighted per-example loss."""
        self.check_params(params)
        return {spec.name: spec(inputs, **{k: v for k, v in params.items() if k in spec.defaults})
                for spec, _ in self.components}

    def __call__(self, inputs: LossInputs, **params: float) -> Tensor:
        terms = self.terms(inputs, **params)
        return sum(weight * terms[spec.name] for spec, weight in self.components)  # type: ignore[return-value]


AnyLoss = Union[LossSpec, MixedLoss]

_PAIR = (In.policy("chosen"), In.policy("rejected"), In.ref("chosen"), In.ref("rejected"))
_REWARDS = {"reward_chosen": In.reward("chosen"), "reward_rejected": In.reward("rejected")}

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", dpo_loss, _PAIR, defaults={"beta": 0.1}),
        LossSpec("ipo", ipo_loss, _PAIR, defaults={"beta": 0.1}),
        LossSpec("rdpo", rdpo_loss, _PAIR, _REWARDS, defaults={"beta": 0.1, "tau": 1.0}),
        LossSpec("odpo", odpo_loss, _PAIR, _REWARDS, defaults={"beta": 0.1, "alpha": 1.0},
                 requires_positive_reward_gap=True),
        LossSpec("d2o", d2o_loss, (In.policy("rejected"), In.ref("rejected"), In.policy("anchors"), In.ref("anchors")),
                 defaults={"beta": 0.1, "alpha": 0.1}, positive="anchors"),
        LossSpec("adpo", adpo_loss, (*_PAIR, In.policy("toxic"), In.toxic_ref), defaults={"beta": 0.1, "gamma": 0.1}),
        LossSpec("simpo", simpo_loss, (In.policy("chosen"), In.policy("rejected"), In.tokens("chosen"), In.tokens("rejected")),
                 defaults={"beta": 2.0, "gamma": 1.0}),
        LossSpec("rpo", rpo_loss, (*_PAIR, In.tokens("chosen")), defaults={"beta": 0.1, "alpha": 1.0}),
        LossSpec("sft", sft_loss, (In.policy("chosen"),), negative="chosen", internal=True),
        LossSpec("anchor-sft", anchor_sft_loss, (In.policy("anchors"),), positive="anchors", negative="anchors",
                 internal=True),
    )
}


#: The losses offered to users, in the README's order (``train --help`` lists the same).
PUBLIC_LOSSES: tuple[str, ...] = tuple(name for name, spec in LOSSES.items() if not spec.internal)


def unknown_loss_message(name: str) -> str:
    """The one wording of the unknown-loss error (``data check``, ``train``, configs, recipes)."""
    return f"unknown loss {name!r}; choose one of {', '.join(PUBLIC_LOSSES)}"


def loss_help() -> str:
    """The loss list of ``--help``, from the registry: ``dpo, ipo, ... or rpo``."""
    from prefalign.configfile import one_of

    return one_of(PUBLIC_LOSSES)


def get_loss(name: str) -> LossSpec:
    """Return the :class:`LossSpec` registered under ``name``.

    Raises ``ValueError`` (:func:`unknown_loss_message`) when ``name`` is unknown.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(unknown_loss_message(name)) from None


def loss_names(loss: str | Sequence[str]) -> list[str]:
    """``"dpo"``, ``"dpo,sft"`` or ``["dpo", "sft"]`` -> the list of names."""
    names = [n.strip() for n in loss.split(",")] if isinstance(loss, str) else [str(n).strip() for n in loss]
    return names


def resolve_loss(loss: str | Sequence[str], weights: Sequence[float] | None = None) -> AnyLoss:
    """The loss a config names: one registry entry, or a :class:`MixedLoss` of several
    (``loss: [dpo, sft]``, ``loss_weights: [1.0, 0.5]``; weights default to 1).

    Raises ``ValueError`` for an unknown or repeated name, an empty list, or weights that do not
    match the names, are negative or non-finite, or sum to zero.
    """
    names = loss_names(loss)
    if not names or any(not n for n in names):
        raise ValueError(f"give a loss name, or a list of them to mix; got {loss!r}")
    specs = [get_loss(n) for n in names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"loss {repeated[0]!r} is listed twice; give each term once (with its weight)")
    if weights is None:
        if len(specs) == 1:
            return specs[0]
        weights = [1.0] * len(specs)
    weights = [float(w) for w in weights]
    if len(weights) != len(specs):
        raise ValueError(f"loss_weights: {len(weights)} weight(s) for {len(specs)} loss(es) {names}: give one weight per loss")
    for name, w in zip(names, weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"loss_weights: the weight of {name!r} must be a finite number >= 0, got {w!r}")
    if sum(weights) <= 0:
        raise ValueError("loss_weights: at least one weight must be > 0")
    return MixedLoss(tuple(zip(specs, weights)))
