"""Gate functions (harness.gates): closed forms, half-widths, resolution, admissibility checker."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness import gates as G

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "tests.custom_gate_module"

# Closed-form F' written independently of harness.gates.
SIG = lambda x: 4.0 * torch.sigmoid(x) * (1.0 - torch.sigmoid(x))
CLOSED_DF = {
    "sigmoid": SIG,
    "erf": lambda x: torch.exp(-0.5 * x**2),
    "arctan": lambda x: 1.0 / (1.0 + x**2),
    "softsign": lambda x: (1.0 + x**2) ** -1.5,  # the paper's eq. (8): F = x/sqrt(1+x^2)
    "softsign_abs": lambda x: 1.0 / (1.0 + x.abs()) ** 2,
}
# Half-widths at half maximum of F' in x (../shared/PAPER.md): solve F'(h) = 1/2 by hand.
HWHM = {
    "sigmoid": 2.0 * math.acosh(math.sqrt(2.0)),
    "erf": math.sqrt(2.0 * math.log(2.0)),
    "arctan": 1.0,
    "softsign": math.sqrt(2.0 ** (2.0 / 3.0) - 1.0),  # (1+h^2)^(3/2) = 2
    "softsign_abs": math.sqrt(2.0) - 1.0,
}
# Integrals of F' over x: F(+inf) - F(-inf).
INTEGRAL = {"sigmoid": 4.0, "erf": math.sqrt(2.0 * math.pi), "arctan": math.pi, "softsign": 2.0, "softsign_abs": 2.0}


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def xs() -> torch.Tensor:
    return torch.cat([torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64), torch.tensor([0.0, 1e3, -1e3])])


def test_builtin_registry_is_what_the_docs_say():
    assert G.SMOOTH_GATES == ("sigmoid", "erf", "arctan", "softsign", "softsign_abs")
    assert G.BUILTIN_GATES == (*G.SMOOTH_GATES, "clip")
    # the Student-t family is a gate per tail index (gate.nu), named apart from the five fixed shapes
    assert G.known_gates() == (*G.SMOOTH_GATES, G.STUDENT, "clip", *G.RATIO_CONTROL[1:])
    assert G.RATIO_CONTROL == ("clip", "dual_clip", "cispo", "cispo_two_sided", "gmpo", "gppo", "dppo_tv", "dppo_kl",
                               "gpg", "dro", "kl_cov", "clip_cov", "vespo")


@pytest.mark.parametrize("name", list(CLOSED_DF))
def test_builtin_weight_matches_closed_form(name):
    g = G.get_gate(name)
    x = xs()
    torch.testing.assert_close(g.weight_x(x), CLOSED_DF[name](x), rtol=1e-12, atol=1e-14)
    # The declared closed-form dF is the derivative of F (autograd on F itself).
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(g.F(xg).sum(), xg)
    torch.testing.assert_close(auto, CLOSED_DF[name](x), rtol=1e-9, atol=1e-12)
    assert float(g.weight_x(torch.zeros((), dtype=torch.float64))) == 1.0


@pytest.mark.parametrize("name", list(CLOSED_DF))
def test_F_spans_documented_integral(name):
    g = G.get_gate(name)
    big = torch.tensor([-1e12, 1e12], dtype=torch.float64)
    lo, hi = g.F(big).tolist()
    assert hi - lo == pytest.approx(INTEGRAL[name], rel=1e-9)


@pytest.mark.parametrize("name", list(CLOSED_DF))
@pytest.mark.parametrize("tau", [0.3, 1.0, 1.05, 7.0])
def test_value_is_one_at_r1_nonnegative_and_differentiates_to_weight(name, tau):
    g = G.get_gate(name)
    assert float(g.value(torch.tensor(1.0, dtype=torch.float64), tau)) == pytest.approx(1.0, abs=1e-15)
    r = torch.linspace(0.0, 2.0, 401, dtype=torch.float64)
    assert bool((g.value(r, tau) >= -1e-12).all()), "f_tau(r) must stay >= 0 on [0, 2]"
    # f_tau(r) = 1 + (F(tau(r-1)) - F(0))/tau, so df/dr = F'(tau (r-1)).
    rg = torch.linspace(-1.0, 4.0, 501, dtype=torch.float64).requires_grad_(True)
    (df,) = torch.autograd.grad(g.value(rg, tau).sum(), rg)
    x = tau * (rg.detach() - 1.0)
    torch.testing.assert_close(df, CLOSED_DF[name](x), rtol=1e-9, atol=1e-12)
    tt = torch.full_like(x, tau)
    w = g.weight(rg.detach(), torch.ones_like(x), tt)
    torch.testing.assert_close(w, CLOSED_DF[name](x), rtol=1e-12, atol=1e-14)


def test_sigmoid_value_is_sapo_plus_documented_constant():
    g = G.get_gate("sigmoid")
    r = torch.linspace(0.0, 3.0, 61, dtype=torch.float64)
    for tau in (0.5, 1.0, 1.05, 4.0):
        sapo = 4.0 / tau * torch.sigmoid(tau * (r - 1.0))
        torch.testing.assert_close(g.value(r, tau) - sapo, torch.full_like(r, 1.0 - 2.0 / tau), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CLOSED_DF))
def test_declared_hwhm_is_the_measured_one(name):
    g = G.get_gate(name)
    assert g.hwhm == pytest.approx(HWHM[name], rel=1e-12)
    # bisection on the closed form, independent of the module's helper
    assert _half_point(CLOSED_DF[name]) == pytest.approx(HWHM[name], abs=1e-10)
    assert G._numeric_hwhm(g.weight_x) == pytest.approx(HWHM[name], abs=1e-10)
    assert G.SIGMOID_HWHM == pytest.approx(HWHM["sigmoid"], rel=1e-15)


def _half_point(w, lo: float = 0.0, hi: float = 50.0) -> float:
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(w(torch.tensor(mid, dtype=torch.float64))) > 0.5:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def test_custom_gate_by_import_path():
    from tests import custom_gate_module as cgm

    g = G.get_gate(f"{CUSTOM}:F")
    assert isinstance(g, G.SmoothGate)
    assert g.F0 == 0.0
    x = xs()
    torch.testing.assert_close(g.weight_x(x), cgm.d_F(x), rtol=1e-10, atol=1e-14)  # autograd F'
    assert g.hwhm == pytest.approx(cgm.F_HWHM, abs=1e-10)  # numeric half-width
    assert G.effective_tau(g, 2.0, "hwhm") == pytest.approx(2.0 * cgm.F_HWHM / HWHM["sigmoid"], rel=1e-9)
    # resolved once: building the gate runs a numeric half-width search, too slow for every loss call
    assert G.get_gate(f"{CUSTOM}:F") is g


def test_get_gate_accepts_objects_factories_and_target_mappings():
    from tests import custom_gate_module as cgm

    sg = G.SmoothGate(name="mine", F=cgm.F, dF=cgm.d_F)
    assert G.get_gate(sg) is sg
    cg = G.ClipGate(eps_low=0.1, eps_high=0.3)
    assert G.get_gate(cg) is cg
    g = G.get_gate({"_target_": "harness.gates.ClipGate", "eps_low": 0.1, "eps_high": 0.3})
    assert g == cg
    clip = G.get_gate("clip", eps_low=0.15, eps_high=0.28)
    assert (clip.eps_low, clip.eps_high) == (0.15, 0.28)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown gate 'nope': known gates are sigmoid, erf, arctan, softsign, softsign_abs, student, clip"),
        ("Sigmoid", "known gates are"),
        ("", "gate must be a name"),
        (3, "gate must be a name"),
        ("no_such_module_xyz:F", "cannot import module 'no_such_module_xyz'"),
        (f"{CUSTOM}:NO_SUCH_F", "has no attribute 'NO_SUCH_F'"),
        (f"{CUSTOM}:NOT_ELEMENTWISE", "elementwise"),
        (f"{CUSTOM}:BUMP_AT", "neither a base function"),
        ({"eps_low": 0.1}, "_target_"),
    ],
)
def test_get_gate_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        G.get_gate(spec)


@pytest.mark.parametrize("kw", [{"eps_low": -0.1}, {"eps_high": -1e-9}, {"eps_low": float("nan")},
                                {"eps_high": float("inf")}])
def test_clip_rejects_bad_eps(kw):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        G.ClipGate(**kw)
    with pytest.raises(ValueError, match="eps_"):
        G.get_gate("clip", **kw)


def test_register_gate_refuses_duplicates():
    for name in ("sigmoid", "clip"):
        with pytest.raises(ValueError, match="already registered"):
            G.register_gate(name)(lambda x: x)


def test_clip_weight_and_value_by_sign():
    g = G.ClipGate(eps_low=0.2, eps_high=0.28)
    r = torch.tensor([0.7, 0.79, 0.81, 1.0, 1.25, 1.27, 1.29, 2.0], dtype=torch.float64)
    assert g.weight_x(r - 1.0, 1).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert g.weight_x(r - 1.0, -1).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # effective gate value: min(r, clip(r)) for A > 0, max(r, clip(r)) for A < 0
    torch.testing.assert_close(g.value(r, sign=1), torch.minimum(r, r.clamp(0.8, 1.28)))
    torch.testing.assert_close(g.value(r, sign=-1), torch.maximum(r, r.clamp(0.8, 1.28)))


def test_effective_tau():
    for name in CLOSED_DF:
        g = G.get_gate(name)
        assert G.effective_tau(g, 3.0) == 3.0
        assert G.effective_tau(g, 3.0, "raw") == 3.0
        assert G.effective_tau(g, 3.0, "hwhm") == pytest.approx(3.0 * HWHM[name] / HWHM["sigmoid"], rel=1e-12)
    assert G.effective_tau(G.get_gate("clip"), 3.0, "hwhm") == 3.0
    for bad in ("HWHM", "fwhm", ""):
        with pytest.raises(ValueError, match=r"gate\.width must be one of raw, hwhm"):
            G.effective_tau(G.get_gate("sigmoid"), 1.0, bad)


def test_hwhm_width_refuses_a_gate_without_half_width():
    g = G.get_gate(f"{CUSTOM}:LINEAR")  # F' ≡ 1 never falls to 1/2: τ_g would be inf and the loss NaN
    assert g.hwhm == float("inf")
    assert G.effective_tau(g, 1.0, "raw") == 1.0
    with pytest.raises(ValueError, match="width='hwhm' needs a finite half-width"):
        G.effective_tau(g, 1.0, "hwhm")


def _measured_half_widths(g, tau: float) -> tuple[float, float]:
    """Distances from r = 1 to where the actual w(r) falls to 1/2, right and left (bisection)."""

    def w(r: float) -> float:
        rt = torch.tensor([r], dtype=torch.float64)
        return float(g.weight(rt, torch.ones_like(rt), torch.full_like(rt, tau)))

    def side(sign: float) -> float:
        lo, hi = 0.0, 1.0
        while w(1.0 + sign * hi) > 0.5:
            hi *= 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if w(1.0 + sign * mid) > 0.5 else (lo, mid)
        return 0.5 * (lo + hi)

    return side(1.0), side(-1.0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.05, 4.0, 10.0])
def test_hwhm_width_mode_equalises_measured_half_widths(tau):
    widths = {}
    for name in G.SMOOTH_GATES:
        g = G.get_gate(name)
        right, left = _measured_half_widths(g, G.effective_tau(g, tau, "hwhm"))
        assert right == pytest.approx(left, abs=1e-9)
        widths[name] = right
    target = HWHM["sigmoid"] / tau
    for name, h in widths.items():
        assert h == pytest.approx(target, abs=1e-4), (name, widths)
    # ... while in raw mode they really differ (the comparison above is not vacuous)
    raw = {n: _measured_half_widths(G.get_gate(n), tau)[0] for n in G.SMOOTH_GATES}
    assert max(raw.values()) - min(raw.values()) > 1.0 / tau
    for name, h in raw.items():
        assert h == pytest.approx(HWHM[name] / tau, abs=1e-9)


# ----------------------------------------------------------------------------- admissibility


def _verdicts(gate) -> list[bool]:
    results = G.check_admissible(gate)
    assert [r.name.split()[0] for r in results] == ["(i)", "(ii)", "(iii)", "(iv)"]
    return [r.passed for r in results]


@pytest.mark.parametrize("name", [*G.SMOOTH_GATES, f"{CUSTOM}:F"])
def test_admissible_gates_pass_all_four(name):
    results = G.check_admissible(G.get_gate(name))
    assert [r.passed for r in results] == [True] * 4
    assert all(r.worst_x is None for r in results)


def test_clip_fails_continuity_and_tail_only():
    results = G.check_admissible(G.get_gate("clip"))
    assert [r.passed for r in results] == [False, True, True, False]
    assert results[0].worst_x == pytest.approx(0.2, abs=1e-3)  # the A > 0 jump at r = 1 + eps_high
    assert "A<0" in results[0].detail and "A>0" in results[0].detail
    assert "A<0" in results[3].detail and "A>0" not in results[3].detail  # w stays 1 for A < 0 as r grows
    dapo = G.check_admissible(G.ClipGate(eps_low=0.2, eps_high=0.28))
    assert dapo[0].worst_x == pytest.approx(0.28, abs=1e-3)


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        ("LINEAR", [True, True, True, False]),  # F(x) = x: no vanishing tail
        ("HALF_SLOPE", [True, False, True, True]),  # F'(0) = 1/2
        ("BUMP", [True, True, False, True]),  # F' rises again near x = 5
        ("STEP", [False, True, True, True]),  # F' jumps from 1 to 1/2 at |x| = 1
        ("SLOW_TAIL", [True, True, True, False]),  # F' ~ x^-0.9 -> 0, but F'(x)·x ~ x^0.1 grows
    ],
)
def test_bad_custom_gates_fail_the_right_property(attr, expected):
    from tests import custom_gate_module as cgm

    gate = G.get_gate(f"{CUSTOM}:{attr}")
    results = G.check_admissible(gate)
    assert [r.passed for r in results] == expected, [(r.name, r.detail) for r in results]
    failed = next(r for r in results if not r.passed)
    if attr == "BUMP":
        # rises between the trough near x = 4.3 and the bump top at x = 5
        assert 3.5 < failed.worst_x < cgm.BUMP_AT
        x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
        torch.testing.assert_close(gate.weight_x(x), cgm.d_BUMP(x), rtol=1e-9, atol=1e-12)
    if attr == "STEP":
        assert abs(abs(failed.worst_x) - 1.0) < 1e-3
    if attr == "SLOW_TAIL":
        x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
        torch.testing.assert_close(gate.weight_x(x), cgm.d_SLOW_TAIL(x), rtol=1e-9, atol=1e-12)
        assert float(cgm.d_SLOW_TAIL(torch.tensor(1e6, dtype=torch.float64))) < 1e-5  # F' alone does vanish
        assert "log-log slope 0.10" in failed.detail
    if attr == "HALF_SLOPE":
        assert failed.worst_x == 0.0 and "F'(0)=0.5" in failed.detail
