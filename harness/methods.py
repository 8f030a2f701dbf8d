r"""The field's other ratio-control methods, beside the smooth gates and clip of :mod:`harness.gates`.

Each is a small frozen object with ``surrogate(t)`` — the per-token objective s (the loss is −s, aggregated by
:func:`harness.objective.aggregate`) — and ``kept(t)``, the tokens whose update the method leaves as the
unconstrained importance-weighted policy gradient :math:`r A \nabla\log\pi` would have it (the analogue of the
paper's EUR: the objective's EUR diagnostic is the group mean of ``kept``, its ``clip_frac`` the token share of
``~kept``). Every method is registered by name (:data:`METHODS`) and chosen as ``gate=<name>``; dual-clip is clip
with a third bound and lives with clip in :mod:`harness.gates`. The per-token terms every method reads are
:class:`TokenTerms`, computed once by :func:`harness.objective.policy_loss`.

Where a method's loss is written with :math:`\log\pi` (CISPO, DPPO, GPG, DRO) its value is the frameworks' own
(:math:`-\mathrm{sg}(w) A \log\pi`), so the logged loss of those methods is not on the gates' scale (at r = 1 every
gate's loss is −A); gradients are what the methods define. Conventions are the source frameworks' and are checked
against their installed code (tests/test_methods.py):

* ``cispo`` (TRL ``loss_type="cispo"``, ScaleRL): :math:`s = \mathrm{sg}(\min(r, \epsilon_{max}))\,A\log\pi`;
* ``cispo_two_sided`` (verl ``cispo``): :math:`s = \mathrm{sg}(\mathrm{clip}(r, 1-\epsilon_{low},
  1+\epsilon_{high}))\,A\log\pi`;
* ``gmpo`` (verl ``geo_mean``, TRL's experimental GMPO trainer; arXiv 2507.20673): per sequence
  :math:`s_i = A_i \exp\big(\tfrac{1}{|y_i|}\sum_t \tilde\rho_{it}\big)` with the sign-aware log-space clip
  :math:`\tilde\rho = \min(\rho, \mathrm{clip}(\rho, -\epsilon_{low}, \epsilon_{high}))` for A > 0 and
  :math:`\max(\cdot)` otherwise; every token of the sequence carries :math:`s_i`, so ``seq-mean-token-mean``
  aggregation is the mean over sequences the frameworks take;
* ``gppo`` (Klear-Reasoner's gradient-preserving clipping, arXiv 2508.07629; CE-GPPO's β₁, β₂, arXiv 2509.20712):
  inside the clip band :math:`s = rA`; where clip would cut the gradient (A > 0, r > 1 + ε_high; A ≤ 0, r < 1 − ε_low)
  :math:`s = \beta\,(1 \pm \epsilon)\,\frac{r}{\mathrm{sg}(r)}\,A`, the clipped value with the gradient
  :math:`\beta(1 \pm \epsilon) A \nabla\log\pi` (β_high for A > 0, β_low otherwise; GPPO is β = 1);
* ``dppo_tv`` / ``dppo_kl`` (verl, arXiv 2602.04879): :math:`s = \mathrm{sg}(\min(r, c))\,A\log\pi\cdot m` with the
  mask m keeping A > 0 tokens where π − π_old ≤ δ_high (TV) or the binary KL ≤ δ_high or π ≤ π_old (KL), and A ≤ 0
  tokens where π − π_old ≥ −δ_low (TV) or binary KL ≤ δ_low or π ≥ π_old (KL); δ is ``eps_low``/``eps_high``;
* ``gpg`` (verl ``gpg``, arXiv 2504.02546): :math:`s = A\log\pi`, no ratio at all;
* ``dro`` (verl ``dro``): :math:`s = A\log\pi - \tfrac{\beta}{2}\rho^2`, a quadratic penalty on the log-ratio;
* ``kl_cov`` (verl ``kl_cov``, arXiv 2505.22617): :math:`s = rA`, less :math:`k\,|\rho|` on the
  ``kl_cov_ratio`` share of tokens (at least one) with the largest centred covariance
  :math:`(A - \bar A)(\log\pi - \overline{\log\pi})` over the batch's tokens;
* ``clip_cov`` (verl ``clip_cov``, the same paper): clip's surrogate, times 0 on ``clip_cov_ratio`` of the tokens
  (at least one), drawn at random (``torch.randperm`` on the global generator, as verl) among the unclipped tokens
  whose covariance lies in (``clip_cov_lb``, ``clip_cov_ub``);
* ``vespo`` (TRL ``loss_type="vespo"``): :math:`s = \mathrm{sg}(\phi(w))\,A\log\pi` with the sequence's ratio
  :math:`w = \exp\sum_t \rho_t` (clamped to [1e-8, e^{20}]) and :math:`\phi(w) = e^{\lambda} w^k e^{-\lambda w}`
  (φ(1) = 1), k and λ by the sign of A (A ≥ 0: ``k_pos``, ``lambda_pos``); off-policy weights are folded into w, as
  TRL folds its vLLM importance ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenTerms:
    """What every method reads, (B, T) each: current log-probs (differentiable), the behaviour log-probs (detached),
    the clamped log-ratio ρ and the ratio r = e^ρ (differentiable; token level or GSPO's sequence level), the
    per-token advantages (0 on padding) and the bool response mask. ``logp`` is 0 on padding."""

    logp: Tensor
    old_logp: Tensor
    log_ratio: Tensor
    ratio: Tensor
    adv: Tensor
    mask: Tensor
    # what a method computes once per call and reads twice (Clip-Cov's random token choice: the loss and ``kept``
    # must see the same draw)
    scratch: dict[str, Tensor] = field(default_factory=dict)
    # importance weights of an off-policy correction, for a method that folds them into its own weight (VESPO);
    # the objective multiplies every other method's surrogate by them
    weights: Tensor | None = None


def clip_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    r"""PPO's clipped surrogate :math:`\min(rA,\ \mathrm{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high})A)`: clip's
    (:class:`harness.gates.ClipGate`) and Clip-Cov's."""
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.minimum(ratio * adv, clipped * adv)


def token_covariance(t: TokenTerms) -> Tensor:
    r"""Each token's centred covariance term :math:`(A - \bar A)(\log\pi - \overline{\log\pi})`, the means over the
    batch's response tokens, (B, T), no gradient: what KL-Cov and Clip-Cov rank tokens by."""
    logp = t.logp.detach()
    return (t.adv.detach() - t.adv[t.mask].mean()) * (logp - logp[t.mask].mean())


@dataclass(frozen=True)
class Cispo:
    """CISPO: the ratio, clipped to [cap_low, cap_high] and detached, weights A·log π (module docstring)."""

    name: str
    cap_high: float
    cap_low: float | None = None
    hwhm: float | None = None
    sequence_level = False

    def _capped(self, ratio: Tensor) -> Tensor:
        return torch.clamp(ratio, min=self.cap_low, max=self.cap_high)

    def surrogate(self, t: TokenTerms) -> Tensor:
        return self._capped(t.ratio).detach() * t.adv * t.logp

    def kept(self, t: TokenTerms) -> Tensor:
        r = t.ratio.detach()
        return (r <= self.cap_high) & (r >= self.cap_low if self.cap_low is not None else True)

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        """f'(r) at r = 1 + x: the gradient w·A·∇log π written as f'(r)·r·A·∇log π, so f'(r) = clip(r)/r."""
        r = 1.0 + x
        return self._capped(r) / r


@dataclass(frozen=True)
class Gmpo:
    """GMPO: the geometric mean over the sequence of the sign-aware log-space-clipped ratios (module docstring)."""

    eps_low: float = 0.4
    eps_high: float = 0.4
    name: str = "gmpo"
    hwhm: float | None = None
    sequence_level = True

    def surrogate(self, t: TokenTerms) -> Tensor:
        clamped = torch.clamp(t.log_ratio, -self.eps_low, self.eps_high)
        clipped = torch.where(t.adv > 0, torch.minimum(t.log_ratio, clamped), torch.maximum(t.log_ratio, clamped))
        m = t.mask.to(t.log_ratio.dtype)
        length = m.sum(-1).clamp(min=1.0)
        coef = torch.exp((clipped * m).sum(-1) / length)
        seq_adv = (t.adv * m).sum(-1) / length
        return (coef * seq_adv).unsqueeze(-1).expand_as(t.logp)

    def kept(self, t: TokenTerms) -> Tensor:
        rho = t.log_ratio.detach()
        return torch.where(t.adv > 0, rho <= self.eps_high, rho >= -self.eps_low)

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        """f'(r) of a one-token sequence: 1 inside the log-space band, 0 where the clip holds (as clip in log r)."""
        rho = torch.log1p(x.clamp(min=-1.0 + 1e-300))
        inside = rho <= self.eps_high if sign > 0 else rho >= -self.eps_low
        return inside.to(x.dtype)


@dataclass(frozen=True)
class Gppo:
    """GPPO / CE-GPPO: clip's value with a bounded gradient kept outside the band (module docstring)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta_low: float = 1.0
    beta_high: float = 1.0
    name: str = "gppo"
    hwhm: float | None = None
    sequence_level = False

    def _outside(self, ratio: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
        pos = adv > 0
        return pos & (ratio > 1.0 + self.eps_high), ~pos & (ratio < 1.0 - self.eps_low)

    def surrogate(self, t: TokenTerms) -> Tensor:
        high, low = self._outside(t.ratio.detach(), t.adv)
        unit = t.ratio / t.ratio.detach()  # 1 in value, ∇ log π in gradient
        out = torch.where(high, self.beta_high * (1.0 + self.eps_high) * unit, t.ratio)
        out = torch.where(low, self.beta_low * (1.0 - self.eps_low) * unit, out)
        return out * t.adv

    def kept(self, t: TokenTerms) -> Tensor:
        high, low = self._outside(t.ratio.detach(), t.adv)
        return ~(high | low)

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        r = 1.0 + x
        if sign > 0:
            return torch.where(r > 1.0 + self.eps_high, self.beta_high * (1.0 + self.eps_high) / r, 1.0)
        return torch.where(r < 1.0 - self.eps_low, self.beta_low * (1.0 - self.eps_low) / r, 1.0)


@dataclass(frozen=True)
class Dppo:
    """DPPO-Binary-TV / -KL: a trust-region mask on the probability change, with a truncated detached ratio
    weighting A·log π (module docstring)."""

    divergence: str = "tv"
    eps_low: float = 0.15
    eps_high: float = 0.15
    clip_c: float = 20.0
    name: str = "dppo_tv"
    hwhm: float | None = None
    sequence_level = False

    def _valid(self, t: TokenTerms) -> Tensor:
        logp = t.logp.detach()
        prob, old_prob = torch.exp(logp), torch.exp(t.old_logp)
        if self.divergence == "tv":
            pos_ok, neg_ok = prob - old_prob <= self.eps_high, prob - old_prob >= -self.eps_low
        else:
            binary_kl = old_prob * (t.old_logp - logp) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            pos_ok = (binary_kl <= self.eps_high) | (prob <= old_prob)
            neg_ok = (binary_kl <= self.eps_low) | (prob >= old_prob)
        return torch.where(t.adv > 0, pos_ok, neg_ok)

    def surrogate(self, t: TokenTerms) -> Tensor:
        truncated = torch.clamp(t.ratio, max=self.clip_c).detach()
        return truncated * t.adv * t.logp * self._valid(t).to(t.logp.dtype)

    def kept(self, t: TokenTerms) -> Tensor:
        return self._valid(t) & (t.ratio.detach() <= self.clip_c)

    weight_x = None
    not_elementwise = "the mask reads π − π_old, not r alone"


@dataclass(frozen=True)
class Gpg:
    """GPG: the plain policy gradient A·log π, no ratio (module docstring)."""

    name: str = "gpg"
    hwhm: float | None = None
    sequence_level = False

    def surrogate(self, t: TokenTerms) -> Tensor:
        return t.adv * t.logp

    def kept(self, t: TokenTerms) -> Tensor:
        return torch.ones_like(t.mask)

    def weight_x(self, x: Tensor, sign: int = 1) -> Tensor:
        """f'(r) = 1/r: the gradient A·∇log π written against r·A·∇log π."""
        return 1.0 / (1.0 + x)


@dataclass(frozen=True)
class Dro:
    """verl's DRO: A·log π less a quadratic penalty (β/2)·ρ² on the log-ratio (module docstring)."""

    dro_beta: float | None = None
    name: str = "dro"
    hwhm: float | None = None
    sequence_level = False
    not_elementwise = "the penalty's gradient depends on A, not on r alone"

    def surrogate(self, t: TokenTerms) -> Tensor:
        if self.dro_beta is None:
            raise ValueError("gate 'dro' needs gate.dro_beta (a number > 0; verl has no default either)")
        rho = t.logp - t.old_logp  # unclamped, as verl's
        return t.adv * t.logp - 0.5 * self.dro_beta * rho.square()

    def kept(self, t: TokenTerms) -> Tensor:
        return torch.ones_like(t.mask)

    weight_x = None


@dataclass(frozen=True)
class KlCov:
    """KL-Cov: r·A with a |ρ| penalty on the top-covariance tokens of the batch (module docstring)."""

    kl_cov_ratio: float = 0.0002
    kl_coef: float = 0.1
    name: str = "kl_cov"
    hwhm: float | None = None
    sequence_level = False

    def _selected(self, t: TokenTerms) -> Tensor:
        flat_mask = t.mask.reshape(-1)
        valid = torch.nonzero(flat_mask, as_tuple=True)[0]
        cov = token_covariance(t).reshape(-1)[valid]
        k = max(1, int(len(cov) * self.kl_cov_ratio))
        chosen = valid[torch.topk(cov, k, largest=True).indices]
        return torch.zeros_like(flat_mask).index_fill_(0, chosen, True).reshape(t.mask.shape)

    def surrogate(self, t: TokenTerms) -> Tensor:
        rho = t.logp - t.old_logp  # unclamped, as verl's
        penalty = self.kl_coef * rho.abs() * self._selected(t).to(t.logp.dtype)
        return t.adv * t.ratio - penalty

    def kept(self, t: TokenTerms) -> Tensor:
        return ~self._selected(t)

    weight_x = None
    not_elementwise = "which tokens are penalised depends on the whole batch"


@dataclass(frozen=True)
class ClipCov:
    """Clip-Cov: clip's surrogate, with the gradient of a random ``clip_cov_ratio`` share of the batch's unclipped
    tokens whose covariance lies in (lb, ub) removed (module docstring)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    name: str = "clip_cov"
    hwhm: float | None = None
    sequence_level = False
    weight_x = None
    not_elementwise = "which tokens lose their gradient is a random draw among the batch's high-covariance tokens"

    def _clipped(self, t: TokenTerms) -> Tensor:
        r = t.ratio.detach()
        return (-t.adv * torch.clamp(r, 1.0 - self.eps_low, 1.0 + self.eps_high) > -t.adv * r) & t.mask

    def _dropped(self, t: TokenTerms) -> Tensor:
        """The drawn tokens, once per call: torch.randperm on the global generator, the draw verl makes."""
        if "clip_cov" not in t.scratch:
            m = t.mask
            cov = token_covariance(t)
            eligible = (cov < self.clip_cov_ub) & (cov > self.clip_cov_lb) & m & ~self._clipped(t)
            where = torch.nonzero(eligible)
            n = max(int(self.clip_cov_ratio * int(m.sum())), 1)
            dropped = torch.zeros_like(m)
            if len(where) > 0:
                where = where[torch.randperm(len(where))[: min(n, len(where))]]
                dropped[where[:, 0], where[:, 1]] = True
            t.scratch["clip_cov"] = dropped
        return t.scratch["clip_cov"]

    def surrogate(self, t: TokenTerms) -> Tensor:
        out = clip_surrogate(t.ratio, t.adv, self.eps_low, self.eps_high)
        return out * (~self._dropped(t)).to(out.dtype)

    def kept(self, t: TokenTerms) -> Tensor:
        return ~(self._clipped(t) | self._dropped(t))


@dataclass(frozen=True)
class Vespo:
    """VESPO: a gamma-shaped weight of the sequence's ratio, detached, on A·log π (module docstring)."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0
    name: str = "vespo"
    hwhm: float | None = None
    sequence_level = False
    folds_weights = True
    weight_x = None
    not_elementwise = "its weight is a function of the whole sequence's ratio"

    def phi(self, t: TokenTerms) -> Tensor:
        """φ(w) per sequence, broadcast to its tokens (no gradient)."""
        with torch.no_grad():
            lower = math.log(1e-8)
            m = t.mask.to(t.log_ratio.dtype)
            log_w = (t.log_ratio.detach().clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
            if t.weights is not None:  # TRL: log w += Σ_t log(π_old/π_sampler), clamped as its log w
                log_w = log_w + (torch.log(t.weights.clamp(min=1e-300)).clamp(lower, 20.0) * m).sum(-1, keepdim=True)
            log_w = log_w.clamp(lower, 20.0)
            seq_adv = (t.adv * m).sum(-1, keepdim=True)
            nonneg = seq_adv >= 0
            k = torch.where(nonneg, self.k_pos, self.k_neg)
            lam = torch.where(nonneg, self.lambda_pos, self.lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            return phi.expand_as(t.logp)

    def surrogate(self, t: TokenTerms) -> Tensor:
        return self.phi(t) * t.adv * t.logp

    def kept(self, t: TokenTerms) -> Tensor:
        """min(φ(w), 1): continuous, as a smooth gate's f'(r) (φ(1) = 1 on-policy)."""
        return self.phi(t).clamp(max=1.0)


RatioMethod = Cispo | Gmpo | Gppo | Dppo | Gpg | Dro | KlCov | ClipCov | Vespo


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _at_least_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# name -> (factory from the ε given (a dict without the ones left at None: each method then takes its own default) and
# the method's own keys; {own key: (check, what it must be)})
_Check = tuple[Callable[[Any], bool], str]
_FINITE: _Check = (lambda v: isinstance(v, int | float) and math.isfinite(v), "finite")
_SHARE: _Check = (lambda v: _positive(v) and v <= 1, "in (0, 1]")
METHODS: dict[str, tuple[Callable[..., RatioMethod], dict[str, _Check]]] = {
    "cispo": (lambda eps, eps_max=5.0: Cispo("cispo", cap_high=eps_max), {"eps_max": (_positive, "> 0")}),
    "cispo_two_sided": (lambda eps: Cispo("cispo_two_sided", cap_high=1.0 + eps.get("eps_high", 0.2),
                                          cap_low=1.0 - eps.get("eps_low", 0.2)), {}),
    "gmpo": (lambda eps: Gmpo(**eps), {}),
    "gppo": (lambda eps, **own: Gppo(**eps, **own),
             {"beta_low": (_at_least_zero, ">= 0"), "beta_high": (_at_least_zero, ">= 0")}),
    "dppo_tv": (lambda eps, **own: Dppo("tv", **eps, **own, name="dppo_tv"), {"clip_c": (_positive, "> 0")}),
    "dppo_kl": (lambda eps, **own: Dppo("kl", **{"eps_low": 0.05, "eps_high": 0.05, **eps}, **own, name="dppo_kl"),
                {"clip_c": (_positive, "> 0")}),
    "gpg": (lambda eps: Gpg(), {}),
    "dro": (lambda eps, **own: Dro(**own), {"dro_beta": (_positive, "> 0")}),
    "kl_cov": (lambda eps, **own: KlCov(**own), {"kl_cov_ratio": _SHARE, "kl_coef": (_at_least_zero, ">= 0")}),
    "clip_cov": (lambda eps, **own: ClipCov(**eps, **own),
                 {"clip_cov_ratio": _SHARE, "clip_cov_lb": _FINITE, "clip_cov_ub": _FINITE}),
    "vespo": (lambda eps, **own: Vespo(**own),
              {key: (_at_least_zero, ">= 0") for key in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")}),
}
# Every key a method node may carry beyond name and ε (harness.objective.loss_kwargs passes these on); clip_c is
# dual-clip's too.
METHOD_KEYS: tuple[str, ...] = tuple(dict.fromkeys(["clip_c", *(k for _, keys in METHODS.values() for k in keys)]))


def check_method_params(name: str, params: Mapping[str, Any]) -> None:
    """``ValueError`` naming ``gate.<key>`` and what it must be, for a method's own keys."""
    for key, (ok, what) in METHODS[name][1].items():
        if key in params and not ok(params[key]):
            raise ValueError(f"gate.{key} must be a number {what} for gate {name!r}, got {params[key]!r}")


def make_method(name: str, *, eps_low: float | None = None, eps_high: float | None = None,
                params: Mapping[str, Any] | None = None) -> RatioMethod:
    """The registered method ``name`` with its ε (None: the method's own default, e.g. GMPO's 0.4) and its own keys
    (``params``; unknown keys are ignored, as a gate ignores the keys of other gates)."""
    params = dict(params or {})
    check_method_params(name, params)
    factory, keys = METHODS[name]
    eps = {k: float(v) for k, v in (("eps_low", eps_low), ("eps_high", eps_high)) if v is not None}
    return factory(eps, **{k: float(v) for k, v in params.items() if k in keys})
