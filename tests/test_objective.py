"""The policy objective (harness.objective.policy_loss) against closed forms and hand computations.

Everything here is float64 on CPU unless a test says otherwise. The closed forms (F', the clip
indicator, the aggregation coefficients) are written out in this file, independently of
harness.gates / harness.objective.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.objective import aggregate, policy_loss

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "tests.custom_gate_module:F"
F64 = torch.float64

SIGMOID_HWHM = 2.0 * math.acosh(math.sqrt(2.0))
# gate -> (F'(x), HWHM of F' in x); written by hand
CLOSED = {
    "sigmoid": (lambda x: 4.0 * torch.sigmoid(x) * (1.0 - torch.sigmoid(x)), SIGMOID_HWHM),
    "erf": (lambda x: torch.exp(-0.5 * x * x), math.sqrt(2.0 * math.log(2.0))),
    "arctan": (lambda x: 1.0 / (1.0 + x * x), 1.0),
    "softsign": (lambda x: (1.0 + x * x) ** -1.5, math.sqrt(2.0 ** (2.0 / 3.0) - 1.0)),  # the paper's eq. (8)
    "softsign_abs": (lambda x: (1.0 + x.abs()) ** -2, math.sqrt(2.0) - 1.0),
    CUSTOM: (lambda x: (1.0 + x * x) ** -1.5, math.sqrt(2.0 ** (2.0 / 3.0) - 1.0)),
}
SMOOTH = list(CLOSED)
ALL_GATES = [*SMOOTH, "clip"]
# (agg, norm_length)
AGGS = [("seq-mean-token-mean", None), ("token-mean", None), ("seq-mean-token-sum-norm", None),
        ("seq-mean-token-sum-norm", 13)]
TAU_POS, TAU_NEG = 0.7, 2.3
EPS_LOW, EPS_HIGH = 0.2, 0.28


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


# ----------------------------------------------------------------------------- hand-written references


def agg_coef(mask: torch.Tensor, agg: str, norm_length: int | None = None) -> torch.Tensor:
    """c_it with loss = sum_it c_it * l_it for each aggregation mode (hand-derived)."""
    m = mask.to(F64)
    B, T = m.shape
    if agg == "seq-mean-token-mean":
        lengths = m.sum(1, keepdim=True)
        n_nonempty = float((lengths > 0).sum())
        return m / lengths.clamp(min=1) / n_nonempty
    if agg == "token-mean":
        return m / m.sum()
    assert agg == "seq-mean-token-sum-norm"
    return m / (B * (norm_length or T))


def tau_map(adv: torch.Tensor, gate: str, width: str) -> torch.Tensor:
    tau = torch.where(adv > 0, torch.tensor(TAU_POS, dtype=F64), torch.tensor(TAU_NEG, dtype=F64))
    if width == "hwhm":
        tau = tau * CLOSED[gate][1] / SIGMOID_HWHM
    return tau


def closed_weight(gate: str, r: torch.Tensor, adv: torch.Tensor, width: str = "raw",
                  eps_low: float = EPS_LOW, eps_high: float = EPS_HIGH) -> torch.Tensor:
    """w(r): F'(τ(r − 1)) for smooth gates; PPO's 'unclipped branch active' indicator for clip."""
    if gate == "clip":
        keep = torch.where(adv > 0, r <= 1.0 + eps_high, r >= 1.0 - eps_low)
        return keep.to(F64)
    return CLOSED[gate][0](tau_map(adv, gate, width) * (r - 1.0))


def make_batch(seed: int, B: int = 6, T: int = 9, per_token_adv: bool = False, dtype=F64):
    """Random batch with ratios well away from 1 (|log r| in [0.05, 1]), ragged mask, A of both signs."""
    gen = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=gen, dtype=F64)
    sign = torch.where(torch.rand(B, T, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    log_r = sign * (0.05 + 0.95 * torch.rand(B, T, generator=gen, dtype=F64))
    old_logp = logp - log_r
    lengths = torch.tensor([T, 1, T - 3, 2, T - 1, 5][:B])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if per_token_adv:
        adv = torch.randn(B, T, generator=gen, dtype=F64)
    else:
        adv = torch.tensor([1.3, -0.7, 0.4, -2.0, 0.9, -0.2][:B], dtype=F64)
    return logp.to(dtype), old_logp.to(dtype), adv.to(dtype), mask


def adv_tok(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return adv[:, None].expand_as(like) if adv.dim() == 1 else adv


def grad_of(logp, old_logp, adv, mask, **kw):
    lp = logp.detach().clone().requires_grad_(True)
    loss, diag = policy_loss(lp, old_logp, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, diag


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- gradient = closed form


@pytest.mark.parametrize("gate", ALL_GATES)
@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("width", ["raw", "hwhm"])
def test_gradient_is_closed_form_token_level(gate, agg, norm_length, per_token_adv, width):
    logp, old, adv, mask = make_batch(1, per_token_adv=per_token_adv)
    _, g, _ = grad_of(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, width=width,
                      eps_low=EPS_LOW, eps_high=EPS_HIGH, agg=agg, norm_length=norm_length)
    r = torch.exp(logp - old)
    A = adv_tok(adv, r)
    w = closed_weight(gate, r, A, width)
    expected = -agg_coef(mask, agg, norm_length) * w * r * A  # ∇_logp of -Σ c f(r) A = -c w r A
    assert_close(g, expected)
    # the batch really exercises the gate: weights well below 1 and both signs present
    assert float(w[mask].min()) < 0.6 and bool((A[mask] > 0).any()) and bool((A[mask] < 0).any())


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), gate=st.sampled_from(ALL_GATES), agg=st.sampled_from(AGGS),
       tau_pos=st.floats(0.05, 20.0), tau_neg=st.floats(0.05, 20.0), eps_low=st.floats(0.0, 0.9),
       eps_high=st.floats(0.0, 3.0), width=st.sampled_from(["raw", "hwhm"]), scale=st.floats(0.01, 3.0))
def test_gradient_is_closed_form_property(seed, gate, agg, tau_pos, tau_neg, eps_low, eps_high, width, scale):
    gen = torch.Generator().manual_seed(seed)
    B, T = 5, 7
    logp = -3.0 * torch.rand(B, T, generator=gen, dtype=F64)
    old = logp - scale * torch.randn(B, T, generator=gen, dtype=F64)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[0, 0] = True
    adv = torch.randn(B, T, generator=gen, dtype=F64)
    _, g, _ = grad_of(logp, old, adv, mask, gate=gate, tau_pos=tau_pos, tau_neg=tau_neg, width=width,
                      eps_low=eps_low, eps_high=eps_high, agg=agg[0], norm_length=agg[1])
    r = torch.exp(logp - old)
    tau = torch.where(adv > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))
    if gate == "clip":
        w = torch.where(adv > 0, r <= 1.0 + eps_high, r >= 1.0 - eps_low).to(F64)
    else:
        dF, h = CLOSED[gate]
        w = dF((tau * h / SIGMOID_HWHM if width == "hwhm" else tau) * (r - 1.0))
    assert_close(g, -agg_coef(mask, *agg) * w * r * adv)


@pytest.mark.parametrize("gate", ALL_GATES)
def test_gradient_wrt_logits_is_w_r_A_grad_log_pi(gate):
    B, T, V = 4, 6, 5
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(B, T, V, generator=gen, dtype=F64, requires_grad=True)
    actions = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    log_r = torch.tensor([-0.9, -0.4, -0.1, 0.15, 0.5, 1.0], dtype=F64).repeat(B, 1)
    old = logp.detach() - log_r
    mask = torch.arange(T)[None, :] < torch.tensor([6, 3, 5, 1])[:, None]
    adv = torch.tensor([1.5, -1.0, -0.3, 0.8], dtype=F64)
    loss, _ = policy_loss(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG,
                          eps_low=EPS_LOW, eps_high=EPS_HIGH, agg="seq-mean-token-mean")
    (g,) = torch.autograd.grad(loss, logits)

    p = torch.softmax(logits.detach(), -1)
    grad_log_pi = torch.nn.functional.one_hot(actions, V).to(F64) - p  # ∇_logits log π(a)
    r = torch.exp(log_r)
    A = adv_tok(adv, r)
    coef = -agg_coef(mask, "seq-mean-token-mean") * closed_weight(gate, r, A) * r * A
    assert_close(g, coef[..., None] * grad_log_pi)


@pytest.mark.parametrize("gate", ALL_GATES)
@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gradient_is_closed_form_sequence_level(gate, agg, norm_length, per_token_adv):
    logp, old, adv, mask = make_batch(2, per_token_adv=per_token_adv)
    _, g, _ = grad_of(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, eps_low=EPS_LOW,
                      eps_high=EPS_HIGH, agg=agg, norm_length=norm_length, ratio_level="sequence")
    m = mask.to(F64)
    lengths = m.sum(1, keepdim=True)
    s = torch.exp(((logp - old) * m).sum(1, keepdim=True) / lengths).expand_as(logp)  # geometric-mean ratio
    A = adv_tok(adv, s)
    c = agg_coef(mask, agg, norm_length)
    # ∂l_it'/∂logp_it = -w(s_i) s_i A_it' · m_it / |y_i|  for every t' of the same sequence
    expected = -(c * closed_weight(gate, s, A) * s * A).sum(1, keepdim=True) * m / lengths
    assert_close(g, expected)


# ----------------------------------------------------------------------------- SAPO, PPO/DAPO, on-policy


@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(1.0, 1.05), (0.7, 2.3), (3.0, 0.5)])
def test_sigmoid_is_sapo(agg, norm_length, per_token_adv, tau_pos, tau_neg):
    logp, old, adv, mask = make_batch(3, per_token_adv=per_token_adv)
    kw = dict(tau_pos=tau_pos, tau_neg=tau_neg, agg=agg, norm_length=norm_length)
    loss, g, _ = grad_of(logp, old, adv, mask, gate="sigmoid", **kw)

    lp = logp.detach().clone().requires_grad_(True)
    r = torch.exp(lp - old)
    A = adv_tok(adv, r)
    tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))
    c = agg_coef(mask, agg, norm_length)
    sapo = (c * -(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * A).sum()  # SAPO's surrogate, as in TRL/verl
    (g_sapo,) = torch.autograd.grad(sapo, lp)

    torch.testing.assert_close(g, g_sapo, rtol=1e-12, atol=1e-15)  # identical gradients
    constant = (c * -(1.0 - 2.0 / tau) * A).sum()  # the documented (1 − 2/τ)·A offset
    torch.testing.assert_close(loss - sapo.detach(), constant, rtol=1e-12, atol=1e-14)
    assert abs(float(constant)) > 1e-3  # the offset is real for these τ


def ppo_loss(logp, old, adv, mask, eps_low, eps_high, agg="seq-mean-token-mean", norm_length=None):
    """PPO's clipped objective as usually written: max(−A r, −A clip(r, 1 − ε_l, 1 + ε_h))."""
    r = torch.exp(logp - old)
    A = adv_tok(adv, r)
    per_token = torch.maximum(-A * r, -A * torch.clamp(r, 1.0 - eps_low, 1.0 + eps_high))
    return (agg_coef(mask, agg, norm_length) * torch.where(mask, per_token, 0.0)).sum()


@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28), (0.1, 0.4), (0.0, 0.0)])
@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_clip_is_ppo_clipped_surrogate(eps_low, eps_high, agg, norm_length, per_token_adv):
    logp, old, adv, mask = make_batch(4, per_token_adv=per_token_adv)
    loss, g, _ = grad_of(logp, old, adv, mask, gate="clip", eps_low=eps_low, eps_high=eps_high, agg=agg,
                         norm_length=norm_length)
    lp = logp.detach().clone().requires_grad_(True)
    ref = ppo_loss(lp, old, adv, mask, eps_low, eps_high, agg, norm_length)
    (g_ref,) = torch.autograd.grad(ref, lp)
    assert_close(loss, ref.detach(), 1e-12)
    assert_close(g, g_ref, 1e-12)
    # and the hand-derived weight: 1 on the active unclipped branch, else 0
    r = torch.exp(logp - old)
    A = adv_tok(adv, r)
    assert_close(g, -agg_coef(mask, agg, norm_length) * closed_weight("clip", r, A, eps_low=eps_low,
                                                                          eps_high=eps_high) * r * A)


def test_clip_higher_dapo_table():
    """Hand table: which tokens keep their gradient under ε_low = 0.2, ε_high = 0.28 (DAPO)."""
    r = torch.tensor([0.7, 0.75, 0.85, 1.1, 1.25, 1.35], dtype=F64)
    logp = torch.zeros(2, 6, dtype=F64)
    old = -torch.log(r).repeat(2, 1)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    loss, g, diag = grad_of(logp, old, adv, mask, gate="clip", eps_low=0.2, eps_high=0.28, agg="token-mean")
    keep = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=F64)  # A>0: r <= 1.28; A<0: r >= 0.8
    A = adv[:, None].expand(2, 6)
    assert_close(g, -keep * r * A / 12, 1e-12)
    # value: min(r, 1.28) for A>0 and max(r, 0.8)·(−1) for A<0
    value_pos = sum(min(x, 1.28) for x in r.tolist())
    value_neg = -sum(max(x, 0.8) for x in r.tolist())
    assert float(loss) == pytest.approx(-(value_pos + value_neg) / 12, abs=1e-12)
    assert diag["clip_frac"] == pytest.approx(3 / 12)
    assert diag["clip_frac_pos"] == pytest.approx(1 / 6)
    assert diag["clip_frac_neg"] == pytest.approx(2 / 6)
    # symmetric ε = 0.2 clips the A>0 token at r = 1.25 too: the two really differ
    _, g_sym, _ = grad_of(logp, old, adv, mask, gate="clip", eps_low=0.2, eps_high=0.2, agg="token-mean")
    assert float(g_sym[0, 4]) == 0.0 and float(g[0, 4]) != 0.0


@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_on_policy_every_gate_is_the_plain_policy_gradient(agg, norm_length, ratio_level, per_token_adv):
    logp, _, adv, mask = make_batch(5, per_token_adv=per_token_adv)
    c = agg_coef(mask, agg, norm_length)
    A = adv_tok(adv, logp)
    expected_loss = -(c * A).sum()
    expected_grad = -c * A
    seen = []
    for gate in ALL_GATES:
        for width in ("raw", "hwhm"):
            loss, g, _ = grad_of(logp, logp.clone(), adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG,
                                 width=width, agg=agg, norm_length=norm_length, ratio_level=ratio_level)
            assert_close(loss, expected_loss, 1e-12)
            if ratio_level == "token":
                assert_close(g, expected_grad, 1e-12)
            seen.append(g)
    for g in seen[1:]:
        assert_close(g, seen[0], 1e-12)


# ----------------------------------------------------------------------------- aggregation and GSPO by hand

PT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, float("nan"), 99.0], [float("nan"), 7.0, 7.0, 7.0]], dtype=F64)
PT_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
# seq means 2.5 and 5.5 over the 2 non-empty sequences; 21 over 6 tokens; 21 / (3 · 4); 21 / (3 · 10)
PT_EXPECTED = {("seq-mean-token-mean", None): 4.0, ("token-mean", None): 3.5,
               ("seq-mean-token-sum-norm", None): 1.75, ("seq-mean-token-sum-norm", 10): 0.7}


@pytest.mark.parametrize(("agg", "norm_length"), list(PT_EXPECTED))
def test_aggregate_by_hand(agg, norm_length):
    out = aggregate(PT, PT_MASK, agg, norm_length)
    assert float(out) == PT_EXPECTED[(agg, norm_length)]
    # through policy_loss: at r = 1 the per-token loss is −A, so A = −PT gives the same numbers
    logp = torch.zeros(3, 4, dtype=F64)
    loss, _ = policy_loss(logp, logp, -PT, PT_MASK, gate="erf", agg=agg, norm_length=norm_length)
    assert float(loss) == pytest.approx(PT_EXPECTED[(agg, norm_length)], abs=1e-12)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="agg must be one of seq-mean-token-mean, token-mean"):
        aggregate(PT, PT_MASK, "sum")


def test_gspo_sequence_ratio_by_hand():
    # two sequences, lengths 2 and 3; log r = [0.2, −0.4 | pad] and [0.3, 0.3, 0.6]
    log_r = torch.tensor([[0.2, -0.4, 123.0], [0.3, 0.3, 0.6]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -1.5, -2.5]], dtype=F64)
    old = logp - log_r
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    loss, g, diag = grad_of(logp, old, adv, mask, gate="sigmoid", tau_pos=1.0, tau_neg=2.0,
                            ratio_level="sequence", agg="seq-mean-token-mean")
    s1, s2 = math.exp(-0.1), math.exp(0.4)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))
    f1 = 1.0 + (4.0 * sig(1.0 * (s1 - 1.0)) - 2.0) / 1.0
    f2 = 1.0 + (4.0 * sig(2.0 * (s2 - 1.0)) - 2.0) / 2.0
    assert float(loss) == pytest.approx(0.5 * (-f1 * 1.0 + f2 * 1.0), abs=1e-12)
    w1 = 1.0 / math.cosh(0.5 * 1.0 * (s1 - 1.0)) ** 2
    w2 = 1.0 / math.cosh(0.5 * 2.0 * (s2 - 1.0)) ** 2
    # d loss / d logp_it = −(1/2) · w(s_i) s_i A_i / |y_i|: every token of a sequence gets the same gradient
    expected = torch.tensor([[-0.5 * w1 * s1 / 2, -0.5 * w1 * s1 / 2, 0.0],
                             [0.5 * w2 * s2 / 3, 0.5 * w2 * s2 / 3, 0.5 * w2 * s2 / 3]], dtype=F64)
    assert_close(g, expected, 1e-12)
    assert diag["ratio_min"] == pytest.approx(s1) and diag["ratio_max"] == pytest.approx(s2)
    assert diag["tokens"] == 5.0


# ----------------------------------------------------------------------------- KL and extreme ratios


def test_kl_k3_by_hand():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, float("nan")]], dtype=F64)
    ref = torch.tensor([[-1.2, -0.1, -2.0], [-1.0, -2.5, float("nan")]], dtype=F64)
    old = logp - torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0], dtype=F64)
    beta = 0.3
    base, g0, d0 = grad_of(logp, old, adv, mask, gate="arctan")
    loss, g, diag = grad_of(logp, old, adv, mask, gate="arctan", ref_logp=ref, kl_beta=beta)
    k3 = [[math.exp(d) - d - 1.0 for d in row] for row in [[-0.2, 0.4, 0.0], [-0.8, 0.5]]]
    seq_mean = 0.5 * (sum(k3[0]) / 3 + sum(k3[1]) / 2)
    assert float(loss - base) == pytest.approx(beta * seq_mean, abs=1e-12)
    assert diag["kl"] == pytest.approx((sum(k3[0]) + sum(k3[1])) / 5, abs=1e-12)  # token mean
    assert "kl" not in d0
    # ∂k3/∂logp = 1 − exp(ref − logp)
    dk = torch.tensor([[1 - math.exp(-0.2), 1 - math.exp(0.4), 0.0], [1 - math.exp(-0.8), 1 - math.exp(0.5), 0.0]],
                      dtype=F64)
    coef = torch.tensor([[1 / 6, 1 / 6, 1 / 6], [1 / 4, 1 / 4, 0.0]], dtype=F64)
    assert_close(g - g0, beta * coef * dk, 1e-12)
    # kl_beta = 0 with a reference: no penalty, no kl diagnostic
    loss_b0, _, d_b0 = grad_of(logp, old, adv, mask, gate="arctan", ref_logp=ref, kl_beta=0.0)
    assert float(loss_b0) == float(base) and "kl" not in d_b0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("gate", ALL_GATES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_extreme_log_ratios_stay_finite(dtype, gate, ratio_level):
    logp, old, adv, mask = make_batch(6, per_token_adv=True, dtype=dtype)
    extreme = torch.zeros_like(logp)
    extreme[0, :4] = torch.tensor([100.0, -100.0, 100.0, -100.0], dtype=dtype)
    extreme[2, 1] = 100.0
    extreme[4, :] = -100.0
    old = old + extreme  # log r = ... ∓ 100
    ref = logp.detach() - extreme  # ref − logp = ∓ 100 for the KL term as well
    for agg, norm_length in AGGS:
        loss, g, diag = grad_of(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, agg=agg,
                                norm_length=norm_length, ratio_level=ratio_level, ref_logp=ref, kl_beta=0.1)
        assert bool(torch.isfinite(loss)), (agg, float(loss))
        assert bool(torch.isfinite(g).all()), (agg, g)
        assert all(math.isfinite(v) for v in diag.values()), diag
    if ratio_level == "token" and dtype == F64:
        # tokens with moderate ratios still get the exact closed-form gradient (no pollution)
        loss, g, _ = grad_of(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, agg="token-mean")
        moderate = (extreme == 0) & mask
        r = torch.exp(logp - old)
        A = adv_tok(adv, r)
        expected = -agg_coef(mask, "token-mean") * closed_weight(gate, r, A) * r * A
        assert_close(g[moderate], expected[moderate])


# ----------------------------------------------------------------------------- padding and bad input


@pytest.mark.parametrize("gate", ALL_GATES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize(("agg", "norm_length"), AGGS)
def test_nan_in_padding_is_ignored(gate, ratio_level, agg, norm_length):
    logp, old, adv, mask = make_batch(8, per_token_adv=True)
    ref = logp - 0.3
    kw = dict(gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, ratio_level=ratio_level, agg=agg,
              norm_length=norm_length, kl_beta=0.05)
    clean_loss, clean_g, clean_d = grad_of(logp, old, adv, mask, ref_logp=ref, **kw)
    pad = ~mask
    dirty = [t.masked_fill(pad, v) for t, v in ((logp, float("nan")), (old, float("inf")),
                                                (adv, float("nan")), (ref, -float("inf")))]
    loss, g, d = grad_of(*dirty[:3], mask, ref_logp=dirty[3], **kw)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())
    assert_close(loss, clean_loss, 1e-12)
    assert_close(g, clean_g, 1e-12)
    assert bool((g[pad] == 0).all())
    assert d.keys() == clean_d.keys()
    for k in d:
        assert d[k] == pytest.approx(clean_d[k], abs=1e-12), k


def _bad_inputs():
    logp, old, adv, mask = make_batch(9)
    B, T = logp.shape

    def with_nan(t, i, j, v=float("nan")):
        t = t.clone()
        t[i, j] = v
        return t

    base = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    adv_nan = adv.clone()
    adv_nan[0] = float("nan")
    cases = [
        (dict(gate="nope"),
         r"unknown gate 'nope': known gates are sigmoid, erf, arctan, softsign, softsign_abs, student, clip"),
        (dict(tau_pos=0.0), "tau_pos must be a finite number > 0"),
        (dict(tau_pos=-1.0), "tau_pos must be a finite number > 0"),
        (dict(tau_neg=0), "tau_neg must be a finite number > 0"),
        (dict(tau_neg=float("nan")), "tau_neg must be a finite number > 0"),
        (dict(tau_pos=float("inf")), "tau_pos must be a finite number > 0"),
        (dict(gate="clip", eps_low=-0.1), "eps_low must be a finite number >= 0"),
        (dict(gate="clip", eps_high=-0.01), "eps_high must be a finite number >= 0"),
        (dict(logp=with_nan(logp, 0, 0)), "logp contains NaN or inf at unmasked positions"),
        (dict(old_logp=with_nan(old, 2, 1, float("inf"))), "old_logp contains NaN or inf"),
        (dict(advantages=adv_nan), "advantages contains NaN or inf"),
        (dict(advantages=with_nan(adv_tok(adv, logp).clone(), 1, 0)), "advantages contains NaN or inf"),
        (dict(ref_logp=with_nan(logp, 4, 3, -float("inf")), kl_beta=0.1), "ref_logp contains NaN or inf"),
        (dict(old_logp=torch.zeros(B, T + 1, dtype=F64)), r"old_logp has shape \(6, 10\) but logp has \(6, 9\)"),
        (dict(mask=mask[:, :-1]), "mask has shape"),
        (dict(ref_logp=torch.zeros(B + 1, T, dtype=F64), kl_beta=0.1), "ref_logp has shape"),
        (dict(advantages=torch.zeros(B + 1, dtype=F64)), r"advantages must have shape \(B,\)"),
        (dict(advantages=torch.zeros(B, T, 1, dtype=F64)), "advantages must have shape"),
        (dict(logp=logp[0], old_logp=old[0], mask=mask[0]), r"logp must have shape \(B, T\)"),
        (dict(mask=torch.zeros_like(mask)), "mask is empty"),
        (dict(agg="mean"), "agg must be one of seq-mean-token-mean, token-mean, seq-mean-token-sum-norm"),
        (dict(ratio_level="seq"), "ratio_level must be one of token, sequence"),
        (dict(width="fwhm"), "width must be one of raw, hwhm"),
        (dict(gate="clip", width="fwhm"), "width must be one of raw, hwhm"),
        (dict(log_ratio_clip=0.0), "log_ratio_clip must be > 0"),
        (dict(kl_beta=-0.1), "kl_beta must be a finite number >= 0"),
        (dict(norm_length=0, agg="seq-mean-token-sum-norm"), "norm_length must be > 0"),
    ]
    return [pytest.param({**base, **kw}, match, id=match[:40]) for kw, match in cases]


@pytest.mark.parametrize(("kwargs", "match"), _bad_inputs())
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(**kwargs)


# ----------------------------------------------------------------------------- diagnostics


def test_diagnostics_by_hand():
    ratios = [[0.5, 1.0, 1.3], [1.1, 2.0, 7.0]]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    old = torch.zeros(2, 3, dtype=F64)
    logp = torch.log(torch.tensor(ratios, dtype=F64))
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    r_all = [0.5, 1.0, 1.3, 1.1, 2.0]
    r_pos, r_neg = r_all[:3], r_all[3:]

    def stats(rs):
        mean = sum(rs) / len(rs)
        return {"ratio_mean": mean, "ratio_std": math.sqrt(sum((x - mean) ** 2 for x in rs) / len(rs)),
                "ratio_min": min(rs), "ratio_max": max(rs), "ratio_p05": float(np.percentile(rs, 5)),
                "ratio_p95": float(np.percentile(rs, 95)), "abs_ratio_dev": sum(abs(x - 1) for x in rs) / len(rs),
                "abs_ratio_dev_p95": float(np.percentile([abs(x - 1) for x in rs], 95)),
                "ratio_ess": sum(rs) ** 2 / (len(rs) * sum(x * x for x in rs)), "tokens": float(len(rs))}

    # clip (ε = 0.2): only r = 1.3 with A > 0 is clipped
    _, _, d = grad_of(logp, old, adv, mask, gate="clip")
    expected = {}
    for suffix, rs, w in (("", r_all, [1, 1, 0, 1, 1]), ("_pos", r_pos, [1, 1, 0]), ("_neg", r_neg, [1, 1])):
        expected.update({k + suffix: v for k, v in stats(rs).items()})
        expected[f"gate_weight{suffix}"] = sum(w) / len(w)
        expected[f"frac_w_lt_0.5{suffix}"] = sum(x < 0.5 for x in w) / len(w)
        expected[f"frac_w_lt_0.1{suffix}"] = sum(x < 0.1 for x in w) / len(w)
        expected[f"clip_frac{suffix}"] = 1 - sum(w) / len(w)
        expected[f"eur{suffix}"] = sum(w) / len(w)  # no groups: the token mean of w
    assert d.keys() == expected.keys()
    for k, v in expected.items():
        assert type(d[k]) is float, k
        assert d[k] == pytest.approx(v, abs=1e-12), k

    # sigmoid with τ_pos = 1, τ_neg = 2: w = sech²(τ(r − 1)/2); r = 2 with τ = 2 gives sech²(1) ≈ 0.42 < 0.5
    _, _, d = grad_of(logp, old, adv, mask, gate="sigmoid", tau_pos=1.0, tau_neg=2.0)
    w_pos = [1.0 / math.cosh(0.5 * (x - 1.0)) ** 2 for x in r_pos]
    w_neg = [1.0 / math.cosh(x - 1.0) ** 2 for x in r_neg]
    for suffix, w in (("", w_pos + w_neg), ("_pos", w_pos), ("_neg", w_neg)):
        assert d[f"gate_weight{suffix}"] == pytest.approx(sum(w) / len(w), abs=1e-12)
        assert d[f"frac_w_lt_0.5{suffix}"] == pytest.approx(sum(x < 0.5 for x in w) / len(w), abs=1e-12)
        assert d[f"frac_w_lt_0.1{suffix}"] == 0.0
        assert f"clip_frac{suffix}" not in d
    assert d["frac_w_lt_0.5"] == pytest.approx(0.2) and d["frac_w_lt_0.5_neg"] == pytest.approx(0.5)
    assert all(type(v) is float for v in d.values())


@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28), (0.05, 0.05)])
def test_clip_mean_weight_is_one_minus_clip_frac(eps_low, eps_high):
    logp, old, adv, mask = make_batch(10, per_token_adv=True)
    _, _, d = grad_of(logp, old, adv, mask, gate="clip", eps_low=eps_low, eps_high=eps_high)
    for suffix in ("", "_pos", "_neg"):
        assert 0.0 < d[f"clip_frac{suffix}"] < 1.0
        assert d[f"gate_weight{suffix}"] == pytest.approx(1.0 - d[f"clip_frac{suffix}"], abs=1e-12)


def test_diagnostics_off_returns_empty_and_same_loss():
    logp, old, adv, mask = make_batch(11)
    on, g_on, d_on = grad_of(logp, old, adv, mask, gate="softsign")
    off, g_off, d_off = grad_of(logp, old, adv, mask, gate="softsign", diagnostics=False)
    assert d_off == {} and d_on
    assert float(on) == float(off)
    assert torch.equal(g_on, g_off)


def test_float32_matches_float64():
    logp, old, adv, mask = make_batch(12, per_token_adv=True)
    for gate in ALL_GATES:
        l64, g64, _ = grad_of(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG)
        l32, g32, _ = grad_of(logp.float(), old.float(), adv.float(), mask, gate=gate, tau_pos=TAU_POS,
                              tau_neg=TAU_NEG)
        assert l32.dtype == torch.float32 and g32.dtype == torch.float32
        torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- EUR (arXiv 2602.19345 eq. 12)


@pytest.mark.parametrize("gate", ALL_GATES)
def test_eur_by_hand_three_prompts_four_completions(gate):
    """3 prompts x 4 completions, ragged lengths, both advantage signs: EUR = mean over prompts of
    (sum of f'(r) over the group's tokens) / (the group's token count), written out loop by loop."""
    gen = torch.Generator().manual_seed(11)
    B, T, G = 12, 6, 4
    logp = -2.0 * torch.rand(B, T, generator=gen, dtype=F64)
    old = logp - 0.6 * (torch.rand(B, T, generator=gen, dtype=F64) - 0.5)
    lengths = [6, 1, 4, 3, 2, 6, 5, 1, 3, 6, 2, 4]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3, 1.2, -0.1, 0.7, -0.9], dtype=F64)
    groups = torch.arange(B) // G
    _, diag = policy_loss(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, eps_low=EPS_LOW,
                          eps_high=EPS_HIGH, groups=groups)
    r = torch.exp(logp - old)
    w = closed_weight(gate, r, adv[:, None].expand_as(r))
    for suffix, keep in (("", lambda a: True), ("_pos", lambda a: a > 0), ("_neg", lambda a: a <= 0)):
        per_prompt = []
        for b in range(B // G):
            num = den = 0.0
            for j in range(b * G, (b + 1) * G):
                if not keep(float(adv[j])):
                    continue
                for t in range(lengths[j]):
                    num += float(w[j, t])
                    den += 1
            if den:
                per_prompt.append(num / den)
        assert diag[f"eur{suffix}"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-6), suffix
    # without groups: the token mean of w (= the gate_weight diagnostic); with groups it differs here
    _, flat = policy_loss(logp, old, adv, mask, gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, eps_low=EPS_LOW,
                          eps_high=EPS_HIGH)
    assert flat["eur"] == pytest.approx(float(w[mask].mean()), abs=1e-9) == pytest.approx(flat["gate_weight"])
    if gate == "clip":
        assert flat["eur"] == pytest.approx(1.0 - flat["clip_frac"], abs=1e-12)
    assert float(w[mask].min()) < 0.99  # the gate acts on this batch, so EUR is a real check


def test_eur_groups_must_match_rows():
    logp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match="groups must have shape"):
        policy_loss(logp, old, adv, mask, groups=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 10.0, 12.0])
def test_paper_softsign_gradient_is_its_closed_form(tau):
    """The paper's softsign (eq. 8): d loss / d log pi = -c (1 + y^2)^(-3/2) r A with y = tau (r - 1)."""
    logp, old, adv, mask = make_batch(3)
    _, g, _ = grad_of(logp, old, adv, mask, gate="softsign", tau_pos=tau, tau_neg=tau)
    r = torch.exp(logp - old)
    y = tau * (r - 1.0)
    expected = -agg_coef(mask, "seq-mean-token-mean") * (1.0 + y * y) ** -1.5 * r * adv_tok(adv, r)
    assert_close(g, expected, tol=1e-6)


def test_eur_is_not_one_minus_the_clip_fraction_when_groups_differ_in_size():
    """For clip, EUR is one minus the clip fraction of each group, averaged over groups; ``clip_frac`` is one token
    mean over the batch. A 10-token group with nothing clipped and a 100-token group with 10 tokens clipped:
    EUR = (1 + 0.9)/2 = 0.95, 1 − clip_frac = 1 − 10/110."""
    T = 100
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, :10] = True
    mask[1] = True
    log_r = torch.zeros(2, T, dtype=F64)
    log_r[1, :10] = math.log(1.5)  # clipped at 1 + ε for A > 0
    adv = torch.tensor([1.0, 1.0], dtype=F64)
    _, d = policy_loss(log_r, torch.zeros(2, T, dtype=F64), adv, mask, gate="clip", groups=torch.tensor([0, 1]))
    assert d["eur"] == pytest.approx(0.95, abs=1e-12)
    assert d["clip_frac"] == pytest.approx(10 / 110, abs=1e-12)
    assert 1.0 - d["clip_frac"] == pytest.approx(0.909, abs=1e-3)
    # the same groups with equal token counts: then the two agree
    _, even = policy_loss(log_r[[1, 1]], torch.zeros(2, T, dtype=F64), adv, mask[[1, 1]], gate="clip",
                          groups=torch.tensor([0, 1]))
    assert even["eur"] == pytest.approx(1.0 - even["clip_frac"], abs=1e-12)


@pytest.mark.parametrize("gate", ALL_GATES)
def test_eur_covers_every_row_the_statistics_only_the_trained_ones(gate):
    """``trained`` marks the rows that went through the update (e.g. zero-variance groups left out of the passes
    are not): EUR is eq. 12 over every row, A = 0 rows included (and in ``eur_neg``), written out by hand; every
    other diagnostic is what the trained rows alone give; the loss does not change."""
    gen = torch.Generator().manual_seed(5)
    B, T, G = 12, 6, 4
    logp = -2.0 * torch.rand(B, T, generator=gen, dtype=F64)
    old = logp - 0.6 * (torch.rand(B, T, generator=gen, dtype=F64) - 0.5)
    lengths = torch.tensor([6, 1, 4, 3, 2, 6, 5, 1, 3, 6, 2, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 1.2, -0.1, 0.7, -0.8], dtype=F64)
    groups = torch.arange(B) // G
    trained = adv.view(-1, G).ne(0).any(-1).repeat_interleave(G)  # prompt 1 had zero reward variance
    kw = dict(gate=gate, tau_pos=TAU_POS, tau_neg=TAU_NEG, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    loss, d = policy_loss(logp, old, adv, mask, groups=groups, trained=trained, **kw)
    w = closed_weight(gate, torch.exp(logp - old), adv[:, None].expand(B, T))
    for suffix, keep in (("", lambda a: True), ("_pos", lambda a: a > 0), ("_neg", lambda a: a <= 0)):
        per_prompt = []
        for b in range(B // G):
            rows = [j for j in range(b * G, (b + 1) * G) if keep(float(adv[j]))]
            den = sum(int(lengths[j]) for j in rows)
            if den:
                per_prompt.append(sum(float(w[j, t]) for j in rows for t in range(int(lengths[j]))) / den)
        assert d[f"eur{suffix}"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-12), suffix
    # the zero-variance prompt counts: leaving its rows out changes EUR
    _, only = policy_loss(logp[trained], old[trained], adv[trained], mask[trained], groups=groups[trained], **kw)
    assert abs(only["eur"] - d["eur"]) > 1e-3
    assert {k: v for k, v in d.items() if not k.startswith("eur")} == {
        k: v for k, v in only.items() if not k.startswith("eur")}
    assert d["eur_pos"] == only["eur_pos"]  # every A > 0 row trained
    assert float(loss) == float(policy_loss(logp, old, adv, mask, diagnostics=False, **kw)[0])


def test_eur_without_trained_rows_is_the_only_diagnostic():
    """A step where every group had zero variance trains no row: EUR (eq. 12 still defines it) is all there is."""
    logp, old, _, mask = make_batch(4)
    adv = torch.zeros(mask.shape[0], dtype=F64)
    _, d = policy_loss(logp, old, adv, mask, gate="erf", groups=torch.arange(6) // 3,
                       trained=torch.zeros(6, dtype=torch.bool))
    assert set(d) == {"eur", "eur_neg"} and 0.0 < d["eur"] == d["eur_neg"] < 1.0
    with pytest.raises(ValueError, match="trained must have shape"):
        policy_loss(logp, old, adv, mask, trained=torch.ones(3, dtype=torch.bool))
