"""Preference-optimisation losses of the DPO family.

Every loss here is a *pure function* of per-sequence **summed** log-probabilities
(``log pi(y | x) = sum_t log pi(y_t | x, y_<t)``) produced by the policy being
trained and by a frozen reference model.  Inputs are 1-D float tensors of shape
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

The :data:`LOSSES` registry maps a loss name to a :class:`LossSpec` that says
which response groups the trainer must score, which record fields a data set
must provide, which hyperparameters the loss takes (with defaults), and how to
call the loss from dictionaries of log-probs (:meth:`LossSpec.compute`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossSpec",
    "PUBLIC_LOSSES",
    "adpo_loss",
    "check_positive_reward_gap",
    "d2o_loss",
    "dpo_loss",
    "get_loss",
    "implicit_rewards",
    "ipo_loss",
    "odpo_loss",
    "rdpo_loss",
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
# registry
# --------------------------------------------------------------------------- #
Bind = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, float]], Tensor]


@dataclass(frozen=True)
class LossSpec:
    """How the trainer computes one loss from dictionaries of log-probs.

    Attributes:
        name: registry key.
        fn: the pure loss function above.
        responses: response groups the trainer scores with policy *and*
            reference; a subset of ``("chosen", "rejected", "anchors", "toxic")``.
        required_fields: record fields a data set must provide.
        defaults: hyperparameters and their default values (read-only).
        bind: ``(policy, reference, rewards, params) -> [B] loss``; ``policy``
            and ``reference`` map response group -> log-probs ([B], or [B, K]
            for ``"anchors"``), ``rewards`` maps ``"reward_chosen"`` /
            ``"reward_rejected"`` -> [B], ``params`` is the full set of
            hyperparameters.
        needs_toxic_reference: ADPO only: ``reference`` must also carry the key
            ``"toxic_ref"`` (toxic response scored by the reference model with
            ``[TOXIC]`` in the prompt).
        positive: response group logged as the "preferred" side (D2O:
            ``"anchors"``, to be averaged over K by the caller).
        negative: response group logged as the "dispreferred" side.
        needs_reference: False for losses that ignore the reference (SFT): the trainer then
            computes no reference log-probs at all.
        requires_positive_reward_gap: the data step drops (and counts) pairs whose
            ``reward_chosen - reward_rejected <= 0`` before training (ODPO's log of the gap).
        internal: used by prefalign itself (SFT of the toxic-control model), not offered to
            users: left out of the list that the unknown-loss error and ``--help`` show.
    """

    name: str
    fn: Callable[..., Tensor]
    responses: tuple[str, ...]
    required_fields: tuple[str, ...]
    defaults: Mapping[str, float]
    bind: Bind
    needs_toxic_reference: bool = False
    positive: str = "chosen"
    negative: str = "rejected"
    requires_positive_reward_gap: bool = False
    needs_reference: bool = True
    internal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def compute(
        self,
        policy: Mapping[str, Tensor],
        reference: Mapping[str, Tensor],
        rewards: Mapping[str, Tensor] | None = None,
        **params: float,
    ) -> Tensor:
        """Per-example loss [B]; ``params`` override :attr:`defaults`.

        Raises ``ValueError`` on a hyperparameter this loss does not take, or
        when a needed log-prob / reward entry is missing.
        """
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} got unknown parameter(s) {unknown}; "
                f"accepted: {sorted(self.defaults)}"
            )
        merged = {**self.defaults, **params}
        rewards = {} if rewards is None else rewards
        try:
            return self.bind(policy, reference, rewards, merged)
        except KeyError as exc:
            raise ValueError(
                f"loss {self.name!r} is missing input {exc.args[0]!r} "
                f"(policy has {sorted(policy)}, reference has {sorted(reference)}, "
                f"rewards has {sorted(rewards)})"
            ) from exc


def _pair(p: Mapping[str, Tensor], r: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return p["chosen"], p["rejected"], r["chosen"], r["rejected"]


_PAIR_FIELDS = ("prompt", "chosen", "rejected")
_REWARD_FIELDS = ("reward_chosen", "reward_rejected")

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            name="dpo",
            fn=dpo_loss,
            responses=("chosen", "rejected"),
            required_fields=_PAIR_FIELDS,
            defaults={"beta": 0.1},
            bind=lambda p, r, w, k: dpo_loss(*_pair(p, r), beta=k["beta"]),
        ),
        LossSpec(
            name="ipo",
            fn=ipo_loss,
            responses=("chosen", "rejected"),
            required_fields=_PAIR_FIELDS,
            defaults={"beta": 0.1},
            bind=lambda p, r, w, k: ipo_loss(*_pair(p, r), beta=k["beta"]),
        ),
        LossSpec(
            name="rdpo",
            fn=rdpo_loss,
            responses=("chosen", "rejected"),
            required_fields=_PAIR_FIELDS + _REWARD_FIELDS,
            defaults={"beta": 0.1, "tau": 1.0},
            bind=lambda p, r, w, k: rdpo_loss(
                *_pair(p, r),
                reward_chosen=w["reward_chosen"],
                reward_rejected=w["reward_rejected"],
                beta=k["beta"],
                tau=k["tau"],
            ),
        ),
        LossSpec(
            name="odpo",
            fn=odpo_loss,
            responses=("chosen", "rejected"),
            required_fields=_PAIR_FIELDS + _REWARD_FIELDS,
            defaults={"beta": 0.1, "alpha": 1.0},
            requires_positive_reward_gap=True,
            bind=lambda p, r, w, k: odpo_loss(
                *_pair(p, r),
                reward_chosen=w["reward_chosen"],
                reward_rejected=w["reward_rejected"],
                beta=k["beta"],
                alpha=k["alpha"],
            ),
        ),
        LossSpec(
            name="d2o",
            fn=d2o_loss,
            responses=("rejected", "anchors"),
            required_fields=("prompt", "rejected", "anchors"),
            defaults={"beta": 0.1, "alpha": 0.1},
            bind=lambda p, r, w, k: d2o_loss(
                p["rejected"], r["rejected"], p["anchors"], r["anchors"], beta=k["beta"], alpha=k["alpha"]
            ),
            positive="anchors",
        ),
        LossSpec(
            name="adpo",
            fn=adpo_loss,
            responses=("chosen", "rejected", "toxic"),
            required_fields=_PAIR_FIELDS + ("toxic",),
            defaults={"beta": 0.1, "gamma": 0.1},
            bind=lambda p, r, w, k: adpo_loss(
                *_pair(p, r), p["toxic"], r["toxic_ref"], beta=k["beta"], gamma=k["gamma"]
            ),
            needs_toxic_reference=True,
        ),
        LossSpec(
            name="sft",
            fn=sft_loss,
            responses=("chosen",),
            required_fields=("prompt", "chosen"),
            defaults={},
            bind=lambda p, r, w, k: sft_loss(p["chosen"]),
            negative="chosen",
            needs_reference=False,
            internal=True,
        ),
    )
}


#: The losses offered to users, in the README's order (``train --help`` lists the same).
PUBLIC_LOSSES: tuple[str, ...] = tuple(name for name, spec in LOSSES.items() if not spec.internal)


def unknown_loss_message(name: str) -> str:
    """The one wording of the unknown-loss error (``data check``, ``train``, configs, recipes)."""
    return f"unknown loss {name!r}; choose one of {', '.join(PUBLIC_LOSSES)}"


def get_loss(name: str) -> LossSpec:
    """Return the :class:`LossSpec` registered under ``name``.

    Raises ``ValueError`` (:func:`unknown_loss_message`) when ``name`` is unknown.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(unknown_loss_message(name)) from None
