r"""The policy objective: the one place any backend computes the policy loss.

For response tokens t of sequence i with behaviour log-probs :math:`\log\pi_{old}` and current
log-probs :math:`\log\pi_\theta`:

.. math::

    \rho_{it} = \mathrm{clamp}(\log\pi_\theta - \log\pi_{old}, \pm c), \qquad r_{it} = e^{\rho_{it}}

(``ratio_level="sequence"`` is GSPO: :math:`\rho_{it} = \frac{1}{|y_i|}\sum_t \rho_{it}` for every
t, the log of the sequence's geometric-mean ratio). The per-token loss is

.. math::  \ell_{it} = -\,s(r_{it}, A_{it}) + \beta\, k_3(\log\pi_{ref}, \log\pi_\theta)

with the gate surrogate :math:`s = f_\tau(r) A` (smooth gates, see :mod:`harness.gates`),
:math:`s = \min(rA, \mathrm{clip}(r)A)` (``clip``; ``dual_clip`` adds a bound for A < 0) or a ratio-control method's
(:mod:`harness.methods`: CISPO, GMPO, GPPO, DPPO, ..., whose EUR is the share of tokens their rule leaves alone), and
the k3 KL estimator
:math:`k_3 = e^{\log\pi_{ref} - \log\pi_\theta} - (\log\pi_{ref} - \log\pi_\theta) - 1`.
Aggregation over the (B, T) mask M:

* ``seq-mean-token-mean`` (GRPO/SAPO): :math:`\frac{1}{B'}\sum_i \frac{\sum_t M_{it}\ell_{it}}
  {\sum_t M_{it}}` over the B' sequences with at least one token;
* ``token-mean`` (DAPO): :math:`\sum_{it} M_{it}\ell_{it} / \sum_{it} M_{it}`;
* ``seq-mean-token-sum-norm`` (Dr. GRPO): :math:`\sum_{it} M_{it}\ell_{it} / (B \cdot L)` with a
  constant L (``norm_length``, default T);
* ``seq-mean-token-sum`` (verl's; TRL's ``luspo``, the length-unbiased GSPO, with ``ratio_level="sequence"``):
  :math:`\frac{1}{B'}\sum_i \sum_t M_{it}\ell_{it}`, a sum over each sequence's tokens, a mean over the B'
  sequences with at least one.

Diagnostics include the paper's Effective Update Ratio (arXiv 2602.19345 v2, eq. 12): with prompt groups b
(the G completions of one prompt) and the gradient weight :math:`w = f'(r)` (for ``clip`` the indicator of the
unclipped branch),

.. math::  \mathrm{EUR} = \frac{1}{B}\sum_b \frac{\sum_{j \in b}\sum_t M_{jt}\, w_{jt}}{\sum_{j \in b}\sum_t M_{jt}}

a token mean within each group, then a mean over the B groups with tokens. Without ``groups`` it is the token mean
of w over the batch. For clip, w is 1 minus the clip indicator, so EUR is one minus the *per-group* clip fraction
averaged over groups; ``clip_frac`` is a token mean over the batch, and the two agree only when every group has as
many tokens (groups of 10 and 100 tokens with 0 and 10 clipped: EUR 0.95, 1 − clip_frac 0.909).

EUR averages over every prompt of the step, zero-variance groups included: their advantages are 0, so they add
nothing to the loss and a backend may leave them out of the forward/backward passes, but their tokens still have
ratios (A = 0 takes the A ≤ 0 branch: τ_neg, or the lower clip bound) and eq. 12 counts them. ``trained`` tells
:func:`policy_loss` which rows went through the update: the other diagnostics cover those rows' tokens, EUR every
row's. Where nothing has moved since the behaviour log-probs were taken (the first optimizer step on a batch),
r = 1 and f'(1) = 1 for every gate, so a group's contribution there is exactly 1 (for every method too, except
KL-Cov and Clip-Cov, whose batch-level choice marks tokens at any ratio).

Off-policy corrections (``off_policy``, arXiv 2602.19345 does not use them): when the rollouts were drawn by a
behaviour policy :math:`\pi_b` other than the trainer's policy at the start of the step, :math:`\pi_{prox}` (stale
rollouts of an asynchronous worker, ``train.staleness``; a sampler in another precision, ``train.rollout_dtype``),

* ``none``: the gate sees :math:`r = \pi_\theta/\pi_{old}` with :math:`\pi_{old}` whatever the caller passes (the
  behaviour log-probs: the native trainer passes :math:`\pi_b` whenever it differs from :math:`\pi_{prox}`);
* ``tis`` / ``mis``: the gate sees :math:`\pi_\theta/\pi_{prox}` and each token's surrogate is multiplied by the
  behaviour weight :math:`w = \mathrm{sg}(\pi_{prox}/\pi_b)`, per token (``is_level="token"``) or as the product over
  the sequence (``"sequence"``), truncated (``tis``: :math:`\min(w, C)`, and :math:`\max(\cdot, C_{low})` when given)
  or masked (``mis``: :math:`w\,\mathbf{1}[C_{low} \le w \le C]`), as TRL's ``vllm_importance_sampling_mode``
  (``token_truncate`` ... ``sequence_mask``) and verl's ``rollout_is`` (TIS; IcePop for the masked form) compute it;
* ``decoupled``: AReaL's decoupled PPO loss, the gate on :math:`\pi_\theta/\pi_{prox}` and the token weighted by
  :math:`w\,\mathbf{1}[w \le C]` per token (``behav_imp_weight_cap``). It is the computation of token-level ``mis``
  without a lower bound; AReaL's name is kept for the method it comes from.

The weight multiplies the policy surrogate only, not the KL term (TRL, verl and AReaL all do so).
:func:`importance_weights` computes it; ``old_logp`` is then :math:`\pi_{prox}` and ``behaviour_logp`` is :math:`\pi_b`.

Because every smooth gate has :math:`f_\tau(1) = 1`, at r = 1 every gate's loss equals the GRPO
surrogate :math:`-A`: logged losses are comparable across gates (SAPO's own
:math:`\frac{4}{\tau}\sigma(\tau(r-1))` differs by the constant :math:`(1 - 2/\tau)A`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from harness.gates import ClipGate, Gate, SmoothGate, effective_tau, gate_params, get_gate
from harness.keys import CLIP_FRAC, DIAG_TOKENS, EUR, IS_CAPPED_FRAC, IS_ESS, IS_WEIGHT, KL, RATIO_STATS
from harness.methods import TokenTerms

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
RATIO_LEVELS = ("token", "sequence")
OFF_POLICY_MODES = ("none", "decoupled", "tis", "mis")


def loss_kwargs(cfg: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`policy_loss` that a run config's ``gate`` and ``train.loss`` nodes set: what
    every backend passes, so that all of them compute the same loss. A gate node has only the keys its gate uses
    (clip: ε; smooth gates: τ and width; the Student-t family: ν), so only those are passed."""
    g, loss = cfg.gate, cfg.train.loss
    gate_keys = {key: g[key] for key in ("tau_pos", "tau_neg", "width", "eps_low", "eps_high", "nu") if key in g}
    own = gate_params(g)
    op = loss.off_policy
    return dict(gate=g.name, **gate_keys, **({"method_params": own} if own else {}), ratio_level=loss.ratio_level,
                agg=loss.agg, kl_beta=loss.kl_beta,
                log_ratio_clip=loss.log_ratio_clip, norm_length=loss.norm_length, off_policy=op.mode,
                is_level=op.level, is_cap=op.cap, is_cap_low=op.cap_low)


def raw_importance_weights(prox_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, level: str = "token",
                           log_ratio_clip: float = 20.0) -> Tensor:
    """π_prox/π_b before any cap (:func:`importance_weights`' first step): per token, or the product over the
    sequence's masked tokens, from log-ratios clamped to ±``log_ratio_clip``; 1 on padding. No gradient."""
    with torch.no_grad():
        log_w = torch.where(mask.bool(), prox_logp.detach() - behaviour_logp.detach(), 0.0)
        if level == "sequence":
            log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
        return torch.exp(log_w.clamp(-log_ratio_clip, log_ratio_clip))


def importance_weights(prox_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, *, mode: str, level: str = "token",
                       cap: float = 2.0, cap_low: float | None = None, log_ratio_clip: float = 20.0) -> Tensor:
    r"""The behaviour weights of an off-policy correction (module docstring), (B, T), no gradient, 0 on padding.

    .. math::  \log w_{it} = \log\pi_{prox} - \log\pi_b \;\text{(token)}, \qquad
               \log w_{it} = \textstyle\sum_t M_{it}(\log\pi_{prox} - \log\pi_b) \;\text{(sequence)}

    clamped to ±``log_ratio_clip`` before exponentiation, then ``tis``: clamp(w, C_low, C); ``mis``:
    w·1[C_low ≤ w ≤ C]; ``decoupled``: w·1[w ≤ C] (token level only). ``mode="none"`` has no weights."""
    if mode not in OFF_POLICY_MODES[1:]:
        raise ValueError(f"train.loss.off_policy.mode must be one of {', '.join(OFF_POLICY_MODES[1:])} for weights, "
                         f"got {mode!r}")
    if level not in RATIO_LEVELS or (mode == "decoupled" and level != "token"):
        allowed = "token" if mode == "decoupled" else ", ".join(RATIO_LEVELS)
        raise ValueError(f"train.loss.off_policy.level must be one of {allowed} for mode={mode}, got {level!r}")
    mask = mask.bool()
    with torch.no_grad():
        w = raw_importance_weights(prox_logp, behaviour_logp, mask, level, log_ratio_clip)
        if mode == "tis":
            w = w.clamp(min=cap_low, max=cap)
        else:
            keep = w <= cap
            if cap_low is not None and mode == "mis":
                keep &= w >= cap_low
            w = torch.where(keep, w, 0.0)
        return torch.where(mask, w, 0.0)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    gate: str | Mapping[str, Any] | Gate = "sigmoid",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    width: str = "raw",
    eps_low: float | None = None,
    eps_high: float | None = None,
    ratio_level: str = "token",
    agg: str = "seq-mean-token-mean",
    ref_logp: Tensor | None = None,
    kl_beta: float = 0.0,
    log_ratio_clip: float = 20.0,
    norm_length: int | None = None,
    nu: float | None = None,
    groups: Tensor | None = None,
    trained: Tensor | None = None,
    diagnostics: bool = True,
    behaviour_logp: Tensor | None = None,
    off_policy: str = "none",
    is_level: str = "token",
    is_cap: float = 2.0,
    is_cap_low: float | None = None,
    method_params: Mapping[str, Any] | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Gated policy-gradient loss (see the module docstring for the math).

    Args:
        logp: current per-token log-probs, (B, T), differentiable.
        old_logp: behaviour per-token log-probs, (B, T) (detached inside).
        advantages: (B,) per-sequence or (B, T) per-token advantages.
        mask: (B, T) response mask (bool or 0/1).
        gate: gate name, ``"module:attr"`` path, ``_target_`` mapping or gate object.
        tau_pos, tau_neg: temperatures for A > 0 and A <= 0 (smooth gates).
        width: ``"raw"`` or ``"hwhm"`` (τ read as sigmoid-equivalent; see :mod:`harness.gates`).
        eps_low, eps_high: the ε of clip (default 0.2/0.2) and of the ratio-control methods that have one (None: the
            method's own default, e.g. GMPO's 0.4; DPPO reads them as its divergence thresholds).
        ratio_level: ``"token"`` or ``"sequence"`` (GSPO).
        agg: one of :data:`AGG_MODES`.
        ref_logp, kl_beta: optional k3 KL penalty to a reference policy.
        log_ratio_clip: |log r| is clamped to this before exponentiation.
        norm_length: constant L of ``seq-mean-token-sum-norm`` (default T).
        nu: tail index of the ``student`` gate family (ignored by the other gates).
        groups: optional (B,) integer prompt index of each row (rows of one prompt share it): the EUR diagnostic
            is then eq. 12's group mean; without it, the token mean. Does not change the loss.
        trained: optional (B,) bool, the rows that went through the update (None: every row). The ratio
            statistics, gate weights, ``clip_frac`` and ``kl`` cover these rows' tokens; EUR covers every row, as eq.
            12 averages over every prompt of the step (rows left out of the passes, e.g. zero-variance groups, still
            have ratios). Does not change the loss.
        diagnostics: compute the diagnostics dict (plain floats over masked tokens).
        behaviour_logp: (B, T) log-probs of the policy that drew the rollouts, π_b; needed by an ``off_policy``
            correction, for which ``old_logp`` is π_prox (the trainer's policy at the start of the step).
        off_policy, is_level, is_cap, is_cap_low: the correction and its weights (:func:`importance_weights`).
        method_params: the own keys of dual-clip (``clip_c``) and of the methods of :mod:`harness.methods`
            (``eps_max``, ``beta_low``, ...).
        token_weights: optional (B, T) weights w ≥ 0 (no gradient) multiplying each token's surrogate, as verl's
            ``rollout_is_weights``; a sequence-level method (GMPO) takes their geometric mean over the sequence.

    Returns:
        ``(loss, diagnostics)``; diagnostics hold ratio statistics, mean and 95th percentile of |r − 1|, mean gate
        weight, fractions of tokens with w < 0.5 / w < 0.1, the EUR (and ``clip_frac`` for clip, dual-clip and the
        methods of :mod:`harness.methods`: the share their rule acts on), each also split by
        advantage sign with suffixes ``_pos`` / ``_neg`` (A = 0 counts as ``_neg``, as it takes τ_neg), plus ``kl``
        when a reference is given. Without trained tokens (a step where every group has zero variance) only the
        EUR keys are present. With a correction also ``is_weight``, ``is_ess`` and ``is_capped_frac``.
    """
    g = get_gate(gate, eps_low=eps_low, eps_high=eps_high, nu=nu, params=method_params)
    if getattr(g, "sequence_level", False) and (agg != "seq-mean-token-mean" or ratio_level != "token"):
        raise ValueError(f"gate {g.name!r} forms its own per-sequence ratio: it needs train.loss.agg="
                         f"seq-mean-token-mean and train.loss.ratio_level=token, got {agg!r} and {ratio_level!r}")
    if off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"train.loss.off_policy.mode must be one of {', '.join(OFF_POLICY_MODES)}, got {off_policy!r}")
    if off_policy != "none" and behaviour_logp is None:
        raise ValueError(f"train.loss.off_policy.mode={off_policy} needs the behaviour log-probs (behaviour_logp)")
    if off_policy != "none":
        assert behaviour_logp is not None
        if behaviour_logp.shape != logp.shape:
            raise ValueError(f"behaviour_logp has shape {tuple(behaviour_logp.shape)} but logp has {tuple(logp.shape)}")
        if not (is_cap > 0 and (is_cap_low is None or 0 <= is_cap_low <= is_cap)):
            raise ValueError(f"train.loss.off_policy needs cap > 0 and 0 <= cap_low <= cap (or cap_low null), got "
                             f"cap={is_cap!r}, cap_low={is_cap_low!r}")
    mask, advantages = _validate(logp, old_logp, advantages, mask, ref_logp, tau_pos, tau_neg,
                                 ratio_level, agg, log_ratio_clip, kl_beta, norm_length)
    tp, tn = effective_tau(g, tau_pos, width), effective_tau(g, tau_neg, width)

    # Padding may hold anything (even NaN): zero it before it can reach a sum.
    log_ratio = torch.where(mask, logp - old_logp.detach(), 0.0)
    if ratio_level == "sequence":
        seq_len = mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(-1, keepdim=True) / seq_len).expand_as(logp)
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clip, log_ratio_clip))

    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    # Padded advantages may be NaN too: 0·NaN in the backward would otherwise leak into GSPO's
    # per-sequence sum of the log-ratio gradient.
    adv = torch.where(mask, adv, 0.0)
    pos = adv > 0
    terms = None
    if isinstance(g, SmoothGate):
        # not torch.where(pos, tp, tn): on Python floats that builds a float32 tensor (τ rounded)
        tau = torch.full_like(adv, tn).masked_fill_(pos, tp)
        surrogate = g.surrogate(ratio, adv, tau)
    elif isinstance(g, ClipGate):
        tau = None
        surrogate = g.surrogate(ratio, adv)
    else:
        tau = None
        terms = TokenTerms(logp=torch.where(mask, logp, 0.0), old_logp=torch.where(mask, old_logp.detach(), 0.0),
                           log_ratio=log_ratio.clamp(-log_ratio_clip, log_ratio_clip), ratio=ratio, adv=adv, mask=mask)
        surrogate = g.surrogate(terms)
    per_token = -surrogate
    is_w = None
    if off_policy != "none":
        assert behaviour_logp is not None
        is_w = importance_weights(old_logp, behaviour_logp, mask, mode=off_policy, level=is_level, cap=is_cap,
                                  cap_low=is_cap_low, log_ratio_clip=log_ratio_clip)
    weights = is_w if token_weights is None else token_weights.detach() * (1.0 if is_w is None else is_w)
    if weights is not None and getattr(g, "folds_weights", False):  # VESPO: into its own weight, as TRL
        assert terms is not None
        if off_policy != "none" and is_level != "token":  # Σ_t log w would count a sequence weight |y| times
            raise ValueError(f"gate {g.name!r} folds per-token importance weights into its sequence ratio (as TRL): "
                             f"train.loss.off_policy.level must be token, got {is_level!r}")
        terms = dataclasses.replace(terms, weights=weights)
        per_token = -g.surrogate(terms)
    elif weights is not None:
        if getattr(g, "sequence_level", False):  # verl's geo_mean: the weights' geometric mean per sequence
            m = mask.to(logp.dtype)
            weights = torch.exp((torch.log(weights + 1e-10) * m).sum(-1, keepdim=True)
                                / (m.sum(-1, keepdim=True) + 1e-8)).expand_as(logp)
        per_token = per_token * weights

    kl = None
    if ref_logp is not None and kl_beta != 0.0:
        delta = torch.where(mask, ref_logp.detach() - logp, 0.0).clamp(-log_ratio_clip, log_ratio_clip)
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_beta * kl

    loss = aggregate(per_token, mask, agg, norm_length)
    if not diagnostics:
        return loss, {}
    for key, rows in (("groups", groups), ("trained", trained)):
        if rows is not None and tuple(rows.shape) != tuple(logp.shape[:1]):
            raise ValueError(f"{key} must have shape (B,)={tuple(logp.shape[:1])}, got {tuple(rows.shape)}")
    stats_mask = mask if trained is None else mask & trained.to(mask.device).bool().unsqueeze(-1)
    with torch.no_grad():
        if terms is not None:
            kept = g.kept(terms)  # bool, or a continuous weight in [0, 1] (VESPO)
            weight = kept.to(ratio.dtype)
            clipped = ~kept if kept.dtype == torch.bool else kept < 0.5
        else:
            weight = g.weight(ratio.detach(), adv, tau)
            clipped = g.clipped(ratio.detach(), adv) if isinstance(g, ClipGate) else None
        diag = _diagnostics(ratio.detach(), weight, clipped, mask, pos, groups, stats_mask)
        if kl is not None and bool(stats_mask.any()):
            diag[KL] = float(aggregate(kl.detach(), stats_mask, "token-mean"))
        if is_w is not None and bool(stats_mask.any()):
            diag.update(_is_diagnostics(is_w, old_logp, behaviour_logp, stats_mask, is_level, log_ratio_clip))
    return loss, diag


def _is_diagnostics(applied: Tensor, prox_logp: Tensor, behaviour_logp: Tensor, sel: Tensor, level: str,
                    log_ratio_clip: float) -> dict[str, float]:
    """The applied weights' mean, the Kish ESS fraction of the raw weights, and the share the cap changed."""
    raw = raw_importance_weights(prox_logp, behaviour_logp, sel, level, log_ratio_clip)[sel].double()
    return {IS_WEIGHT: float(applied[sel].double().mean()), IS_ESS: kish_ess(raw),
            IS_CAPPED_FRAC: float((applied[sel].double() != raw).double().mean())}


def kish_ess(weights: Tensor) -> float:
    r"""Kish's effective sample size of importance weights as a fraction of their number:
    :math:`(\sum_i w_i)^2 / (n \sum_i w_i^2)` (1 for equal weights, 1/n when one weight carries everything)."""
    w = weights.double()
    return float(w.sum().square() / (w.numel() * w.square().sum()).clamp(min=1e-300))


def aggregate(per_token: Tensor, mask: Tensor, agg: str = "seq-mean-token-mean",
              norm_length: int | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss over a bool mask with one of :data:`AGG_MODES`."""
    masked = torch.where(mask, per_token, 0.0)
    if agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        lengths = mask.sum(-1)
        has_tokens = lengths > 0
        seq_means = masked.sum(-1) / lengths.clamp(min=1)
        return seq_means.sum() / has_tokens.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else per_token.shape[-1]
        return masked.sum() / (per_token.shape[0] * length)
    if agg == "seq-mean-token-sum":
        return masked.sum() / (mask.sum(-1) > 0).sum().clamp(min=1)
    raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {agg!r}")


def micro_batch_weight(micro_mask: Tensor, batch_mask: Tensor, agg: str = "seq-mean-token-mean") -> float:
    """Factor that makes gradient accumulation exact: Σ_micro weight·aggregate(micro) equals
    aggregate(batch) for the aggregation ``agg`` when the micro-batches partition the batch's rows."""
    micro_mask, batch_mask = micro_mask.bool(), batch_mask.bool()
    if agg == "token-mean":
        return float(micro_mask.sum()) / max(float(batch_mask.sum()), 1.0)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float((micro_mask.sum(-1) > 0).sum()) / max(float((batch_mask.sum(-1) > 0).sum()), 1.0)
    if agg == "seq-mean-token-sum-norm":
        return micro_mask.shape[0] / batch_mask.shape[0]
    raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {agg!r}")


def _validate(logp, old_logp, advantages, mask, ref_logp, tau_pos, tau_neg, ratio_level, agg,
              log_ratio_clip, kl_beta, norm_length) -> tuple[Tensor, Tensor]:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {ratio_level!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {agg!r}")
    for key, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {tau!r}")
    if not (log_ratio_clip > 0):
        raise ValueError(f"log_ratio_clip must be > 0, got {log_ratio_clip!r}")
    if not math.isfinite(kl_beta) or kl_beta < 0:
        raise ValueError(f"kl_beta must be a finite number >= 0, got {kl_beta!r}")
    if norm_length is not None and norm_length <= 0:
        raise ValueError(f"norm_length must be > 0, got {norm_length!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    same_shape = [("old_logp", old_logp), ("mask", mask)] + ([("ref_logp", ref_logp)] if ref_logp is not None else [])
    for key, t in same_shape:
        if t.shape != logp.shape:
            raise ValueError(f"{key} has shape {tuple(t.shape)} but logp has {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must have shape (B,)={tuple(logp.shape[:1])} or (B, T)="
                         f"{tuple(logp.shape)}, got {tuple(advantages.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask is empty: no response token to compute a loss on")
    adv_tok = advantages.unsqueeze(-1).expand_as(mask) if advantages.dim() == 1 else advantages
    checks = (("logp", logp.detach()), ("old_logp", old_logp.detach()), ("advantages", adv_tok))
    if ref_logp is not None:
        checks += (("ref_logp", ref_logp.detach()),)
    for key, t in checks:
        if not bool(torch.isfinite(t[mask]).all()):
            raise ValueError(f"{key} contains NaN or inf at unmasked positions")
    return mask, advantages


def effective_update_ratio(weight: Tensor, sel: Tensor, groups: Tensor | None = None) -> float:
    """EUR (module docstring) of the tokens in the bool mask ``sel``: the per-group token mean of ``weight``
    averaged over the groups that have selected tokens; the plain token mean when ``groups`` is None."""
    w = torch.where(sel, weight, 0.0).double()
    if groups is None:
        return float(w.sum() / sel.sum())
    _, index = torch.unique(groups.to(w.device), return_inverse=True)
    num = torch.zeros(int(index.max()) + 1, dtype=torch.float64, device=w.device).index_add_(0, index, w.sum(-1))
    den = torch.zeros_like(num).index_add_(0, index, sel.sum(-1).double())
    has = den > 0
    return float((num[has] / den[has]).mean())


def _diagnostics(ratio: Tensor, weight: Tensor, clipped: Tensor | None, mask: Tensor, pos: Tensor,
                 groups: Tensor | None = None, stats_mask: Tensor | None = None) -> dict[str, float]:
    """The diagnostics of :func:`policy_loss` from the ratios, each token's gradient weight (a method's ``kept``
    share) and the tokens a hard method cuts: statistics over the tokens of ``stats_mask`` (default ``mask``), EUR
    over every token of ``mask``."""
    stats_mask = mask if stats_mask is None else stats_mask
    out: dict[str, float] = {}
    for suffix, sign in (("", None), ("_pos", pos), ("_neg", ~pos)):
        every = mask if sign is None else mask & sign
        sel = stats_mask if sign is None else stats_mask & sign
        n = int(sel.sum())
        if n > 0:
            stats = _ratio_stats(ratio[sel].double(), weight[sel].double())
            out.update({f"{k}{suffix}": v for k, v in zip(RATIO_STATS, stats, strict=True)})
            out[f"{DIAG_TOKENS}{suffix}"] = float(n)
        if bool(every.any()):
            out[f"{EUR}{suffix}"] = effective_update_ratio(weight, every, groups)
        if clipped is not None and n > 0:
            out[f"{CLIP_FRAC}{suffix}"] = float(clipped[sel].double().mean())
    return out


def _ratio_stats(r: Tensor, w: Tensor) -> list[float]:
    """:data:`~harness.keys.RATIO_STATS` of a set of tokens' ratios ``r`` and gate weights ``w`` (1-D, float64)."""
    dev = (r - 1.0).abs()
    small = r.numel() <= 16_000_000  # torch.quantile's input limit
    nan = r.new_tensor(float("nan"))
    # q on r's device: torch.quantile refuses a CPU q for a CUDA input
    q = torch.quantile(r, torch.tensor([0.05, 0.95], dtype=r.dtype, device=r.device)) if small else None
    return torch.stack([
        r.mean(), r.std(unbiased=False), r.min(), r.max(),
        q[0] if q is not None else nan,
        q[1] if q is not None else nan,
        dev.mean(), torch.quantile(dev, 0.95) if small else nan,
        w.mean(), (w < 0.5).double().mean(), (w < 0.1).double().mean(),
        r.new_tensor(kish_ess(r)),
    ]).tolist()
