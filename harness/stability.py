r"""The stability scorecard: what a training curve says about how stable a run was, one number per metric per run,
then a configuration's mean over its seeds with a seed-level interval.

Per run, from its per-step history (x = step index, the last optimizer pass's diagnostics where a metric is per
pass):

=====================  =====================================================================================
metric                 definition
=====================  =====================================================================================
eur_mean               mean over steps of the EUR (arXiv 2602.19345 eq. 12) of the last pass
eur_slope              OLS slope of that EUR against the step, per 100 steps
entropy_change         mean entropy of the last 10% of steps minus that of the first 10%
entropy_slope          OLS slope of the entropy, per 100 steps
reward_volatility      standard deviation of the step-to-step changes of the reward after removing its OLS
                       trend line (the residuals' first differences)
grad_norm_spikes       steps whose gradient norm exceeds the run's median by more than 5 robust SDs
                       (1.4826 · median absolute deviation)
ratio_dev_p95          mean over steps of the 95th percentile of |r − 1| in the last pass
ratio_max              largest ratio r any token had in the last pass, over the run
length_drift           mean response length of the last 10% of steps minus that of the first 10%
collapse_events        times the reward's moving average (window ~ steps/10) falls more than ``drop`` (0.5
                       reward units) below its running best, or the format reward falls below 0.5 after having
                       reached 0.9; each fall counts once until the curve recovers
=====================  =====================================================================================

A configuration's value is the mean over its seeds with a Student-t 95% interval over the seeds (the runs are the
unit: the steps of one run are not independent draws), intersected with the range the metric can take
(:data:`METRIC_RANGE`: a count is never negative), which keeps the interval's coverage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from harness import keys as K
from harness.stats import t_quantile

SCORECARD: tuple[tuple[str, str], ...] = (
    ("eur_mean", "mean EUR"),
    ("eur_slope", "EUR slope / 100 steps"),
    ("entropy_change", "entropy: last − first 10%"),
    ("entropy_slope", "entropy slope / 100 steps"),
    ("reward_volatility", "reward volatility"),
    ("grad_norm_spikes", "grad-norm spikes"),
    ("ratio_dev_p95", "p95 |r − 1|"),
    ("ratio_max", "max r"),
    ("length_drift", "length: last − first 10%"),
    ("collapse_events", "collapse events"),
)
# The values a metric can take: its seed interval is cut to them (others are unbounded).
METRIC_RANGE: dict[str, tuple[float, float]] = {
    "eur_mean": (0.0, 1.0), "reward_volatility": (0.0, math.inf), "grad_norm_spikes": (0.0, math.inf),
    "ratio_dev_p95": (0.0, math.inf), "ratio_max": (0.0, math.inf), "collapse_events": (0.0, math.inf),
}
COLLAPSE_DROP = 0.5  # reward units below the running best of the moving average
FORMAT_FLOOR, FORMAT_REACHED = 0.5, 0.9
SPIKE_Z = 5.0


def _arr(values: Sequence[float] | None) -> np.ndarray:
    a = np.asarray([] if values is None else values, dtype=float)
    return a[np.isfinite(a)]


def slope_per_100(values: Sequence[float] | None) -> float:
    """OLS slope of ``values`` against their index, per 100 steps (NaN with fewer than 3 points)."""
    y = _arr(values)
    if y.size < 3:
        return math.nan
    x = np.arange(y.size, dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 100.0)


def end_minus_start(values: Sequence[float] | None, frac: float = 0.1) -> float:
    """Mean of the last ``frac`` of the values minus the mean of the first ``frac`` (at least one value each)."""
    y = _arr(values)
    if y.size < 2:
        return math.nan
    k = max(1, round(frac * y.size))
    return float(y[-k:].mean() - y[:k].mean())


def detrended_volatility(values: Sequence[float] | None) -> float:
    """Standard deviation (ddof 1) of the first differences of the residuals from the OLS trend line."""
    y = _arr(values)
    if y.size < 4:
        return math.nan
    x = np.arange(y.size, dtype=float)
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    return float(np.diff(resid).std(ddof=1))


def spikes(values: Sequence[float] | None, z: float = SPIKE_Z) -> int:
    """Values more than ``z`` robust SDs (1.4826 · MAD) above the median."""
    y = _arr(values)
    if y.size < 3:
        return 0
    med = float(np.median(y))
    mad = 1.4826 * float(np.median(np.abs(y - med)))
    return int((y > med + z * max(mad, 1e-12)).sum())


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    y = np.asarray(values, dtype=float)
    if y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def collapse_events(reward: Sequence[float] | None, reward_format: Sequence[float] | None = None, *,
                    drop: float = COLLAPSE_DROP, window: int | None = None) -> list[int]:
    """Steps (0-based) where a collapse starts (module docstring): the reward's moving average falls ``drop``
    below its running best, or the format reward falls below 0.5 after having reached 0.9. An event ends when the
    curve is back above the threshold; a new fall after that counts again."""
    events: list[int] = []
    r = _arr(reward)
    if r.size:
        w = window or max(1, round(r.size / 10))
        ma = moving_average(r, w)
        best, down = -math.inf, False
        for i, v in enumerate(ma):
            best = max(best, v)
            low = v < best - drop
            if low and not down:
                events.append(i)
            down = low
    f = _arr(reward_format)
    if f.size:
        reached, down = False, False
        for i, v in enumerate(f):
            reached = reached or v >= FORMAT_REACHED
            low = reached and v < FORMAT_FLOOR
            if low and not down and i not in events:
                events.append(i)
            down = low
    return sorted(events)


def run_scorecard(history: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """One run's scorecard from its per-step series: ``reward``, ``reward_format``, ``entropy``, ``grad_norm``,
    ``response_length``, and the last pass's ``eur``, ``abs_ratio_dev_p95`` and ``ratio_max`` (missing series
    give NaN)."""
    get = history.get
    ratio_max = _arr(get("ratio_max"))
    return {
        "eur_mean": float(_arr(get("eur")).mean()) if _arr(get("eur")).size else math.nan,
        "eur_slope": slope_per_100(get("eur")),
        "entropy_change": end_minus_start(get("entropy")),
        "entropy_slope": slope_per_100(get("entropy")),
        "reward_volatility": detrended_volatility(get("reward")),
        "grad_norm_spikes": float(spikes(get("grad_norm"))),
        "ratio_dev_p95": float(_arr(get("abs_ratio_dev_p95")).mean()) if _arr(get("abs_ratio_dev_p95")).size
        else math.nan,
        "ratio_max": float(ratio_max.max()) if ratio_max.size else math.nan,
        "length_drift": end_minus_start(get("response_length")),
        "collapse_events": float(len(collapse_events(get("reward"), get("reward_format")))),
    }


def over_seeds(values: Sequence[float], level: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, Any]:
    r"""Mean over seeds with a Student-t interval over the seeds, :math:`\bar v \pm t_{S-1}\,s/\sqrt S`, cut to
    ``bounds`` (the values the quantity can take); a single seed: no interval."""
    v = _arr(values)
    if v.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 0}
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 1}
    hw = t_quantile(level, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": mean, "ci_low": max(mean - hw, bounds[0]), "ci_high": min(mean + hw, bounds[1]),
            "n_seeds": int(v.size)}


# ------------------------------------------------------------------------------------------------ learning signal

NO_SIGNAL_WARN_FRAC = 0.5  # warn when more than this share of a run's steps had nothing to learn from


def learning_signal(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """How much of a run could learn, from its per-step history: ``steps``; ``no_signal_steps``, the steps where
    every group's rewards were equal, so every advantage (hence every gradient of the policy loss) was 0
    (``no_signal`` where the backend logs it, else ``zero_var_frac == 1``); the mean share of rollouts with reward 0
    (``reward_zero_frac``) and the mean format and accuracy rewards."""
    def mean(key: str) -> float:
        values = [float(h[key]) for h in history if key in h]
        return float(np.mean(values)) if values else math.nan

    no_signal = [float(h[K.NO_SIGNAL]) if K.NO_SIGNAL in h else float(h.get(K.ZERO_VAR_FRAC, 0.0) >= 1.0)
                 for h in history]
    return {"steps": float(len(history)), "no_signal_steps": float(sum(no_signal)),
            "reward_zero_frac": mean(K.REWARD_ZERO_FRAC), "reward_format": mean(K.REWARD_FORMAT),
            "reward_accuracy": mean(K.REWARD_ACCURACY)}


def no_signal_warning(signal: Mapping[str, float]) -> str | None:
    """A one-line warning when most steps of a run had no learning signal (a flat line that is not stability),
    with the likely reason and the fix; None otherwise."""
    steps, none = int(signal.get("steps", 0)), int(signal.get("no_signal_steps", 0))
    if steps == 0 or none <= NO_SIGNAL_WARN_FRAC * steps:
        return None
    text = (f"no learning signal in {none} of {steps} steps (every group's rewards were equal, so every advantage "
            "and every gradient was 0)")
    zero, fmt, acc = (signal.get(k, math.nan) for k in ("reward_zero_frac", "reward_format", "reward_accuracy"))
    if zero == zero and zero >= 0.99:
        text += f"; reward 0 in {zero:.0%} of rollouts"
        if fmt == 0 and acc == 0:
            text += (": the model never produced the required <answer> format. Give it a prompt it can follow "
                     "(model.prompt.template), more tokens (train.max_new_tokens) or "
                     "train.rewards.accuracy_fallbacks=[last_number]")
    elif zero == zero:
        text += "; the rollouts of each prompt all scored alike: the task is too easy or too hard for the model"
    return text
