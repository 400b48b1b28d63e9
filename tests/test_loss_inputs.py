"""Typed loss inputs, what each registry entry needs, and the three losses added on top of them
(SimPO, RPO, loss mixing), each checked against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefalign.losses import (LOSSES, In, Input, LossInputs, LossSpec, MixedLoss, dpo_loss, get_loss, resolve_loss,
                              rpo_loss, simpo_loss)

D = torch.float64
rng = np.random.default_rng(0)
B = 5
PC, PR, RC, RR = (rng.normal(-20, 6, B) for _ in range(4))
NC, NR = rng.integers(1, 30, B).astype(float), rng.integers(1, 30, B).astype(float)


def T(x):
    return torch.tensor(x, dtype=D)


def np_neg_log_sigmoid(z):
    """-log sigma(z) = log(1 + exp(-z)), written out in numpy (stable for both signs)."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, np.log1p(np.exp(-np.abs(z))), -z + np.log1p(np.exp(-np.abs(z))))


def inputs(**extra) -> LossInputs:
    return LossInputs(policy={"chosen": T(PC), "rejected": T(PR)}, reference={"chosen": T(RC), "rejected": T(RR)},
                      num_tokens={"chosen": T(NC), "rejected": T(NR)}, **extra)


# ------------------------------------------------------------------------------------- SimPO


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 1.4), (0.5, 0.0)])
def test_simpo_matches_numpy(beta, gamma):
    expected = np_neg_log_sigmoid(beta * PC / NC - beta * PR / NR - gamma)
    got = simpo_loss(T(PC), T(PR), T(NC), T(NR), beta=beta, gamma=gamma)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(get_loss("simpo")(inputs(), beta=beta, gamma=gamma).numpy(), expected, rtol=1e-12)


def test_simpo_is_length_normalised_and_reference_free():
    spec = get_loss("simpo")
    assert not spec.needs_reference and spec.reference_groups == () and spec.token_count_groups == ("chosen", "rejected")
    # Twice the tokens with twice the summed log-prob: the same average, the same loss.
    a = simpo_loss(T(PC), T(PR), T(NC), T(NR))
    b = simpo_loss(T(2 * PC), T(PR), T(2 * NC), T(NR))
    torch.testing.assert_close(a, b)
    # No reference in the inputs at all: fine.
    spec(LossInputs(policy={"chosen": T(PC), "rejected": T(PR)}, num_tokens={"chosen": T(NC), "rejected": T(NR)}))
    with pytest.raises(ValueError, match=r"missing input 'num_tokens\[chosen\]'"):
        spec(LossInputs(policy={"chosen": T(PC), "rejected": T(PR)}))
    with pytest.raises(ValueError, match="chosen_num_tokens must be > 0"):
        simpo_loss(T(PC), T(PR), T(0 * NC), T(NR))
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        simpo_loss(T(PC), T(PR), T(NC), T(NR), gamma=-1.0)


def test_simpo_gradient_raises_chosen_average():
    pc = T(PC).requires_grad_()
    simpo_loss(pc, T(PR), T(NC), T(NR)).sum().backward()
    assert (pc.grad < 0).all()  # descending raises the chosen log-prob ...
    # ... by beta/|y_w| * sigma(-z) per example
    z = 2.0 * PC / NC - 2.0 * PR / NR - 1.0
    np.testing.assert_allclose(pc.grad.numpy(), -(2.0 / NC) / (1 + np.exp(z)), rtol=1e-10)


# --------------------------------------------------------------------------------------- RPO


@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.5, 0.3)])
def test_rpo_matches_numpy(beta, alpha):
    h = (PC - RC) - (PR - RR)
    expected = np_neg_log_sigmoid(beta * h) + alpha * (-PC / NC)
    got = rpo_loss(T(PC), T(PR), T(RC), T(RR), T(NC), beta=beta, alpha=alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(get_loss("rpo")(inputs(), beta=beta, alpha=alpha).numpy(), expected, rtol=1e-12)


def test_rpo_alpha_zero_is_dpo_and_reads_chosen_length_only():
    torch.testing.assert_close(rpo_loss(T(PC), T(PR), T(RC), T(RR), T(NC), alpha=0.0), dpo_loss(T(PC), T(PR), T(RC), T(RR)))
    spec = get_loss("rpo")
    assert spec.reference_groups == ("chosen", "rejected") and spec.token_count_groups == ("chosen",)
    assert spec.required_fields == ("prompt", "chosen", "rejected")


# ------------------------------------------------------------------------------------ mixing


def test_mixing_is_the_weighted_sum_of_per_example_losses():
    mixed = resolve_loss(["dpo", "sft"], [1.0, 0.5])
    assert isinstance(mixed, MixedLoss) and mixed.name == "dpo+sft"
    h = (PC - RC) - (PR - RR)
    expected = 1.0 * np_neg_log_sigmoid(0.1 * h) + 0.5 * (-PC)
    np.testing.assert_allclose(mixed(inputs()).numpy(), expected, rtol=1e-12)
    terms = mixed.terms(inputs())
    np.testing.assert_allclose(terms["sft"].numpy(), -PC)
    # A given hyperparameter reaches every term that takes it.
    np.testing.assert_allclose(mixed(inputs(), beta=0.4).numpy(), np_neg_log_sigmoid(0.4 * h) + 0.5 * (-PC), rtol=1e-12)


def test_mixed_terms_keep_their_own_defaults():
    # dpo's beta is 0.1, simpo's 2.0: each keeps its own unless one is given.
    mixed = resolve_loss("dpo,simpo", [1.0, 0.25])
    h = (PC - RC) - (PR - RR)
    simpo = np_neg_log_sigmoid(2.0 * PC / NC - 2.0 * PR / NR - 1.0)
    np.testing.assert_allclose(mixed(inputs()).numpy(), np_neg_log_sigmoid(0.1 * h) + 0.25 * simpo, rtol=1e-12)
    assert mixed.token_count_groups == ("chosen", "rejected") and mixed.reference_groups == ("chosen", "rejected")
    with pytest.raises(ValueError, match=r"unknown parameter.*tau"):
        mixed(inputs(), tau=1.0)


def test_mixture_needs_the_union_of_its_terms():
    mixed = resolve_loss(["rdpo", "d2o", "adpo"])
    assert mixed.responses == ("chosen", "rejected", "anchors", "toxic")
    assert mixed.required_fields == ("prompt", "chosen", "rejected", "anchors", "toxic", "reward_chosen", "reward_rejected")
    assert mixed.needs_toxic_reference and mixed.needs_reference
    assert resolve_loss(["sft", "simpo"]).needs_reference is False
    # A mixture's inputs must hold every term's: a missing reward is named.
    with pytest.raises(ValueError, match="missing input 'reward_chosen'"):
        resolve_loss(["dpo", "rdpo"])(inputs())


@pytest.mark.parametrize("loss,weights,message", [
    ("kto", None, "unknown loss 'kto'; choose one of"),
    (["dpo", "kto"], None, "unknown loss 'kto'"),
    (["dpo", "dpo"], None, "listed twice"),
    (["dpo", "sft"], [1.0], "1 weight"),
    (["dpo", "sft"], [1.0, -0.5], "must be a finite number >= 0"),
    (["dpo", "sft"], [1.0, math.inf], "must be a finite number >= 0"),
    (["dpo", "sft"], [0.0, 0.0], "at least one weight must be > 0"),
    ([], None, "give a loss name"),
])
def test_resolve_loss_rejects(loss, weights, message):
    with pytest.raises(ValueError, match=message):
        resolve_loss(loss, weights)


# ------------------------------------------------------------------ the registry declares needs


def test_needs_follow_from_the_inputs_a_loss_reads():
    adpo = get_loss("adpo")
    # ADPO compares chosen/rejected with the reference; the toxic response only behind [TOXIC].
    assert adpo.responses == ("chosen", "rejected", "toxic")
    assert adpo.reference_groups == ("chosen", "rejected") and adpo.needs_toxic_reference
    assert get_loss("d2o").reference_groups == ("rejected", "anchors")
    assert get_loss("rdpo").reward_fields == ("reward_chosen", "reward_rejected")
    assert get_loss("sft").needs_reference is False
    for spec in LOSSES.values():
        assert set(spec.responses) <= {"chosen", "rejected", "anchors", "toxic"}
        assert not spec.token_logp_groups  # no registered loss reads per-token values (yet)


def test_a_new_loss_is_one_function_and_one_entry():
    """A per-token loss (mean token log-prob of the chosen, SFT-style) needs no trainer change."""

    def mean_token_nll(token_logps, mask):
        return -(token_logps * mask).sum(-1) / mask.sum(-1)

    spec = LossSpec("token-nll", mean_token_nll, (In.token_logps("chosen"), In.token_mask("chosen")), internal=True)
    assert spec.token_logp_groups == ("chosen",) and spec.responses == ("chosen",) and not spec.needs_reference
    per_token = T([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = spec(LossInputs(policy={}, token_logps={"chosen": per_token}, token_mask={"chosen": mask}))
    np.testing.assert_allclose(out.numpy(), [1.5, 3.0])
    assert Input("reward", "chosen").label == "reward_chosen" and In.toxic_ref.label == "toxic_ref"
