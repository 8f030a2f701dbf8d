"""The Student-t gate family (`gate=student gate.nu=...`): F against an independent computation (scipy's Student-t
CDF), its limits (arctan at ν = 1, the paper's softsign at ν = 2 and τ·√2, erf as ν → ∞), its exact gradient,
admissibility per ν, bad ν, and the loss through `policy_loss`."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as sps

from harness import gates as G
from harness.objective import policy_loss

NUS = (1.0, 1.5, 2.0, 3.0, 4.0, 7.5, 16.0, 100.0)
X = torch.cat([torch.linspace(-50.0, 50.0, 2001, dtype=torch.float64), torch.tensor([-1e4, -1.0, 1.0, 1e4],
                                                                                    dtype=torch.float64)])


@pytest.mark.parametrize("nu", NUS)
def test_F_is_the_student_t_cdf_rescaled(nu):
    """F_ν(x) = ∫_0^x (1 + s²/ν)^(−(ν+1)/2) ds = (T_ν(x) − ½) / p_ν(0), with T_ν, p_ν scipy's t CDF and density."""
    g = G.get_gate("student", nu=nu)
    want = (sps.t.cdf(X.numpy(), nu) - 0.5) / sps.t.pdf(0.0, nu)
    got = g.F(X).numpy()
    assert abs(got - want).max() < 1e-9 * max(1.0, abs(want).max())
    assert g.F0 == 0.0


@pytest.mark.parametrize("nu", NUS)
def test_gradient_is_the_exact_weight_and_hwhm_is_closed_form(nu):
    g = G.get_gate("student", nu=nu)
    x = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g.F(x).sum(), x)
    w = (1.0 + X**2 / nu) ** (-(nu + 1.0) / 2.0)
    assert torch.allclose(grad, w, rtol=1e-12, atol=0.0)
    h = math.sqrt(nu * (2.0 ** (2.0 / (nu + 1.0)) - 1.0))
    assert g.hwhm == pytest.approx(h, rel=1e-12)
    assert float(g.weight_x(torch.tensor(h, dtype=torch.float64))) == pytest.approx(0.5, rel=1e-12)


def test_nu_1_is_arctan_and_nu_2_at_tau_sqrt2_is_the_papers_softsign():
    r = torch.linspace(0.01, 3.0, 997, dtype=torch.float64)
    cauchy, arctan = G.get_gate("student", nu=1.0), G.get_gate("arctan")
    for tau in (1.0, 10.0):
        assert torch.allclose(cauchy.value(r, tau), arctan.value(r, tau), rtol=0, atol=1e-12)
    t2, softsign = G.get_gate("student", nu=2.0), G.get_gate("softsign")
    for tau in (1.0, 10.0):
        assert torch.allclose(t2.value(r, tau * math.sqrt(2.0)), softsign.value(r, tau), rtol=0, atol=1e-12)


def test_large_nu_tends_to_erf():
    """w_ν(x) → exp(−x²/2) with error O(1/ν): the gap shrinks tenfold from ν = 100 to ν = 1000."""
    r = torch.linspace(0.5, 1.5, 501, dtype=torch.float64)
    erf = G.get_gate("erf")
    gaps = [float((G.get_gate("student", nu=nu).value(r, 10.0) - erf.value(r, 10.0)).abs().max())
            for nu in (100.0, 1000.0)]
    assert gaps[1] < 1e-3 and gaps[0] / gaps[1] == pytest.approx(10.0, rel=0.2)


@pytest.mark.parametrize("nu", (1.0, 2.0, 4.0, 1000.0))
def test_every_nu_is_admissible(nu):
    checks = G.check_admissible(G.get_gate("student", nu=nu))
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize("nu", (0.5, -1.0, float("inf"), float("nan"), "two"))
def test_bad_nu_names_the_key_and_the_range(nu):
    with pytest.raises(ValueError, match=r"gate\.nu must be a number in \[1, "):
        G.get_gate("student", nu=nu)


def test_student_needs_nu():
    with pytest.raises(ValueError, match=r"gate\.nu"):
        G.get_gate("student")


def test_policy_loss_on_student_equals_the_arctan_loss_at_nu_1():
    """The loss value (not only its gradient) goes through the quadrature: at ν = 1 it must equal arctan's."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 16, generator=gen, dtype=torch.float64) * 0.1 - 1.0).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 16, generator=gen, dtype=torch.float64) * 0.1
    adv, mask = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64), torch.ones(4, 16, dtype=torch.float64)
    out = {}
    for name, extra in (("student", {"nu": 1.0}), ("arctan", {})):
        loss, _ = policy_loss(logp, old, adv, mask, gate=name, tau_pos=10.0, tau_neg=12.0, **extra)
        (grad,) = torch.autograd.grad(loss, logp)
        out[name] = (float(loss.detach()), grad)
    assert out["student"][0] == pytest.approx(out["arctan"][0], abs=1e-12)
    assert torch.allclose(out["student"][1], out["arctan"][1], atol=1e-12, rtol=0)
