"""Tests for prefalign.losses.

Expected values are computed independently with plain-Python ``math`` on small
numbers, never by re-running the same formula through torch.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.losses import (
    LOSSES,
    LossInputs,
    sft_loss,
    anchor_sft_loss,
    LossSpec,
    adpo_loss,
    check_positive_reward_gap,
    d2o_loss,
    dpo_loss,
    get_loss,
    resolve_loss,
    implicit_rewards,
    ipo_loss,
    odpo_loss,
    rdpo_loss,
    rpo_loss,
    simpo_loss,
)

D = torch.float64


def t(*xs, dtype=D, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def neg_log_sigmoid(z: float) -> float:
    """-log sigma(z) = log(1 + exp(-z)), plain python, for moderate z."""
    return math.log(1.0 + math.exp(-z))


# Small hand-checkable batch: pc, pr, rc, rr per row.
PC = [-1.0, -4.0, -2.0]
PR = [-3.0, -2.0, -2.0]
RC = [-2.0, -3.0, -1.5]
RR = [-2.5, -2.5, -1.0]
# h = (pc - rc) - (pr - rr)  ->  row0: 1 - (-0.5) = 1.5 ; row1: -1 - 0.5 = -1.5 ; row2: -0.5 - (-1) = 0.5
H = [1.5, -1.5, 0.5]


def batch(grad=False):
    return t(*PC, grad=grad), t(*PR, grad=grad), t(*RC), t(*RR)


def test_margin_fixture_is_what_we_think():
    for pc, pr, rc, rr, h in zip(PC, PR, RC, RR, H):
        assert (pc - rc) - (pr - rr) == pytest.approx(h)


# --------------------------------------------------------------------------- #
# DPO
# --------------------------------------------------------------------------- #
def test_dpo_hand_values():
    out = dpo_loss(*batch(), beta=0.5)
    expected = [neg_log_sigmoid(0.5 * h) for h in H]
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    # row0: log(1 + e^-0.75)
    assert out[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1e-12])
def test_dpo_beta_to_zero_is_log2(beta):
    out = dpo_loss(*batch(), beta=beta)
    assert out.tolist() == pytest.approx([math.log(2)] * 3, rel=1e-9)


def test_dpo_gradient_sign_increases_chosen():
    pc, pr, rc, rr = batch(grad=True)
    beta = 0.5
    dpo_loss(pc, pr, rc, rr, beta=beta).sum().backward()
    # gradient descent (x -= lr * grad) raises chosen, lowers rejected log-prob
    assert (pc.grad < 0).all()
    assert (pr.grad > 0).all()
    # d loss / d pc = -beta * sigma(-beta h)
    expected = [-beta / (1 + math.exp(beta * h)) for h in H]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)


def test_dpo_rejects_negative_beta_and_bad_shapes():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*batch(), beta=-0.1)
    with pytest.raises(ValueError, match="batch size"):
        dpo_loss(t(0.0, 1.0), t(0.0), t(0.0), t(0.0))
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(t(0.0).reshape(1, 1), t(0.0), t(0.0), t(0.0))


# --------------------------------------------------------------------------- #
# IPO
# --------------------------------------------------------------------------- #
def test_ipo_hand_values():
    beta = 0.25  # 1/(2 beta) = 2
    out = ipo_loss(*batch(), beta=beta)
    expected = [(h - 2.0) ** 2 for h in H]  # 0.25, 12.25, 2.25
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    assert expected == [0.25, 12.25, 2.25]


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.1
    target = 1 / (2 * beta)  # 5
    hs = [target - 1.0, target, target + 1.0]
    pc = t(*hs, grad=True)
    zeros = t(0.0, 0.0, 0.0)
    out = ipo_loss(pc, zeros, zeros, zeros, beta=beta)
    out.sum().backward()
    assert out[1].item() == pytest.approx(0.0, abs=1e-12)
    assert pc.grad[1].item() == pytest.approx(0.0, abs=1e-12)
    assert out[0].item() == pytest.approx(1.0) and out[2].item() == pytest.approx(1.0)
    assert pc.grad[0].item() < 0 < pc.grad[2].item()


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_ipo_requires_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*batch(), beta=beta)


# --------------------------------------------------------------------------- #
# rDPO
# --------------------------------------------------------------------------- #
def test_rdpo_hand_values():
    beta, tau = 0.5, 2.0
    rw_c, rw_r = [1.0, 0.0, 3.0], [0.0, 1.0, 3.0]
    out = rdpo_loss(*batch(), reward_chosen=t(*rw_c), reward_rejected=t(*rw_r), beta=beta, tau=tau)
    expected = []
    for h, a, b in zip(H, rw_c, rw_r):
        p = 1 / (1 + math.exp(-(a - b) / tau))
        z = beta * h
        expected.append(p * neg_log_sigmoid(z) + (1 - p) * neg_log_sigmoid(-z))
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_rdpo_p_one_equals_dpo():
    # sigmoid(1000) == 1.0 exactly in float64
    out = rdpo_loss(*batch(), reward_chosen=t(1000.0, 1000.0, 1000.0), reward_rejected=t(0.0, 0.0, 0.0), beta=0.3)
    ref = dpo_loss(*batch(), beta=0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


def test_rdpo_p_half_is_symmetric():
    beta = 0.5
    r = t(0.7, 0.7, 0.7)
    pc, pr, rc, rr = batch()
    fwd = rdpo_loss(pc, pr, rc, rr, reward_chosen=r, reward_rejected=r, beta=beta)
    swapped = rdpo_loss(pr, pc, rr, rc, reward_chosen=r, reward_rejected=r, beta=beta)  # h -> -h
    torch.testing.assert_close(fwd, swapped)
    expected = [0.5 * (neg_log_sigmoid(beta * h) + neg_log_sigmoid(-beta * h)) for h in H]
    assert fwd.tolist() == pytest.approx(expected, rel=1e-12)


def test_rdpo_requires_positive_tau():
    r = t(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="tau"):
        rdpo_loss(*batch(), reward_chosen=r, reward_rejected=r, tau=0.0)


# --------------------------------------------------------------------------- #
# ODPO
# --------------------------------------------------------------------------- #
def test_odpo_hand_values():
    beta, alpha = 0.5, 1.5
    rw_c, rw_r = [3.0, 1.0, 2.5], [1.0, 0.5, 0.0]  # gaps 2, 0.5, 2.5
    out = odpo_loss(*batch(), reward_chosen=t(*rw_c), reward_rejected=t(*rw_r), beta=beta, alpha=alpha)
    expected = [neg_log_sigmoid(beta * h - alpha * math.log(a - b)) for h, a, b in zip(H, rw_c, rw_r)]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_odpo_alpha_zero_equals_dpo():
    out = odpo_loss(*batch(), reward_chosen=t(5.0, 2.0, 9.0), reward_rejected=t(1.0, 1.0, 1.0), beta=0.2, alpha=0.0)
    torch.testing.assert_close(out, dpo_loss(*batch(), beta=0.2))


def test_odpo_offset_raises_loss_for_large_gaps():
    # gap e > 1 -> positive offset -> larger loss than DPO; gap 1 -> no offset.
    rc_ = t(math.e, 1.0, math.e)
    rr_ = t(0.0, 0.0, 0.0)
    out = odpo_loss(*batch(), reward_chosen=rc_, reward_rejected=rr_, beta=0.5, alpha=1.0)
    dpo = dpo_loss(*batch(), beta=0.5)
    assert out[0] > dpo[0] and out[2] > dpo[2]
    assert out[1].item() == pytest.approx(dpo[1].item(), rel=1e-12)


def test_odpo_nonpositive_gap_names_rows():
    rc_ = t(1.0, 0.0, 2.0, -1.0, 5.0)
    rr_ = t(0.0, 0.0, 1.0, 0.0, float("nan"))  # rows 1 (tie), 3 (negative), 4 (nan) are bad
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 3, 4\]"):
        check_positive_reward_gap(rc_, rr_)
    z = torch.zeros(5, dtype=D)
    with pytest.raises(ValueError, match=r"\[1, 3, 4\]"):
        odpo_loss(z, z, z, z, reward_chosen=rc_, reward_rejected=rr_)
    # a valid batch passes silently
    assert check_positive_reward_gap(t(1.0, 2.0), t(0.0, 1.5)) is None


# --------------------------------------------------------------------------- #
# D2O
# --------------------------------------------------------------------------- #
def test_d2o_hand_values():
    beta, alpha = 0.5, 0.2
    pa = [[-1.0, -2.0, -3.0], [0.0, -1.0, -5.0]]
    ra = [[-1.5, -1.5, -1.5], [-1.0, -1.0, -1.0]]
    prej, rrej = [-4.0, -2.0], [-3.0, -3.0]
    out = d2o_loss(t(*prej), t(*rrej), torch.tensor(pa, dtype=D), torch.tensor(ra, dtype=D), beta=beta, alpha=alpha)
    expected = []
    for row_pa, row_ra, p, r in zip(pa, ra, prej, rrej):
        k = len(row_pa)
        s = sum(a - b for a, b in zip(row_pa, row_ra))
        expected.append(neg_log_sigmoid(beta / k * s - alpha * (p - r)))
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_d2o_k1_alpha_eq_beta_is_dpo():
    pc, pr, rc, rr = batch()
    out = d2o_loss(pr, rr, pc.unsqueeze(1), rc.unsqueeze(1), beta=0.4, alpha=0.4)
    torch.testing.assert_close(out, dpo_loss(pc, pr, rc, rr, beta=0.4))


def test_d2o_shape_validation():
    r = t(0.0, 0.0)
    with pytest.raises(ValueError, match=r"2-D tensor of shape \[B, K\]"):
        d2o_loss(r, r, t(0.0, 0.0), t(0.0, 0.0))
    with pytest.raises(ValueError, match="same shape"):
        d2o_loss(r, r, torch.zeros(2, 3, dtype=D), torch.zeros(2, 2, dtype=D))
    with pytest.raises(ValueError, match="batch size"):
        d2o_loss(r, r, torch.zeros(3, 2, dtype=D), torch.zeros(3, 2, dtype=D))
    with pytest.raises(ValueError, match="K >= 1"):
        d2o_loss(r, r, torch.zeros(2, 0, dtype=D), torch.zeros(2, 0, dtype=D))


# --------------------------------------------------------------------------- #
# ADPO
# --------------------------------------------------------------------------- #
def test_adpo_hand_values():
    beta, gamma = 0.5, 0.3
    pt, tr = [-2.0, -6.0, -1.0], [-3.0, -4.0, -1.0]
    out = adpo_loss(*batch(), t(*pt), t(*tr), beta=beta, gamma=gamma)
    expected = [neg_log_sigmoid(beta * h - gamma * (a - b)) for h, a, b in zip(H, pt, tr)]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_adpo_gamma_zero_is_dpo_and_toxic_gradient_sign():
    pt = t(-2.0, -6.0, -1.0, grad=True)
    tr = t(-3.0, -4.0, -1.0)
    out0 = adpo_loss(*batch(), pt, tr, beta=0.5, gamma=0.0)
    torch.testing.assert_close(out0, dpo_loss(*batch(), beta=0.5))
    adpo_loss(*batch(), pt, tr, beta=0.5, gamma=0.3).sum().backward()
    assert (pt.grad > 0).all()  # descending lowers the toxic log-prob


# --------------------------------------------------------------------------- #
# numerical robustness and gradcheck (all losses)
# --------------------------------------------------------------------------- #
def _all_losses(pc, pr, rc, rr, *, beta=0.1):
    """Each loss evaluated on the same chosen/rejected pair (extras chosen to be valid)."""
    n = pc.shape[0]
    one = torch.ones(n, dtype=pc.dtype)
    return {
        "dpo": dpo_loss(pc, pr, rc, rr, beta=beta),
        "ipo": ipo_loss(pc, pr, rc, rr, beta=beta),
        "rdpo": rdpo_loss(pc, pr, rc, rr, reward_chosen=one, reward_rejected=0 * one, beta=beta),
        "odpo": odpo_loss(pc, pr, rc, rr, reward_chosen=3 * one, reward_rejected=one, beta=beta),
        "d2o": d2o_loss(pr, rr, torch.stack([pc, pc + 1], 1), torch.stack([rc, rc], 1), beta=beta),
        "adpo": adpo_loss(pc, pr, rc, rr, pr * 0.5, rr, beta=beta),
        "simpo": simpo_loss(pc, pr, 3 * one, 2 * one, beta=beta),
        "rpo": rpo_loss(pc, pr, rc, rr, 3 * one, beta=beta),
        "sft": sft_loss(pc),
        "anchor-sft": anchor_sft_loss(torch.stack([pc, pc + 1], 1)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_margins_finite_values_and_grads(dtype):
    pc = torch.tensor([1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e4, 1e4, 0.0], dtype=dtype, requires_grad=True)
    z = torch.zeros(3, dtype=dtype)
    outs = _all_losses(pc, pr, z, z, beta=1.0)
    assert set(outs) == set(LOSSES)
    for name, out in outs.items():
        assert torch.isfinite(out).all(), name
        pc.grad = pr.grad = None
        out.sum().backward()
        grads = [g for g in (pc.grad, pr.grad) if g is not None]  # SFT reads pc only
        assert grads and all(torch.isfinite(g).all() for g in grads), name
    # h = +2e4: DPO loss ~ 0; h = -2e4: DPO loss ~ 2e4 (no overflow to inf)
    assert outs["dpo"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert outs["dpo"][1].item() == pytest.approx(2e4, rel=1e-6)


def test_huge_reward_gap_is_finite_for_rdpo():
    pc, pr, rc, rr = batch(grad=True)
    out = rdpo_loss(pc, pr, rc, rr, reward_chosen=t(1e30, -1e30, 0.0), reward_rejected=t(-1e30, 1e30, 0.0))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pc.grad).all()


def test_gradcheck_all_losses():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, dtype=D, generator=g, requires_grad=True)

    pc, pr, rc, rr, pt, tr = (r(4) for _ in range(6))
    pa, ra = r(4, 3), r(4, 3)
    rw_c = torch.rand(4, dtype=D, generator=g) + 1.0
    rw_r = torch.rand(4, dtype=D, generator=g) - 1.0  # gap > 0
    cases = {
        "dpo": (lambda *x: dpo_loss(*x, beta=0.7), (pc, pr, rc, rr)),
        "ipo": (lambda *x: ipo_loss(*x, beta=0.7), (pc, pr, rc, rr)),
        "rdpo": (lambda *x: rdpo_loss(*x, reward_chosen=rw_c, reward_rejected=rw_r, beta=0.7, tau=0.5), (pc, pr, rc, rr)),
        "odpo": (lambda *x: odpo_loss(*x, reward_chosen=rw_c, reward_rejected=rw_r, beta=0.7, alpha=0.5), (pc, pr, rc, rr)),
        "d2o": (lambda *x: d2o_loss(*x, beta=0.7, alpha=0.3), (pr, rr, pa, ra)),
        "adpo": (lambda *x: adpo_loss(*x, beta=0.7, gamma=0.3), (pc, pr, rc, rr, pt, tr)),
        "simpo": (lambda *x: simpo_loss(*x, rw_c * 3, rw_c * 2, beta=0.7, gamma=0.3), (pc, pr)),
        "rpo": (lambda *x: rpo_loss(*x, rw_c * 3, beta=0.7, alpha=0.5), (pc, pr, rc, rr)),
        "sft": (lambda x: sft_loss(x), (pc,)),
        "anchor-sft": (lambda x: anchor_sft_loss(x), (pa,)),
    }
    assert set(cases) == set(LOSSES)
    for name, (fn, inputs) in cases.items():
        assert torch.autograd.gradcheck(fn, inputs), name


# --------------------------------------------------------------------------- #
# implicit rewards
# --------------------------------------------------------------------------- #
def test_implicit_rewards():
    out = implicit_rewards(t(-1.0, -4.0), t(-2.0, -3.0), 0.5)
    assert out.tolist() == pytest.approx([0.5, -0.5])
    out2 = implicit_rewards(torch.tensor([[0.0, -2.0], [1.0, 3.0]], dtype=D), torch.zeros(2, 2, dtype=D), 0.1)
    assert out2.shape == (2,)
    assert out2.tolist() == pytest.approx([-0.1, 0.2])
    with pytest.raises(ValueError, match="shapes differ"):
        implicit_rewards(t(0.0), t(0.0, 1.0), 0.1)


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
def _inputs(b=3, k=2):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, dtype=D, generator=g)

    policy = {"chosen": r(b), "rejected": r(b), "anchors": r(b, k), "toxic": r(b)}
    reference = {"chosen": r(b), "rejected": r(b), "anchors": r(b, k), "toxic": r(b), "toxic_ref": r(b)}
    rewards = {"reward_chosen": torch.full((b,), 2.0, dtype=D), "reward_rejected": torch.full((b,), 0.5, dtype=D)}
    return policy, reference, rewards


TOKENS = {"chosen": torch.tensor([3.0, 5.0, 1.0], dtype=D), "rejected": torch.tensor([2.0, 7.0, 4.0], dtype=D)}


def _direct(name, p, r, w, params):
    """The same loss called directly through its function (expected value for compute())."""
    pair = (p["chosen"], p["rejected"], r["chosen"], r["rejected"])
    rew = {"reward_chosen": w["reward_chosen"], "reward_rejected": w["reward_rejected"]}
    calls = {
        "dpo": lambda: dpo_loss(*pair, **params),
        "ipo": lambda: ipo_loss(*pair, **params),
        "rdpo": lambda: rdpo_loss(*pair, **rew, **params),
        "odpo": lambda: odpo_loss(*pair, **rew, **params),
        "d2o": lambda: d2o_loss(p["rejected"], r["rejected"], p["anchors"], r["anchors"], **params),
        "adpo": lambda: adpo_loss(*pair, p["toxic"], r["toxic_ref"], **params),
        "simpo": lambda: simpo_loss(p["chosen"], p["rejected"], TOKENS["chosen"], TOKENS["rejected"], **params),
        "rpo": lambda: rpo_loss(*pair, TOKENS["chosen"], **params),
        "sft": lambda: sft_loss(p["chosen"]),
        "anchor-sft": lambda: anchor_sft_loss(p["anchors"]),
    }
    return calls[name]()


EXPECTED_REGISTRY = {
    "dpo": (("chosen", "rejected"), ("prompt", "chosen", "rejected"), {"beta": 0.1}),
    "ipo": (("chosen", "rejected"), ("prompt", "chosen", "rejected"), {"beta": 0.1}),
    "rdpo": (
        ("chosen", "rejected"),
        ("prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"),
        {"beta": 0.1, "tau": 1.0},
    ),
    "odpo": (
        ("chosen", "rejected"),
        ("prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"),
        {"beta": 0.1, "alpha": 1.0},
    ),
    "d2o": (("rejected", "anchors"), ("prompt", "rejected", "anchors"), {"beta": 0.1, "alpha": 0.1}),
    "adpo": (("chosen", "rejected", "toxic"), ("prompt", "chosen", "rejected", "toxic"), {"beta": 0.1, "gamma": 0.1}),
    "simpo": (("chosen", "rejected"), ("prompt", "chosen", "rejected"), {"beta": 2.0, "gamma": 1.0}),
    "rpo": (("chosen", "rejected"), ("prompt", "chosen", "rejected"), {"beta": 0.1, "alpha": 1.0}),
    "sft": (("chosen",), ("prompt", "chosen"), {}),
    "anchor-sft": (("anchors",), ("prompt", "anchors"), {}),
}


def test_registry_contents():
    assert set(LOSSES) == set(EXPECTED_REGISTRY)
    for name, (responses, fields, defaults) in EXPECTED_REGISTRY.items():
        spec = get_loss(name)
        assert isinstance(spec, LossSpec) and spec.name == name
        assert spec.responses == responses
        assert set(spec.responses) <= {"chosen", "rejected", "anchors", "toxic"}
        assert spec.required_fields == fields
        assert dict(spec.defaults) == defaults
        assert spec.needs_toxic_reference == (name == "adpo")
        assert spec.positive == ("anchors" if name in ("d2o", "anchor-sft") else "chosen")
        assert spec.negative == {"sft": "chosen", "anchor-sft": "anchors"}.get(name, "rejected")
        assert spec.needs_reference == (name not in ("sft", "simpo", "anchor-sft"))  # reference-free losses
        assert spec.requires_positive_reward_gap == (name == "odpo")
    with pytest.raises(TypeError):
        LOSSES["dpo"].defaults["beta"] = 1.0  # read-only


@pytest.mark.parametrize("name", sorted(EXPECTED_REGISTRY))
def test_registry_compute_matches_function(name):
    p, r, w = _inputs()
    spec = get_loss(name)
    inputs = LossInputs.from_dicts(p, r, w, num_tokens=TOKENS)
    out = spec(inputs)
    assert out.shape == (3,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, _direct(name, p, r, w, dict(spec.defaults)))
    if not spec.token_count_groups:  # the dictionary form (no token counts) gives the same
        torch.testing.assert_close(spec.compute(p, r, w), out)
    if "beta" not in spec.defaults:  # SFT has no hyperparameter to override
        return
    # an override reaches the function and changes the result
    overridden = spec(inputs, beta=0.7)
    torch.testing.assert_close(overridden, _direct(name, p, r, w, {**spec.defaults, "beta": 0.7}))
    assert not torch.allclose(out, overridden)


def test_compute_only_needs_its_own_inputs():
    p, r, w = _inputs()
    # DPO works without rewards and without anchors/toxic entries
    out = get_loss("dpo").compute({k: p[k] for k in ("chosen", "rejected")}, {k: r[k] for k in ("chosen", "rejected")})
    torch.testing.assert_close(out, dpo_loss(p["chosen"], p["rejected"], r["chosen"], r["rejected"]))


def test_compute_unknown_param_lists_accepted():
    p, r, w = _inputs()
    with pytest.raises(ValueError, match=r"unknown parameter.*gamma.*accepted: \['alpha', 'beta'\]"):
        get_loss("odpo").compute(p, r, w, gamma=0.1)


def test_compute_missing_input_is_value_error():
    p, r, w = _inputs()
    with pytest.raises(ValueError, match="reward_chosen"):
        get_loss("rdpo").compute(p, r, None)
    r_no_toxic = {k: v for k, v in r.items() if k != "toxic_ref"}
    with pytest.raises(ValueError, match="toxic_ref"):
        get_loss("adpo").compute(p, r_no_toxic, w)


def test_get_loss_unknown_lists_the_public_names():
    # sft is internal (the toxic-control SFT): accepted, but not offered in the list.
    with pytest.raises(ValueError, match=r"^unknown loss 'kto'; choose one of dpo, ipo, rdpo, odpo, d2o, adpo, simpo, rpo$"):
        get_loss("kto")
    assert get_loss("sft").internal


def test_anchor_sft_is_the_mean_anchor_nll_and_mixes_with_d2o():
    anchors = t(-2.0, -4.0, -1.0, -3.0).reshape(2, 2)
    assert anchor_sft_loss(anchors).tolist() == pytest.approx([3.0, 2.0])
    mixed = resolve_loss(["d2o", "anchor-sft"], [1.0, 0.5])
    rej, ref_rej, ref_anchors = t(-5.0, -6.0), t(-5.5, -6.5), t(-2.5, -4.0, -1.0, -3.5).reshape(2, 2)
    inputs = LossInputs.from_dicts({"rejected": rej, "anchors": anchors}, {"rejected": ref_rej, "anchors": ref_anchors})
    expected = d2o_loss(rej, ref_rej, anchors, ref_anchors) + 0.5 * anchor_sft_loss(anchors)
    assert mixed(inputs).tolist() == pytest.approx(expected.tolist())
    assert mixed.positive == "anchors" and mixed.negative == "rejected"
    with pytest.raises(ValueError, match="anchor-sft"):
        anchor_sft_loss(t(1.0, 2.0))


def test_sft_loss_is_negative_log_likelihood():
    logps = t(-2.0, -6.0)
    assert sft_loss(logps).tolist() == pytest.approx([2.0, 6.0])
    assert sft_loss(logps, num_tokens=t(2.0, 3.0)).tolist() == pytest.approx([1.0, 2.0])
