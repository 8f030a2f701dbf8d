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



# ------------------------------------------------------------------------------------------ seeds × problems
#
# A configuration evaluated with S seeds (training runs) on the same n problems gives a matrix a[s, p] of item scores.
# Both axes are samples: the seeds of all training runs one could have made, the problems of all one could have
# asked. The design is crossed (every seed answers every problem), so the variance of the grand mean has three parts
# (a two-way random-effects model a[s, p] = mu + u_s + v_p + e_sp):
#
#     Var(mean) = sigma_u^2 / S + sigma_v^2 / n + sigma_e^2 / (S n).
#
# Resampling problems alone (pooling the seeds) sees only the last two terms; with few seeds and real seed-to-seed
# spread that interval is too narrow. Everything below keeps all three.


def crossed_components(a: Any) -> dict[str, float]:
    r"""ANOVA mean squares of a crossed S × n score matrix and the variance of its grand mean.

    .. math::

        MS_S = \frac{n \sum_s (\bar a_{s\cdot} - \bar a)^2}{S-1}, \quad
        MS_P = \frac{S \sum_p (\bar a_{\cdot p} - \bar a)^2}{n-1}, \quad
        MS_E = \frac{\sum_{s,p} (a_{sp} - \bar a_{s\cdot} - \bar a_{\cdot p} + \bar a)^2}{(S-1)(n-1)}

    with :math:`E[MS_S] = \sigma_e^2 + n\sigma_u^2`, :math:`E[MS_P] = \sigma_e^2 + S\sigma_v^2`,
    :math:`E[MS_E] = \sigma_e^2`, so the unbiased variance of :math:`\bar a` is
    :math:`\hat V = (MS_S + MS_P - MS_E) / (S n)` (floored at :math:`MS_P / (Sn)` when seeds vary less than their
    noise), with Satterthwaite degrees of freedom
    :math:`\nu = \hat V^2 / \sum_i (c_i MS_i)^2 / \nu_i`. One seed: :math:`\hat V = MS_P / n`, :math:`\nu = n - 1`
    (problems only: say so, seed variance is unknown). Also returns the variance components
    :math:`\hat\sigma_u^2, \hat\sigma_v^2, \hat\sigma_e^2` (floored at 0)."""
    a = np.asarray(a, dtype=float)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"need an S x n score matrix with n >= 2 problems, got shape {a.shape}")
    S, n = a.shape
    grand = float(a.mean())
    row, col = a.mean(axis=1), a.mean(axis=0)
    ms_p = S * float(((col - grand) ** 2).sum()) / (n - 1)
    if S == 1:
        v = ms_p / n
        return {"S": 1, "n": n, "mean": grand, "var": v, "se": math.sqrt(v), "df": float(n - 1), "ms_s": math.nan,
                "ms_p": ms_p, "ms_e": math.nan, "sigma2_seed": math.nan, "sigma2_problem": ms_p,
                "sigma2_resid": math.nan}
    ms_s = n * float(((row - grand) ** 2).sum()) / (S - 1)
    resid = a - row[:, None] - col[None, :] + grand
    ms_e = float((resid ** 2).sum()) / ((S - 1) * (n - 1))
    terms = [(1.0, ms_s, S - 1), (1.0, ms_p, n - 1), (-1.0, ms_e, (S - 1) * (n - 1))]
    v = (ms_s + ms_p - ms_e) / (S * n)
    if v < ms_p / (S * n):  # seeds vary less than their noise: never report less than the problem term
        v, terms = ms_p / (S * n), [(1.0, ms_p, n - 1)]
    denom = sum((c * ms) ** 2 / df for c, ms, df in terms if df > 0)
    df = (v * S * n) ** 2 / denom if denom > 0 else float(n - 1)
    return {"S": S, "n": n, "mean": grand, "var": v, "se": math.sqrt(max(v, 0.0)), "df": float(df), "ms_s": ms_s,
            "ms_p": ms_p, "ms_e": ms_e, "sigma2_seed": max(0.0, (ms_s - ms_e) / n),
            "sigma2_problem": max(0.0, (ms_p - ms_e) / S), "sigma2_resid": ms_e}


def two_stage_interval(a: Any, *, level: float = 0.95, n_draws: int = 20_000, seed: int = BOOT_SEED) -> dict[str, Any]:
    r"""Interval for the grand mean of a crossed S × n score matrix (seeds × problems) that includes both the
    seed-to-seed and the problem-to-problem variance: a two-stage parametric bootstrap of the variance components,
    which is Weerahandi's generalized pivotal quantity for this design. Each draw redraws the seed stage and the
    problem stage,

    .. math::

        MS_S^* = \frac{MS_S}{\chi^2_{S-1}/(S-1)},\quad MS_P^* = \frac{MS_P}{\chi^2_{n-1}/(n-1)},\quad
        MS_E^* = \frac{MS_E}{\chi^2_{(S-1)(n-1)}/((S-1)(n-1))},

    :math:`V^* = \max(MS_S^* + MS_P^* - MS_E^*,\ MS_P^*)/(Sn)` and :math:`R = \bar a - Z\sqrt{V^*}` with
    :math:`Z \sim N(0, 1)`; the interval is R's :math:`\alpha/2` and :math:`1-\alpha/2` quantiles and the two-sided
    p-value of "mean = 0" is :math:`2\min(P(R \le 0), P(R \ge 0))`. Each draw is used with Z and −Z (antithetic), so
    the interval of −a is exactly the mirror of the interval of a. With 3 seeds it is wide when the seeds disagree,
    because 2 degrees of freedom say little about the seed variance; that width is the honest answer. One seed:
    the problem stage only (``seed_variance_included`` is False). Seeded, so a report is reproducible."""
    c = crossed_components(a)
    S, n = c["S"], c["n"]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n_draws)
    ms_p = c["ms_p"] / (rng.chisquare(n - 1, n_draws) / (n - 1))
    if S == 1:
        v = ms_p / n
    else:
        ms_s = c["ms_s"] / (rng.chisquare(S - 1, n_draws) / (S - 1))
        df_e = (S - 1) * (n - 1)
        ms_e = c["ms_e"] / (rng.chisquare(df_e, n_draws) / df_e)
        v = np.maximum(ms_s + ms_p - ms_e, ms_p) / (S * n)
    # antithetic normal draws (each variance draw with +z and -z): R is exactly symmetric about the mean, so the
    # interval of b - a is the mirror image of the interval of a - b, as a verdict and a table both quoting it expect
    z, v = np.concatenate([z, -z]), np.concatenate([np.broadcast_to(v, z.shape), np.broadcast_to(v, z.shape)])
    r = c["mean"] - z * np.sqrt(v)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(r, [alpha, 1 - alpha])
    p = 2 * min(float((r <= 0).mean()), float((r >= 0).mean()))
    return {"mean": c["mean"], "ci_low": float(lo), "ci_high": float(hi), "se": c["se"], "df": c["df"],
            "p_value": min(1.0, p), "S": S, "n": n, "seed_variance_included": S > 1, "components": c}


def problems_only_interval(a: Any, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = BOOT_SEED
                           ) -> tuple[float, float]:
    """The one-stage interval: seeds pooled per problem, then a percentile bootstrap over problems. It ignores the
    seed-to-seed variance (kept to show how much narrower, and how wrong, that is: tests/test_stats.py)."""
    return bootstrap_ci(np.asarray(a, dtype=float).mean(axis=0), n_boot=n_boot, level=level, seed=seed)


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    r"""P(X > Y) over seeds (Agarwal et al. 2021): the share of (seed of X, seed of Y) pairs in which X scores
    higher, ties counting one half, :math:`\frac{1}{|X||Y|}\sum_{i,j} (\mathbb 1[x_i > y_j] + \tfrac12
    \mathbb 1[x_i = y_j])`."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size == 0 or ys.size == 0:
        return float("nan")
    diff = xs[:, None] - ys[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def interquartile_mean(values: Sequence[float]) -> float:
    """The mean of the middle 50% of ``values`` (IQM, Agarwal et al. 2021): robust to one outlying seed; used with
    4 or more seeds (scipy's ``trim_mean(values, 0.25)``)."""
    from scipy import stats

    return float(stats.trim_mean(np.asarray(values, dtype=float), 0.25))


def holm(p_values: Sequence[float]) -> list[float]:
    r"""Holm's step-down adjusted p-values (in the input order): with :math:`p_{(1)} \le \dots \le p_{(m)}`,
    :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1)\, p_{(j)})`. A comparison survives the
    correction at level α when its adjusted p-value is below α; the family-wise error stays below α."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        adjusted[i] = running
    return adjusted.tolist()


def power_analysis(a: Any, *, alpha: float = 0.05, power: float = 0.8, effect: float = 0.02,
                   max_seeds: int = 200) -> dict[str, Any]:
    r"""What a paired comparison can detect, from the variance components of its S × n difference matrix.

    Minimum detectable difference at the current design: :math:`\mathrm{MDE} = (t_{1-\alpha/2,\nu} + t_{power,\nu})
    \cdot SE` (two-sided test at level α, Satterthwaite ν). Seeds needed for ``effect``: the smallest S' with
    :math:`(t_{1-\alpha/2,\nu'} + t_{power,\nu'}) \sqrt{\hat\sigma_u^2/S' + \hat\sigma_v^2/n + \hat\sigma_e^2/(S'n)}
    \le \text{effect}` at the same n problems (ν' from the expected mean squares), or None when even infinitely many
    seeds leave the problem term too large (then more problems are needed). One seed: the seed variance is unknown,
    so no seed count can be given."""
    from scipy import stats

    c = crossed_components(a)
    S, n = c["S"], c["n"]

    def quantiles(df: float) -> float:
        return float(stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df))

    mde = quantiles(c["df"]) * c["se"]
    out: dict[str, Any] = {"S": S, "n": n, "alpha": alpha, "power": power, "effect": effect, "se": c["se"],
                           "df": c["df"], "mde": mde, "seeds_needed": None, "reachable": None}
    if S < 2:
        out["reason"] = "one seed: the seed-to-seed variance is unknown"
        return out
    su, sv, se2 = c["sigma2_seed"], c["sigma2_problem"], c["sigma2_resid"]
    if quantiles(float("inf")) * math.sqrt(sv / n) >= effect:
        out.update(reachable=False, reason=f"the problem term alone (n = {n}) is too large for {effect:g}")
        return out
    for s2 in range(2, max_seeds + 1):
        ms_s, ms_p, ms_e = se2 + n * su, se2 + s2 * sv, se2
        v = max(ms_s + ms_p - ms_e, ms_p) / (s2 * n)
        terms = [(ms_s, s2 - 1), (ms_p, n - 1), (ms_e, (s2 - 1) * (n - 1))]
        denom = sum(ms ** 2 / d for ms, d in terms)
        df = (v * s2 * n) ** 2 / denom if denom > 0 else math.inf  # every score equal: no variance to estimate
        if quantiles(df) * math.sqrt(v) <= effect:
            out.update(seeds_needed=s2, reachable=True)
            return out
    out.update(reachable=False, reason=f"more than {max_seeds} seeds")
    return out
