r"""Gate functions for soft advantage policy optimisation.

A *smooth gate* is built from a base function :math:`F:\mathbb{R}\to\mathbb{R}` with

.. math::  F'(0) = 1, \qquad 0 \le F'(x) \le 1 .

With the importance ratio :math:`r = \pi_\theta / \pi_{old}`, a temperature :math:`\tau > 0` and
:math:`x = \tau (r - 1)`, the gate value and its gradient weight are

.. math::

    f_\tau(r) = 1 + \frac{F(x) - F(0)}{\tau}, \qquad
    w_\tau(r) = f_\tau'(r) = F'(x).

So :math:`f_\tau(1) = 1` (on-policy, every gate equals the plain policy-gradient surrogate
:math:`r A`), and since :math:`|F(x) - F(0)| \le |x|`, :math:`f_\tau(r) \ge 1 - |r - 1| \ge 0` for
:math:`0 \le r \le 2`; for :math:`r > 2` the gate only grows. The per-token surrogate is
:math:`f_\tau(r) A` and its gradient :math:`w_\tau(r)\, r\, A\, \nabla \log \pi_\theta`.
The temperature is :math:`\tau_{pos}` for tokens with :math:`A > 0`, else :math:`\tau_{neg}`.

Built-in base functions (closed-form F and F'):

============  ==========================  ===========================  =============================  ========
name          F(x)                        F'(x)                        HWHM of F' in x                tail
============  ==========================  ===========================  =============================  ========
sigmoid       4 σ(x)                      sech²(x/2) = 4σ(x)(1−σ(x))   2·acosh(√2) ≈ 1.76275          exp(−x)
erf           √(2π) Φ(x)                  exp(−x²/2)                   √(2 ln 2) ≈ 1.17741            Gaussian
arctan        arctan(x)                   1/(1+x²)                     1                              x⁻²
softsign      x/√(1+x²)                   (1+x²)^(−3/2)                √(2^(2/3) − 1) ≈ 0.76642       x⁻³
softsign_abs  x/(1+|x|)                   1/(1+|x|)²                   √2 − 1 ≈ 0.41421               x⁻²
============  ==========================  ===========================  =============================  ========

``softsign`` is the paper's (arXiv 2602.19345 v2, eq. 8: f(r) = 1 + (r − 1)/√(1 + y²)), the algebraic sigmoid.
``softsign_abs`` is the Keras/PyTorch softsign x/(1+|x|) (an earlier version of this harness called it
``softsign``): its weight has a cusp at r = 1 and a heavier x⁻² tail.

``sigmoid`` is SAPO's gate (arXiv 2511.20347) up to an additive constant:
:math:`f_\tau(r) = \tfrac{4}{\tau}\sigma(\tau(r-1)) + 1 - \tfrac{2}{\tau}`, so gradients are
identical and values differ by the constant :math:`1 - 2/\tau` times A.

``clip`` is GRPO/PPO's hard clip, :math:`\min(rA,\ \mathrm{clip}(r, 1-\epsilon_{low},
1+\epsilon_{high}) A)` with :math:`\epsilon_{low} = \epsilon_{high} = 0.2` by default (DAPO's
"clip-higher" raises :math:`\epsilon_{high}`). Its gradient weight is 1 where the unclipped branch is
active and 0 where it is clipped; it is the baseline, and not admissible.

Temperature scaling. The smooth-gates paper (arXiv 2602.19345) does not give the exact scaling of
its non-sigmoid gates. This module uses the *same* map x = τ(r − 1) for every family (``width=
"raw"``), so a given τ means the same thing for the location of the peak but each family has its own
peak width. With ``width="hwhm"`` the τ you give is read as a *sigmoid-equivalent* temperature:
gate g is run at :math:`\tau_g = \tau \cdot h_g / h_{sigmoid}` where :math:`h` is the half-width at
half maximum of F' in x, so every gate's w(r) has the same half-width :math:`h_{sigmoid}/\tau`
in r and the families differ only in the shape of the tail.

Custom gates: pass ``"pkg.module:F"`` (an elementwise torch function with F'(0) = 1, or a
:class:`Gate` instance, or a zero-argument factory returning either) anywhere a gate name is
accepted; F' is then obtained by autograd and the half-width numerically.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.config import ConfigError, import_object
from harness.methods import METHOD_KEYS, METHODS, RatioMethod, clip_surrogate, make_method

BaseFn = Callable[[Tensor], Tensor]
log = logging.getLogger(__name__)

WIDTH_MODES = ("raw", "hwhm")
DUAL_CLIP = "dual_clip"
DUAL_CLIP_C = 3.0  # verl's clip_ratio_c default
# The names without a temperature: clip, dual-clip and the methods of harness.methods.
RATIO_CONTROL: tuple[str, ...] = ("clip", DUAL_CLIP, *METHODS)


@dataclass(frozen=True)
class SmoothGate:
    """A gate built from a base function F (see the module docstring for the math).

    ``dF`` is the closed-form derivative; when ``None`` it is computed by autograd.
    ``hwhm`` is the half-width at half maximum of F' in x; when ``None`` it is found numerically.
    """

    name: str
    F: BaseFn
    dF: BaseFn | None = None
    hwhm: float | None = None
    F0: float = field(default=float("nan"))

    def __post_init__(self) -> None:
        if math.isnan(self.F0):
            object.__setattr__(self, "F0", float(self.F(torch.zeros((), dtype=torch.float64))))
        if self.hwhm is None:
            object.__setattr__(self, "hwhm", _numeric_hwhm(self.weight_x))

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        """F'(x): the gradient weight as a function of x = τ(r − 1) (same for both signs)."""
        if self.dF is not None:
            return self.dF(x)
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.F(xg).sum(), xg)
        return grad.detach()

    def surrogate(self, ratio: Tensor, advantages: Tensor, tau: Tensor) -> Tensor:
        """Per-token surrogate f_τ(r)·A (differentiable in ``ratio``)."""
        x = tau * (ratio - 1.0)
        return (1.0 + (self.F(x) - self.F0) / tau) * advantages

    def weight(self, ratio: Tensor, advantages: Tensor, tau: Tensor) -> Tensor:
        """Gradient weight w_τ(r) = F'(τ(r − 1)) per token (no gradient)."""
        return self.weight_x(tau * (ratio - 1.0))

    def value(self, ratio: Tensor, tau: float) -> Tensor:
        """Gate value f_τ(r) (for plots and checks)."""
        x = tau * (ratio - 1.0)
        return 1.0 + (self.F(x) - self.F0) / tau


@dataclass(frozen=True)
class ClipGate:
    r"""GRPO/PPO hard clipping: surrogate min(rA, clip(r, 1 − ε_low, 1 + ε_high)·A).

    Gradient weight: 1 where the unclipped term rA is the active branch of the min, else 0.
    Temperatures are ignored.

    Dual-clip (``clip_c``, arXiv 1912.09729; verl's ``clip_ratio_c``, on by default at 3.0 in its ``vanilla`` loss;
    TRL's ``delta``, INTELLECT-2's two-sided clip): for A < 0 the surrogate is also bounded below,
    :math:`\max(\min(rA, \mathrm{clip}(r)A),\ cA)`, so a negative-advantage token whose ratio has run past c
    stops pushing (weight 0 there too).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    name: str = "clip"
    hwhm: float | None = None
    clip_c: float | None = None

    def __post_init__(self) -> None:
        for key, eps in (("eps_low", self.eps_low), ("eps_high", self.eps_high)):
            if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
                raise ValueError(f"gate.{key} must be a finite number >= 0, got {eps!r}")
        c = self.clip_c
        if c is not None and not (isinstance(c, int | float) and math.isfinite(c) and c > 1):
            raise ValueError(f"gate.clip_c must be a finite number > 1 (the dual-clip bound on r for A < 0), got {c!r}")

    def surrogate(self, ratio: Tensor, advantages: Tensor, tau: Tensor | None = None) -> Tensor:
        out = clip_surrogate(ratio, advantages, self.eps_low, self.eps_high)
        if self.clip_c is not None:
            out = torch.where(advantages < 0, torch.maximum(out, self.clip_c * advantages), out)
        return out

    def clipped(self, ratio: Tensor, advantages: Tensor) -> Tensor:
        """Boolean mask of tokens whose gradient the clip removes."""
        pos = advantages > 0
        low = ratio < 1.0 - self.eps_low
        if self.clip_c is not None:
            low = low | (ratio > self.clip_c)
        return torch.where(pos, ratio > 1.0 + self.eps_high, low)

    def weight(self, ratio: Tensor, advantages: Tensor, tau: Tensor | None = None) -> Tensor:
        return (~self.clipped(ratio, advantages)).to(ratio.dtype)

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        """Weight as a function of x = r − 1 for advantages of the given sign."""
        adv = torch.full_like(x, float(sign))
        return self.weight(1.0 + x, adv)

    def value(self, ratio: Tensor, tau: float = 1.0, sign: int = 1) -> Tensor:
        """min(r·s, clip(r)·s)/s for an advantage of sign s: the effective gate value."""
        adv = torch.full_like(ratio, float(sign))
        return self.surrogate(ratio, adv) * float(sign)


Gate = SmoothGate | ClipGate | RatioMethod

# ----------------------------------------------------------------------------- built-ins

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)

_BUILTIN: dict[str, SmoothGate] = {}


def register_gate(name: str, *, dF: BaseFn | None = None, hwhm: float | None = None):
    """Decorator: register a base function F under ``name`` (verl-style registry)."""

    def deco(F: BaseFn) -> BaseFn:
        if name in _BUILTIN or name in RATIO_CONTROL:
            raise ValueError(f"gate {name!r} is already registered")
        _BUILTIN[name] = SmoothGate(name=name, F=F, dF=dF, hwhm=hwhm)
        return F

    return deco


@register_gate(
    "sigmoid",
    dF=lambda x: 1.0 - torch.tanh(0.5 * x) ** 2,  # sech²(x/2), stable for large |x|
    hwhm=2.0 * math.acosh(math.sqrt(2.0)),
)
def sigmoid_F(x: Tensor) -> Tensor:
    """F(x) = 4σ(x); F' = 4σ(1 − σ) = sech²(x/2)."""
    return 4.0 * torch.sigmoid(x)


@register_gate("erf", dF=lambda x: torch.exp(-0.5 * x * x), hwhm=math.sqrt(2.0 * math.log(2.0)))
def erf_F(x: Tensor) -> Tensor:
    """F(x) = √(2π)·Φ(x) = √(2π)·(1 + erf(x/√2))/2; F' = exp(−x²/2)."""
    return (0.5 * _SQRT_2PI) * (1.0 + torch.erf(x * _INV_SQRT2))


@register_gate("arctan", dF=lambda x: 1.0 / (1.0 + x * x), hwhm=1.0)
def arctan_F(x: Tensor) -> Tensor:
    """F(x) = arctan(x); F' = 1/(1 + x²)."""
    return torch.atan(x)


@register_gate("softsign", dF=lambda x: (1.0 + x * x) ** -1.5, hwhm=math.sqrt(2.0 ** (2.0 / 3.0) - 1.0))
def softsign_F(x: Tensor) -> Tensor:
    """The paper's softsign (eq. 8): F(x) = x/√(1 + x²); F' = (1 + x²)^(−3/2)."""
    return x * torch.rsqrt(1.0 + x * x)


@register_gate("softsign_abs", dF=lambda x: (1.0 + x.abs()) ** -2, hwhm=math.sqrt(2.0) - 1.0)
def softsign_abs_F(x: Tensor) -> Tensor:
    """The Keras/PyTorch softsign: F(x) = x/(1 + |x|); F' = 1/(1 + |x|)² (a cusp at 0, an x⁻² tail)."""
    return x / (1.0 + x.abs())


SMOOTH_GATES: tuple[str, ...] = tuple(_BUILTIN)
BUILTIN_GATES: tuple[str, ...] = (*SMOOTH_GATES, "clip")
SIGMOID_HWHM: float = _BUILTIN["sigmoid"].hwhm  # type: ignore[assignment]
STUDENT = "student"  # the Student-t family, one gate per tail index gate.nu
NU_MIN, NU_MAX = 1.0, 1e6


def known_gates() -> tuple[str, ...]:
    return (*_BUILTIN, STUDENT, *RATIO_CONTROL)


def has_temperature(name: str) -> bool:
    """Whether gate ``name`` is a smooth gate (τ_pos/τ_neg apply): every name but clip, dual-clip and the
    methods of :mod:`harness.methods`; an import path is a smooth gate."""
    return name not in RATIO_CONTROL


# ----------------------------------------------------------------------------- the Student-t family

# Gauss-Legendre nodes and weights on (0, 1) for the integrals that give F (float64, 64 nodes)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)
_GL_NODES, _GL_WEIGHTS = 0.5 * (_GL_X + 1.0), 0.5 * _GL_W
_GL_POWER = 4  # u = v^4 in the tail integral smooths its u^(nu - 1) behaviour at u = 0


def student_weight(x: Tensor, nu: float) -> Tensor:
    """w_ν(x) = (1 + x²/ν)^(−(ν+1)/2), the Student-t density's shape with w(0) = 1."""
    return torch.exp(-0.5 * (nu + 1.0) * torch.log1p(x * x / nu))


def _student_integral(x: Tensor, nu: float) -> Tensor:
    r"""F_ν(x) = ∫_0^x w_ν(s) ds in float64 by Gauss-Legendre quadrature: for :math:`|x| \le 1` as
    :math:`x\int_0^1 w_ν(xt)\,dt`; beyond, as :math:`F_ν(\infty) - \int_{|x|}^\infty w_ν`, the tail written as
    :math:`\int_0^1 w_ν(|x|/u)\,|x|/u^2\,du` with :math:`u = v^4` (smooth integrand for ν ≥ 1), where
    :math:`F_ν(\infty) = \sqrt{\nu\pi}\,\Gamma(\nu/2) / (2\Gamma((\nu+1)/2))` is half the inverse of the t density's
    normaliser."""
    t = torch.as_tensor(_GL_NODES, dtype=torch.float64, device=x.device)
    wts = torch.as_tensor(_GL_WEIGHTS, dtype=torch.float64, device=x.device)
    xd = x.detach().to(torch.float64)
    ax = xd.abs()
    near = ax <= 1.0
    out = torch.empty_like(ax)
    # each element takes one of the two integrals (the quadrature is the cost: 64 weights per element)
    a = ax[near].unsqueeze(-1)
    out[near] = (a * student_weight(a * t, nu)) @ wts
    f_inf = math.exp(0.5 * math.log(nu * math.pi) + math.lgamma(nu / 2) - math.lgamma((nu + 1) / 2)) / 2.0
    u = t**_GL_POWER
    du = _GL_POWER * t ** (_GL_POWER - 1)
    b = ax[~near].unsqueeze(-1)
    log_tail = -0.5 * (nu + 1.0) * torch.log1p((b / u) ** 2 / nu) + torch.log(b) - 2.0 * torch.log(u)
    out[~near] = f_inf - torch.exp(log_tail) @ (wts * du)
    return (torch.sign(xd) * out).to(x.dtype)


class _StudentF(torch.autograd.Function):
    """F_ν with its exact derivative w_ν in the backward pass (quadrature is for the value only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, nu: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.nu = nu
        return _student_integral(x, nu)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * student_weight(x, ctx.nu), None


@functools.lru_cache(maxsize=64)
def student_gate(nu: float) -> SmoothGate:
    r"""The Student-t gate with tail index ν: :math:`F' = w_\nu(x) = (1 + x^2/\nu)^{-(\nu+1)/2}`, F its integral
    from 0 (numerically exact, :func:`_student_integral`), HWHM :math:`\sqrt{\nu(2^{2/(\nu+1)} - 1)}`.
    ν = 1 is ``arctan``; ν = 2 at τ·√2 is the paper's ``softsign`` at τ; ν → ∞ is ``erf`` (a Gaussian weight).
    The tail of w falls like x^(−(ν+1)), so ν is a continuous tail axis between the polynomial and Gaussian
    gates; every ν ≥ 1 is admissible (w·r ~ r^(−ν) → 0)."""
    if not (isinstance(nu, int | float) and math.isfinite(nu) and NU_MIN <= nu <= NU_MAX):
        raise ValueError(f"gate.nu must be a number in [{NU_MIN:g}, {NU_MAX:g}] for gate {STUDENT!r}, got {nu!r}")
    nu = float(nu)
    return SmoothGate(name=f"{STUDENT}(nu={nu:g})", F=lambda x: _StudentF.apply(x, nu),
                      dF=lambda x: student_weight(x, nu), hwhm=math.sqrt(nu * (2.0 ** (2.0 / (nu + 1.0)) - 1.0)))


def get_gate(spec: str | Mapping[str, Any] | Gate, *, eps_low: float | None = None, eps_high: float | None = None,
             nu: float | None = None, params: Mapping[str, Any] | None = None) -> Gate:
    """Resolve a gate from a name, an import path ``"pkg.mod:attr"``, a Hydra ``_target_`` mapping
    or a gate object. ``eps_low``/``eps_high`` (None: clip's 0.2, each method's own default), ``nu`` the tail index
    of the ``student`` family, ``params`` the own keys of dual-clip (``clip_c``) and of the methods of
    :mod:`harness.methods`. Raises ``ValueError`` naming the known gates for anything else."""
    if spec == STUDENT:
        if nu is None:
            raise ValueError(f"gate {STUDENT!r} needs its tail index gate.nu (a number >= {NU_MIN:g})")
        return student_gate(float(nu) if isinstance(nu, int | float) and not isinstance(nu, bool) else nu)
    if isinstance(spec, SmoothGate | ClipGate | RatioMethod):
        return spec
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(f"gate mapping needs a '_target_' key, got keys {sorted(spec)}")
        from hydra.utils import instantiate

        return _coerce(instantiate(dict(spec)), str(spec["_target_"]))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"gate must be a name or 'module:attr' path, got {spec!r}")
    clip_eps = {"eps_low": 0.2 if eps_low is None else eps_low, "eps_high": 0.2 if eps_high is None else eps_high}
    if spec == "clip":
        return ClipGate(**clip_eps)
    if spec == DUAL_CLIP:
        return ClipGate(**clip_eps, name=DUAL_CLIP, clip_c=(params or {}).get("clip_c", DUAL_CLIP_C))
    if spec in METHODS:
        return make_method(spec, eps_low=eps_low, eps_high=eps_high, params=params)
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    if ":" in spec:
        return _resolve_path(spec)
    raise ValueError(
        f"unknown gate {spec!r}: known gates are {', '.join(known_gates())}, "
        "or give a custom base function as 'package.module:function'"
    )


@functools.lru_cache(maxsize=128)
def _resolve_path(spec: str) -> Gate:
    """Import and wrap a ``"module:attr"`` gate once: building a SmoothGate finds its half-width
    numerically (hundreds of autograd calls), far more than a policy_loss call itself costs."""
    return _coerce(import_object(spec, what="gate"), spec)


def _coerce(obj: Any, label: str) -> Gate:
    if isinstance(obj, SmoothGate | ClipGate | RatioMethod):
        return obj
    if callable(obj):
        try:
            probe = obj(torch.zeros(3, dtype=torch.float64))
        except TypeError:
            return _coerce(obj(), label)  # a zero-argument factory
        if isinstance(probe, SmoothGate | ClipGate | RatioMethod):
            return probe
        if not isinstance(probe, Tensor) or probe.shape != (3,):
            raise ValueError(f"gate {label!r}: F must map a tensor elementwise to a tensor")
        return SmoothGate(name=label, F=obj)
    raise ValueError(f"gate {label!r} is neither a base function F nor a gate object")


def effective_tau(gate: Gate, tau: float, width: str = "raw") -> float:
    """The temperature a gate actually runs at: τ (``raw``) or τ·h_g/h_sigmoid (``hwhm``)."""
    if width not in WIDTH_MODES:
        raise ValueError(f"gate.width must be one of {', '.join(WIDTH_MODES)}, got {width!r}")
    if not isinstance(gate, SmoothGate) or width == "raw":
        return tau
    if not (gate.hwhm is not None and math.isfinite(gate.hwhm) and gate.hwhm > 0):
        raise ValueError(f"gate {gate.name!r}: width='hwhm' needs a finite half-width of F' "
                         f"(found {gate.hwhm!r}, F' never falls to 1/2?); use width='raw'")
    return tau * gate.hwhm / SIGMOID_HWHM


def _numeric_hwhm(weight_x: Callable[[Tensor], Tensor], lim: float = 1e4) -> float:
    """Mean of the left and right x where F'(x) falls to 1/2 (bisection, float64)."""

    def side(sign: float) -> float:
        lo, hi = 0.0, 1.0
        while float(weight_x(torch.tensor(sign * hi, dtype=torch.float64))) > 0.5:
            hi *= 2.0
            if hi > lim:
                return float("inf")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if float(weight_x(torch.tensor(sign * mid, dtype=torch.float64))) > 0.5:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    return 0.5 * (side(1.0) + side(-1.0))


# ----------------------------------------------------------------------------- admissibility


@dataclass(frozen=True)
class PropertyCheck:
    name: str
    passed: bool
    worst_x: float | None
    detail: str


def check_admissible(gate: Gate, *, x_max: float = 60.0, n: int = 240_001) -> list[PropertyCheck]:
    r"""Numerically check the four properties of arXiv 2602.19345 (section 4) on the gradient weight
    w(x) = F'(x), x = τ(r − 1), at τ = 1 (so r = 1 + x):

    (i) f is continuously differentiable: F' is continuous;
    (ii) f' attains its global maximum, equal to 1, at r = 1: F'(0) = 1 = max F';
    (iii) f' decreases monotonically as r moves away from 1: F' non-increasing in |x| on each side of 0;
    (iv) :math:`f'(r)\,r \to 0` as :math:`r \to \infty`: the gradient contribution w·r vanishes, not only w.
    Checked on g(r) = w(r)·r at r = 10³ … 10⁶: it holds when g(10⁶) is zero to double precision or g falls
    with r there (log-log slope below −0.01), so w ~ r^(−1.1) passes and w ~ r^(−0.9) or w ~ 1/r fail.

    For ``clip``, dual-clip and the methods of :mod:`harness.methods` the weight in x = r − 1 is checked for both
    advantage signs (it may differ by sign); a method whose gradient is w·A·∇log π has f'(r) = w/r. Each result
    carries the worst offending x (``None`` when the property holds everywhere). A method whose weight is not a
    function of r alone (DPPO reads π − π_old, DRO's penalty depends on A, KL-Cov on the batch) has no
    ``weight_x``: ``ValueError``; :func:`method_properties` says so instead.
    """
    if getattr(gate, "weight_x", None) is None:
        raise ValueError(f"gate {gate.name!r}: its gradient weight is not a function of r alone; nothing to check")
    signs = (1,) if isinstance(gate, SmoothGate) else (1, -1)
    results: list[list[PropertyCheck]] = [_check_weight(lambda x, s=s: gate.weight_x(x, s), x_max, n) for s in signs]
    if len(results) == 1:
        return results[0]
    merged = []
    for per_sign in zip(*results, strict=True):
        bad = [(s, c) for s, c in zip(("A>0", "A<0"), per_sign, strict=True) if not c.passed]
        if not bad:
            merged.append(per_sign[0])
        else:
            first = bad[0][1]
            details = "; ".join(f"{sign}: {c.detail}" for sign, c in bad)
            merged.append(PropertyCheck(first.name, False, first.worst_x, details))
    return merged


def _check_weight(w: Callable[[Tensor], Tensor], x_max: float, n: int) -> list[PropertyCheck]:
    x = torch.linspace(-x_max, x_max, n, dtype=torch.float64)
    wx = w(x)
    i0 = (n - 1) // 2
    h = float(x[1] - x[0])
    out = []

    # (i) continuity: a jump between neighbours that does not shrink when the step is refined 1000×.
    jumps = (wx[1:] - wx[:-1]).abs()
    k = int(jumps.argmax())
    xa = float(x[k])
    fine = torch.linspace(xa, xa + h, 1001, dtype=torch.float64)
    fine_jump = float((w(fine)[1:] - w(fine)[:-1]).abs().max())
    cont = fine_jump < 0.5 * float(jumps[k]) or fine_jump < 1e-6
    out.append(
        PropertyCheck(
            "(i) F' continuous",
            cont,
            None if cont else xa,
            "no jump found" if cont else f"jump of {fine_jump:.3g} in w near x={xa:.4g}",
        )
    )

    # (ii) global maximum 1 at x = 0.
    w0 = float(w(torch.zeros(1, dtype=torch.float64)))
    worst = int(wx.argmax())
    over = float(wx[worst]) - w0
    ok = abs(w0 - 1.0) < 1e-9 and over <= 1e-12
    worst_x = None if ok else (0.0 if abs(w0 - 1.0) >= 1e-9 else float(x[worst]))
    out.append(PropertyCheck("(ii) max F' = 1 at x=0", ok, worst_x, f"F'(0)={w0:.6g}, max F'={float(wx[worst]):.6g}"))

    # (iii) non-increasing in |x| on each side.
    right = wx[i0:]
    left = wx[: i0 + 1].flip(0)
    rise_r = right[1:] - right[:-1]
    rise_l = left[1:] - left[:-1]
    worst_r, worst_l = float(rise_r.max()), float(rise_l.max())
    ok = max(worst_r, worst_l) <= 1e-12
    if ok:
        wx3 = None
    elif worst_r >= worst_l:
        wx3 = float(x[i0 + 1 + int(rise_r.argmax())])
    else:
        wx3 = -float(x[i0 + 1 + int(rise_l.argmax())] - x[i0])
    out.append(PropertyCheck("(iii) F' non-increasing in |x|", ok, wx3, f"largest rise {max(worst_r, worst_l):.3g}"))

    # (iv) vanishing gradient contribution: g(r) = w(r)·r at large r is zero or still falling.
    far = torch.tensor([1e3, 1e4, 1e5, 1e6], dtype=torch.float64)
    g = w(far - 1.0) * far
    g3, g6 = float(g[0]), float(g[-1])
    if g6 < 1e-12:
        ok, slope_text = True, ""
    else:
        slope = (math.log(g6) - math.log(max(float(g[1]), 1e-300))) / (math.log(1e6) - math.log(1e4))
        ok, slope_text = slope < -0.01, f", log-log slope {slope:.2f}"
    out.append(
        PropertyCheck(
            "(iv) f'(r)·r -> 0 as r -> +inf",
            ok,
            None if ok else float(far[-1]) - 1.0,
            f"f'(r)·r at r=1e3: {g3:.3g}, r=1e6: {g6:.3g}{slope_text}",
        )
    )
    return out

# ----------------------------------------------------------------------------- checks of the ``gate`` config node

_admissibility: dict[tuple[str, Any], list[str]] = {}  # (gate name, nu) -> failed properties (checks take ~0.1 s)
_warned: set[str] = set()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def inadmissible_properties(g: Any) -> list[str]:
    """The admissibility properties (arXiv 2602.19345, section 4; :func:`check_admissible`) that the
    gate node ``g`` fails, with their details; empty for an admissible gate and for clip, dual-clip and the methods
    of :mod:`harness.methods`: baselines, compared as the field runs them, not candidates for a smooth gate."""
    key = (str(g.name), g.get("nu"))
    if key not in _admissibility:
        failed = [] if not has_temperature(str(g.name)) else [
            f"{r.name} ({r.detail})" for r in check_admissible(get_gate(g.name, nu=g.get("nu"))) if not r.passed]
        _admissibility[key] = failed
    return _admissibility[key]


def gate_params(g: Any) -> dict[str, Any]:
    """The own keys of dual-clip and of the methods of :mod:`harness.methods` that the gate node ``g`` carries."""
    return {key: g[key] for key in METHOD_KEYS if key in g}


def validate_gate_config(g: Any) -> None:
    """The values of the ``gate`` node (its keys and types are :mod:`harness.schema`'s, checked when the config is
    composed): clip's ε, a smooth gate's τ and width, the gate itself and its admissibility (``ConfigError`` naming
    the key; an inadmissible gate only with ``gate.allow_inadmissible=true``, then warned about)."""
    if not has_temperature(str(g.name)):
        for key in ("eps_low", "eps_high"):
            if key in g and not (_number(g[key]) and g[key] >= 0):
                raise ConfigError(f"gate.{key} must be a finite number >= 0, got {g[key]!r}")
        if "eps_low" in g and not g.eps_low < 1 and g.name not in ("gmpo", "dppo_tv", "dppo_kl"):
            raise ConfigError(f"gate.eps_low must be < 1 (the clip range starts at 1 - eps_low > 0), got {g.eps_low!r}")
        try:
            get_gate(g.name, eps_low=g.get("eps_low", 0.2), eps_high=g.get("eps_high", 0.2), params=gate_params(g))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return
    for key in ("tau_pos", "tau_neg"):
        if not (_number(g[key]) and g[key] > 0):
            raise ConfigError(f"gate.{key} must be a finite number > 0, got {g[key]!r}")
    if g.width not in WIDTH_MODES:
        raise ConfigError(f"gate.width must be one of {', '.join(WIDTH_MODES)}, got {g.width!r}")
    allow = g.get("allow_inadmissible", False)
    get_gate(g.name, nu=g.get("nu"))
    failed = inadmissible_properties(g)
    if failed and not allow:
        raise ConfigError(f"gate.name={g.name} is not admissible: it fails {'; '.join(failed)}. Use an admissible "
                          "gate (harness gates check NAME), or gate.allow_inadmissible=true to train it anyway")
    if failed:
        _warn_once(f"gate.name={g.name} is not admissible (fails {'; '.join(failed)}); training it anyway "
                   "(gate.allow_inadmissible=true; the run is tagged inadmissible)")
