r"""verl plugin: every harness gate as a verl policy loss, and the harness reward as verl's reward function.

verl (0.9.1) picks its policy loss by name from a registry
(``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``) and calls it as

.. code-block:: python

    loss, metrics = fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                       rollout_is_weights=None)

Importing this module registers one name per gate, ``harness_<gate>`` for every gate in
:func:`harness.gates.known_gates` (``harness_sigmoid``, ``harness_erf``, ``harness_arctan``,
``harness_softsign``, ``harness_clip``, ...) plus ``harness_custom`` (an import-path gate, read from
``$HARNESS_VERL_GATE``). One name per gate, because verl's actor config dataclasses reject unknown
keys, so the gate cannot be a config value. Each calls :func:`harness.objective.policy_loss`, the
one loss every backend uses. Parameters come from where verl already has them:

* τ_pos / τ_neg: ``actor.tau_pos`` / ``actor.tau_neg`` (the keys verl's own SAPO loss reads);
* ε_low / ε_high of ``clip`` and of the methods that have one: ``actor.clip_ratio_low`` / ``actor.clip_ratio_high``;
* aggregation: ``actor.loss_agg_mode`` (``seq-mean-token-mean``, ``token-mean``, ``seq-mean-token-sum`` or
  ``seq-mean-token-sum-norm``; L of the last is ``actor.loss_scale_factor``);
* what verl has no key for comes from environment variables, which the launcher passes to every Ray
  worker through ``ray_kwargs.ray_init.runtime_env.env_vars``: ``HARNESS_VERL_WIDTH`` (raw | hwhm),
  ``HARNESS_VERL_RATIO_LEVEL`` (token | sequence), ``HARNESS_VERL_LOG_RATIO_CLIP`` (default 20, the
  same clamp verl's built-in losses apply), ``HARNESS_VERL_NU`` (the ``student`` gate's tail index).

Global-batch normalisation. verl splits a mini-batch into micro-batches (and data-parallel ranks) and
sums their gradients, so each micro-batch loss must be normalised by the *global* mini-batch, which
verl passes in ``config.global_batch_info`` (``dp_size``, ``global_batch_size`` in sequences,
``batch_num_tokens``). :func:`harness.objective.policy_loss` normalises over the micro-batch it sees,
so the result is rescaled:

.. math::

    \text{seq-mean-token-mean:}\quad L = L_{local}\cdot\frac{B'_{local}\, d}{B_{global}}, \qquad
    \text{token-mean:}\quad L = L_{local}\cdot\frac{N_{local}\, d}{N_{global}}, \qquad
    \text{seq-mean-token-sum-norm:}\quad L = L_{local}\cdot\frac{B_{local}\, d}{B_{global}}

(B' = sequences with at least one token, N = tokens, d = data-parallel size), which is exactly verl's
own ``agg_loss``. Rollout-correction weights w ≥ 0 (``rollout_is_weights``) multiply each token's
surrogate (``policy_loss(token_weights=...)``), verl's ``pg_losses * rollout_is_weights``; GMPO takes their
geometric mean over the sequence, as verl's ``geo_mean`` does.

The ratio-control methods of :mod:`harness.methods` and dual-clip register as ``harness_<name>`` too. Their own
keys come from verl's config where verl has one (``clip_c`` ← ``actor.clip_ratio_c``, ``dro_beta``,
``kl_cov_ratio``, ``kl_coef`` and ``clip_cov_*`` ← ``actor.policy_loss.dro_beta`` / ``kl_cov_ratio`` /
``ppo_kl_coef`` / ``clip_cov_*``), the rest
from ``HARNESS_VERL_GATE_PARAMS`` (JSON; the launcher writes every own key but ``clip_c`` there, so it also
overrides verl's values).

The KL penalty is not part of this loss in verl: verl adds it itself (``actor.use_kl_loss``,
``kl_loss_type=low_var_kl``, the clamped k3 estimator), see :func:`harness.backends.verl.verl_overrides`.

How the module gets loaded in every process (driver, trainer and rollout workers): the ``verl.plugins``
entry point (``import verl`` loads it; load errors are swallowed by verl, so the launcher also sets the
fallback ``VERL_USE_EXTERNAL_MODULES=harness.backends.verl_plugin``, which verl imports loudly).

The reward: :func:`compute_score` (``reward.custom_reward_function.path=pkg://harness.backends.verl_plugin``,
``name=compute_score``) is the native backend's reward,
format_weight·format + accuracy_weight·[answer correct] (+ extra reward functions), judged by
:mod:`harness.scoring`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from harness.gates import DUAL_CLIP_C, known_gates
from harness.objective import AGG_MODES, policy_loss

LOSS_PREFIX = "harness_"
CUSTOM_LOSS = "harness_custom"
# What verl's actor config has no key for travels in HARNESS_VERL_<KEY> environment variables: a custom gate's import
# path, gate.width, train.loss.ratio_level and log_ratio_clip, and the Student-t family's tail index nu.
ENV_VARS = ENV_GATE, ENV_WIDTH, ENV_RATIO_LEVEL, ENV_LOG_RATIO_CLIP, ENV_NU, ENV_GATE_PARAMS = tuple(
    f"HARNESS_VERL_{key}" for key in ("GATE", "WIDTH", "RATIO_LEVEL", "LOG_RATIO_CLIP", "NU", "GATE_PARAMS"))
# The methods' keys verl has a config key for: dual-clip's and DPPO's c is actor.clip_ratio_c, the others sit in
# actor.policy_loss (their values there apply unless $HARNESS_VERL_GATE_PARAMS names the key).
VERL_POLICY_LOSS_KEYS = {"dro_beta": "dro_beta", "kl_cov_ratio": "kl_cov_ratio", "kl_coef": "ppo_kl_coef",
                         "clip_cov_ratio": "clip_cov_ratio", "clip_cov_lb": "clip_cov_lb", "clip_cov_ub": "clip_cov_ub"}

_log = logging.getLogger(__name__)


def loss_name(gate: str) -> str:
    """The verl ``loss_mode`` that runs ``gate``: ``harness_<gate>`` for a registered gate name,
    ``harness_custom`` for an import path (the path itself travels in ``$HARNESS_VERL_GATE``)."""
    return f"{LOSS_PREFIX}{gate}" if gate in known_gates() else CUSTOM_LOSS


def registered_loss_names() -> tuple[str, ...]:
    """Every name :func:`register` puts in verl's policy-loss registry."""
    return (*(f"{LOSS_PREFIX}{g}" for g in known_gates()), CUSTOM_LOSS)


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from verl's ActorConfig dataclass, a DictConfig or a plain mapping."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(key, default)
    elif hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def loss_options(config: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`harness.objective.policy_loss` (less gate/agg) from verl's actor
    config and the ``HARNESS_VERL_*`` environment variables."""
    env = os.environ if env is None else env
    clip = _cfg_get(config, "clip_ratio", 0.2)
    params: dict[str, float] = {"clip_c": float(_cfg_get(config, "clip_ratio_c", DUAL_CLIP_C))}
    policy = _cfg_get(config, "policy_loss", None)
    for ours, theirs in VERL_POLICY_LOSS_KEYS.items():
        value = _cfg_get(policy, theirs, None)
        if value is not None:
            params[ours] = float(value)
    params.update(json.loads(env.get(ENV_GATE_PARAMS) or "{}"))
    return dict(
        method_params=params,
        tau_pos=float(_cfg_get(config, "tau_pos", 1.0)),
        tau_neg=float(_cfg_get(config, "tau_neg", 1.05)),
        eps_low=float(_cfg_get(config, "clip_ratio_low", clip)),
        eps_high=float(_cfg_get(config, "clip_ratio_high", clip)),
        width=env.get(ENV_WIDTH, "raw") or "raw",
        ratio_level=env.get(ENV_RATIO_LEVEL, "token") or "token",
        log_ratio_clip=float(env.get(ENV_LOG_RATIO_CLIP, "") or 20.0),
        nu=float(env[ENV_NU]) if env.get(ENV_NU) else None,
    )


def global_batch_scale(mask: Tensor, agg: str, batch_info: Mapping[str, Any] | None) -> float:
    """Factor turning a micro-batch-normalised loss into verl's global-batch normalisation (see the
    module docstring). 1.0 when verl passes no global batch info (one micro-batch, one rank)."""
    info = dict(batch_info or {})
    dp = int(info.get("dp_size") or 1)
    mask = mask.bool()
    if agg == "token-mean":
        total = info.get("batch_num_tokens")
        if total is None:
            return float(dp)  # verl: dp_size must be 1 here, and then the factor is 1
        return float(mask.sum()) * dp / float(total)
    nonempty = float((mask.sum(-1) > 0).sum())
    total = info.get("global_batch_size")
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return (nonempty * dp / float(total)) if total is not None else float(dp)
    if agg == "seq-mean-token-sum-norm":
        # harness divides by the row count B, verl by the global (or local non-empty) sequence count
        rows = float(mask.shape[0])
        return rows * dp / float(total if total is not None else max(nonempty, 1.0))
    raise ValueError(f"loss_agg_mode {agg!r} is not supported by the harness objective: use one of "
                     f"{', '.join(AGG_MODES)} (actor_rollout_ref.actor.loss_agg_mode)")


def verl_policy_loss(
    gate: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The harness objective with verl's policy-loss signature for ``gate`` (name or import path).

    Returns ``(loss, metrics)``: verl's usual ``actor/pg_clipfrac``, ``actor/ppo_kl`` and
    ``actor/pg_clipfrac_lower`` plus every harness diagnostic as ``actor/harness/<name>`` (verl
    averages them over micro-batches).
    """
    opts = loss_options(config)
    batch_info = _cfg_get(config, "global_batch_info", {}) or {}
    norm_length = batch_info.get("loss_scale_factor") or _cfg_get(config, "loss_scale_factor", None)
    weights = None if rollout_is_weights is None else rollout_is_weights.to(log_prob.dtype)
    loss, diag = policy_loss(log_prob, old_log_prob, advantages, response_mask, gate=gate, agg=loss_agg_mode,
                             norm_length=norm_length, token_weights=weights, **opts)
    loss = loss * global_batch_scale(response_mask, loss_agg_mode, batch_info)

    with torch.no_grad():
        mask = response_mask.bool()
        neg_kl = torch.where(mask, log_prob.detach() - old_log_prob.detach(), 0.0)
        ppo_kl = float(-neg_kl.sum() / mask.sum().clamp(min=1))
    metrics: dict[str, float] = {
        # verl's own keys: pg_clipfrac is the share the gate's or method's rule acts on (smooth gates: nothing, as
        # verl's sapo reports); the dual-clip share is not split out (pg_clipfrac_lower 0), the harness diagnostics
        # below carry the rest.
        "actor/pg_clipfrac": diag.get("clip_frac", 0.0),
        "actor/pg_clipfrac_lower": 0.0,
        "actor/ppo_kl": ppo_kl,
    }
    metrics.update({f"actor/harness/{k}": float(v) for k, v in diag.items() if math.isfinite(v)})
    return loss, metrics


def make_policy_loss(gate: str | None) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """A verl policy-loss function bound to ``gate`` (``None``: the import path in ``$HARNESS_VERL_GATE``)."""

    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        spec = gate
        if spec is None:
            spec = os.environ.get(ENV_GATE)
            if not spec:
                raise ValueError(f"loss_mode={CUSTOM_LOSS} needs the gate's import path in ${ENV_GATE} "
                                 "(set by the harness launcher through ray runtime_env env_vars)")
        return verl_policy_loss(spec, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                rollout_is_weights)

    loss_fn.__name__ = f"{LOSS_PREFIX}{gate or 'custom'}_policy_loss"
    loss_fn.__doc__ = f"harness.objective.policy_loss with gate={gate or '$' + ENV_GATE!r} (verl signature)."
    return loss_fn


def register() -> tuple[str, ...]:
    """Register every harness gate in verl's policy-loss registry (idempotent); returns the names."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    for gate in known_gates():
        register_policy_loss(f"{LOSS_PREFIX}{gate}")(make_policy_loss(gate))
    register_policy_loss(CUSTOM_LOSS)(make_policy_loss(None))
    return registered_loss_names()


# ----------------------------------------------------------------------------- reward


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    *,
    format_weight: float = 1.0,
    accuracy_weight: float = 1.0,
    format_mode: str = "graded",
    accuracy_fallbacks: Sequence[str] = (),
    extra_paths: Sequence[str] = (),
    extra_weights: Sequence[float] = (),
    **_: Any,
) -> dict[str, float]:
    """verl custom reward: :func:`harness.rewards.rollout_rewards` of one response, the reward every backend trains
    on. Returns verl's dict form: ``score`` plus ``format`` and ``accuracy`` (logged by verl as reward extra info).
    """
    from harness.rewards import reward_spec, rollout_rewards

    if len(extra_paths) != len(extra_weights):
        raise ValueError(f"extra_paths and extra_weights differ in length: {len(extra_paths)} vs {len(extra_weights)}")
    spec = reward_spec({"format": format_mode, "format_weight": format_weight, "accuracy_weight": accuracy_weight,
                        "accuracy_fallbacks": list(accuracy_fallbacks),
                        "extra": [{"path": p, "weight": w} for p, w in zip(extra_paths, extra_weights, strict=True)]})
    info = dict(extra_info or {})
    problem = {"id": str(info.get("id", "")), "problem": str(info.get("problem", "")), "answer": str(ground_truth)}
    r = rollout_rewards([solution_str], [str(ground_truth)], [problem], spec)
    return {"score": r.total[0], "format": r.format[0], "accuracy": r.accuracy[0]}


# Registration happens on import: this is what verl's entry point / VERL_USE_EXTERNAL_MODULES load. Without
# verl installed (the main environment imports this module for compute_score) there is nothing to register;
# with verl installed, a failing import must surface, not silently leave the losses unregistered.
if importlib.util.find_spec("verl") is not None:
    register()
else:  # pragma: no cover - exercised only where verl is missing
    _log.debug("verl is not installed: harness policy losses not registered")
