r"""Every statistic the harness reports, once: the evaluator, the training gain, the tiny-model build and the
report all call these.

Conventions: an *item* is one problem of a benchmark; its score :math:`a_p \in [0, 1]` is the mean correctness of
its k samples (the pass@1 estimate). A benchmark accuracy is :math:`\bar a = \frac1n\sum_p a_p`. Bootstraps are
seeded (``numpy.random.default_rng(seed)``) so a report is reproducible to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOOT_SEED = 0
N_BOOT = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased pass@k of Chen et al. (2021) for n samples of which c are correct:

    .. math::  \mathrm{pass@}k = 1 - \binom{n-c}{k} \Big/ \binom{n}{k}
               = 1 - \prod_{i=n-c+1}^{n} \left(1 - \frac{k}{i}\right)

    (the product form, which needs no huge binomials).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    r"""Percentile bootstrap CI of the mean of ``values`` (one value per item): resample n items with
    replacement ``n_boot`` times, take the :math:`\alpha/2` and :math:`1-\alpha/2` quantiles of the resampled means.

    Resampling items (not samples) keeps the k samples of a problem together: the uncertainty of a benchmark score
    is about which problems were drawn.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1 or n_boot <= 0:
        return (float(arr.mean()), float(arr.mean()))
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def bootstrap_se(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> float:
    r"""Bootstrap standard error of the mean of ``values``: the standard deviation (ddof 1) of ``n_boot`` resampled
    means. NaN for fewer than two values."""
    arr = np.asarray(values, dtype=float)
    if arr.size < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    return float(means.std(ddof=1))


def per_problem_correct(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Item scores :math:`a_p`: mean correctness per ``problem_id`` over all of its records (the k samples; pooled
    over seeds too when records of several runs are passed)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        acc.setdefault(str(r["problem_id"]), []).append(float(bool(r["correct"])))
    return {pid: sum(v) / len(v) for pid, v in acc.items()}


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = N_BOOT, level: float = 0.95,
                     seed: int = BOOT_SEED) -> dict[str, Any]:
    r"""Paired difference :math:`\bar d = \frac1n\sum_p (a_p - b_p)` over the items both have, with a percentile
    bootstrap CI that resamples items (pairs stay together, so the difficulty both share cancels), its bootstrap
    SE and the bootstrap share of resampled means :math:`\le 0` (``p_le_0``)."""
    common = sorted(set(a) & set(b))
    n = len(common)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    d = np.array([a[p] - b[p] for p in common], dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"n": n, "diff": float(d.mean()), "se": float(means.std(ddof=1)) if n_boot > 1 else float("nan"),
            "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1 - alpha)), "p_le_0": float((means <= 0).mean()),
            "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a))}


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile :math:`t_{(1+\\text{level})/2,\\ \\text{dof}}`."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def seed_interval(acc: Sequence[float], ci_low: Sequence[float], ci_high: Sequence[float], *,
                  level: float = 0.95) -> dict[str, Any]:
    r"""A configuration's accuracy over its seeds with one interval for both sources of variation.

    One seed: that run's accuracy and its bootstrap CI over problems, as logged. :math:`n \ge 2` seeds: the mean
    :math:`\bar a` over seeds and the half-width

    .. math::  h = \sqrt{\overline{h_{boot}}^{\,2} + \left(t_{n-1}\, s / \sqrt n\right)^2}

    where :math:`\overline{h_{boot}}` is the mean per-seed bootstrap half-width (which problems) and :math:`s` the
    standard deviation of the seeds' accuracies (which training run), clipped to [0, 1].
    """
    a = np.asarray(acc, dtype=float)
    lo = np.asarray(ci_low, dtype=float)
    hi = np.asarray(ci_high, dtype=float)
    n = a.size
    if n == 1:
        return {"acc": float(a[0]), "ci_low": float(lo[0]), "ci_high": float(hi[0]),
                "ci_kind": "bootstrap over problems"}
    mean = float(a.mean())
    hw_boot = float(np.nanmean((hi - lo) / 2)) if np.isfinite(hi - lo).any() else 0.0
    hw_seed = t_quantile(level, n - 1) * float(a.std(ddof=1)) / math.sqrt(n)
    hw = math.hypot(hw_boot, hw_seed)
    # Accuracy lives in [0, 1]; a t-interval over 2-3 seeds easily reaches past it (t = 12.7 at 1 dof).
    return {"acc": mean, "ci_low": max(0.0, mean - hw), "ci_high": min(1.0, mean + hw), "acc_min": float(a.min()),
            "acc_max": float(a.max()), "hw": hw, "hw_boot": hw_boot, "hw_seed": hw_seed,
            "ci_kind": "bootstrap ⊕ t over seeds"}

