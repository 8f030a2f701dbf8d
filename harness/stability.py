r"""The stability scorecard: what a training curve says about how stable a run was, one number per metric per run,
then a configuration's mean over its seeds with a seed-level interval.

Per run, from its per-step history. Steps are the history's ``step`` numbers (a history logged every k steps keeps
its real step numbers; without them the entries count as consecutive steps); per-pass metrics are the last
optimizer pass's. Every metric's expected value on a stationary run is the same at any run length (slopes and
drifts: 0), so runs of different lengths compare.

=====================  ========================  ================================================================
metric                 unit                      definition
=====================  ========================  ================================================================
eur_mean               EUR (0–1)                 mean over steps of the EUR (arXiv 2602.19345 eq. 12) of the last
                                                 pass
eur_slope              EUR per training step     OLS slope of that EUR against the step number
entropy_change         nats                      mean entropy of the last 10% of the logged steps minus that of
                                                 the first 10%
entropy_slope          nats per training step    OLS slope of the entropy against the step number
reward_volatility      × sampling noise          SD of the step-to-step changes of the reward divided by the SD
                                                 that sampling the batch alone gives them:
                                                 :math:`\sqrt{\overline{v_t + v_{t-1}}/N}` (mean over the run), v_t the
                                                 variance of one rollout's reward at step t (the logged
                                                 ``reward_std``², else the bound (m − lo)(hi − m) at the step's
                                                 mean reward m, p(1 − p) for 0/1 rewards), times N/(N − 1), N the
                                                 rollouts per step. Pure sampling noise scores ~1 at any reward
                                                 level; above 1 is instability. The rollouts count as independent
                                                 draws: when prompts differ in difficulty, the G rollouts of one
                                                 prompt are not, and pure sampling noise scores between 1 and √G.
                                                 Differencing already removes a linear trend (no detrending)
grad_norm_spike_rate   spikes per 100 steps      share of the logged steps whose gradient norm is a spike, × 100:
                                                 its log is more than 5 robust SDs (1.4826 · MAD) above the
                                                 median log gradient norm of the surrounding 51 logged steps, and
                                                 the norm is at least twice that median (lognormal noise does not
                                                 trip it)
ratio_dev_p95          |r − 1|                   mean over steps of the 95th percentile of |r − 1| in the last pass
ratio_max_p95          r                         95th percentile over steps of the largest ratio r any token had
                                                 in the step's last pass (a quantile, not the run's maximum, which
                                                 grows with the number of steps)
length_drift           tokens                    mean response length of the last 10% of the logged steps minus
                                                 that of the first 10%
collapse_events        events per run            times the reward's moving average over a window of 10 training
                                                 steps (run span / 10 for runs under 100 steps) falls more than
                                                 ``drop`` (0.5 reward units) below its running best, or the
                                                 format reward's moving average falls below 0.5 after having
                                                 reached 0.9. The running best starts with the first full window
                                                 (one lucky batch cannot set it); an event lasts until the curve is
                                                 back halfway (within drop/2 of the best; format ≥ 0.7), and a
                                                 reward and a format collapse that overlap are one event
=====================  ========================  ================================================================

A configuration's value is the mean over its seeds with a Student-t 95% interval over the seeds (the runs are the
unit: the steps of one run are not independent draws), intersected with the range the metric can take
(:data:`METRIC_RANGE`: a count is never negative), which keeps the interval's coverage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from harness import keys as K
from harness.stats import t_quantile

SCORECARD: tuple[tuple[str, str], ...] = (
    ("eur_mean", "mean EUR"),
    ("eur_slope", "EUR slope / step"),
    ("entropy_change", "entropy: last − first 10%"),
    ("entropy_slope", "entropy slope / step"),
    ("reward_volatility", "reward volatility (× sampling noise)"),
    ("grad_norm_spike_rate", "grad-norm spikes / 100 steps"),
    ("ratio_dev_p95", "p95 |r − 1|"),
    ("ratio_max_p95", "p95 over steps of max r"),
    ("length_drift", "length: last − first 10%"),
    ("collapse_events", "collapse events"),
)
# The values a metric can take: its seed interval is cut to them (others are unbounded).
METRIC_RANGE: dict[str, tuple[float, float]] = {
    "eur_mean": (0.0, 1.0), "reward_volatility": (0.0, math.inf), "grad_norm_spike_rate": (0.0, 100.0),
    "ratio_dev_p95": (0.0, math.inf), "ratio_max_p95": (0.0, math.inf), "collapse_events": (0.0, math.inf),
}
COLLAPSE_DROP = 0.5  # reward units below the running best of the moving average
COLLAPSE_WINDOW = 10  # training steps of the moving average: a collapse of 10 steps reaches its full depth in it
FORMAT_FLOOR, FORMAT_REACHED = 0.5, 0.9
SPIKE_Z = 5.0  # robust SDs of the log gradient norm
SPIKE_MIN_FACTOR = 2.0  # a spike is also at least this multiple of the local median (a flat norm's wobble is not)
SPIKE_WINDOW = 51  # logged steps of the local median / MAD (about 25 on either side)
END_FRAC = 0.1  # the share of logged steps at each end of an end-minus-start drift


def _arr(values: Sequence[float] | None) -> np.ndarray:
    a = np.asarray([] if values is None else values, dtype=float)
    return a[np.isfinite(a)]


def _steps(steps: Sequence[float] | None, n: int) -> np.ndarray:
    """The step numbers of ``n`` history entries: ``steps`` when given (same length), else 0 .. n − 1."""
    if steps is None:
        return np.arange(n, dtype=float)
    x = np.asarray(steps, dtype=float)
    if x.size != n:
        raise ValueError(f"{x.size} step numbers for a series of {n} entries: every history series needs one step each")
    return x


def _xy(values: Sequence[float] | None, steps: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(step numbers, values) of the finite entries of a series, in step order (empty for a missing series)."""
    if values is None:
        return np.zeros(0), np.zeros(0)
    y = np.asarray(values, dtype=float)
    x = _steps(steps, y.size)
    keep = np.isfinite(y) & np.isfinite(x)
    order = np.argsort(x[keep], kind="stable")
    return x[keep][order], y[keep][order]


def slope_per_step(values: Sequence[float] | None, steps: Sequence[float] | None = None) -> float:
    """OLS slope of ``values`` against their training step numbers (consecutive steps when None), per step (NaN with
    fewer than 3 points)."""
    x, y = _xy(values, steps)
    if y.size < 3 or np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def end_minus_start(values: Sequence[float] | None, frac: float = END_FRAC) -> float:
    """Mean of the last ``frac`` of the values minus the mean of the first ``frac`` (at least one value each)."""
    y = _arr(values)
    if y.size < 2:
        return math.nan
    k = max(1, round(frac * y.size))
    return float(y[-k:].mean() - y[:k].mean())


def reward_volatility(reward: Sequence[float] | None, *, rollouts: int | None,
                      reward_std: Sequence[float] | None = None, steps: Sequence[float] | None = None,
                      reward_range: tuple[float, float] = (0.0, 1.0)) -> float:
    r"""SD (ddof 1) of the step-to-step changes of the mean reward over the SD that sampling ``rollouts``
    independent rollouts per step alone gives them, :math:`\sqrt{\overline{(v_t + v_{t-1})}/N}` (module docstring).
    ``v_t`` is ``reward_std[t]²`` where finite, else the largest variance a reward in ``reward_range`` can have at
    the step's mean m, (m − lo)(hi − m); both are population variances, so they are scaled by N/(N − 1). NaN
    without ``rollouts`` (≥ 2), with fewer than 3 steps, or when no step had any spread (nothing to compare to)."""
    if reward is None:
        return math.nan
    y = np.asarray(reward, dtype=float)
    x = _steps(steps, y.size)
    sd = np.full(y.size, np.nan) if reward_std is None else np.asarray(reward_std, dtype=float)
    if sd.size != y.size:
        raise ValueError(f"{sd.size} reward_std values for {y.size} rewards")
    keep = np.isfinite(y) & np.isfinite(x)
    order = np.argsort(x[keep], kind="stable")
    y, sd = y[keep][order], sd[keep][order]
    if rollouts is None or rollouts < 2 or y.size < 3:
        return math.nan
    lo, hi = reward_range
    m = np.clip(y, lo, hi)
    var = np.where(np.isfinite(sd), sd**2, (m - lo) * (hi - m)) * rollouts / (rollouts - 1)
    noise = float(np.mean(var[1:] + var[:-1])) / rollouts
    if noise <= 0:
        return math.nan
    return float(np.diff(y).std(ddof=1) / math.sqrt(noise))


def grad_norm_spikes(values: Sequence[float] | None, *, z: float = SPIKE_Z, window: int = SPIKE_WINDOW,
                     min_factor: float = SPIKE_MIN_FACTOR) -> np.ndarray:
    """Which of the positive finite values (in order) are spikes: log value above the median log of the ``window``
    values around it (a full window, shifted inward at the ends) by more than ``z`` robust SDs (1.4826 · MAD) and
    by at least log ``min_factor``."""
    g = _arr(values)
    lg = np.log(g[g > 0])
    n = lg.size
    if n < 3:
        return np.zeros(n, dtype=bool)
    w = min(window, n)
    view = np.lib.stride_tricks.sliding_window_view(lg, w)
    med = np.median(view, axis=1)
    mad = np.median(np.abs(view - med[:, None]), axis=1)
    at = np.clip(np.arange(n) - w // 2, 0, n - w)  # the window each value is judged against
    return lg > med[at] + np.maximum(z * 1.4826 * mad[at], math.log(min_factor))


def spike_rate(values: Sequence[float] | None, *, z: float = SPIKE_Z, window: int = SPIKE_WINDOW,
               min_factor: float = SPIKE_MIN_FACTOR) -> float:
    """Spikes (:func:`grad_norm_spikes`) per 100 steps: their share of the logged steps × 100 (NaN under 3)."""
    mask = grad_norm_spikes(values, z=z, window=window, min_factor=min_factor)
    return 100.0 * float(mask.mean()) if mask.size >= 3 else math.nan


def upper_quantile(values: Sequence[float] | None, q: float = 95.0) -> float:
    """The ``q``-th percentile of the finite values (linear interpolation; NaN when there are none)."""
    y = _arr(values)
    return float(np.percentile(y, q)) if y.size else math.nan


def collapse_window(span: float) -> int:
    """Moving-average window in training steps for a run spanning ``span`` steps: :data:`COLLAPSE_WINDOW`, or a
    tenth of a shorter run (at least 1)."""
    return int(min(COLLAPSE_WINDOW, max(1, span // 10)))


def moving_average(values: Sequence[float], window: int, steps: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Trailing mean of the values logged in the last ``window`` training steps, (s − window, s] (``steps``
    ascending; consecutive when None), and whether that window lies wholly inside the run (s − window + 1 ≥ the
    first step: a full window)."""
    y = np.asarray(values, dtype=float)
    x = _steps(steps, y.size)
    if y.size == 0:
        return y, np.zeros(0, dtype=bool)
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.searchsorted(x, x - window, side="right")
    return (c[idx] - c[lo]) / (idx - lo), x - window + 1 >= x[0]


def _collapse_spans(ma: np.ndarray, full: np.ndarray, x: np.ndarray, *, floor: Callable[[float], float],
                    back: Callable[[float], float], arm_at: float = -math.inf) -> list[tuple[float, float]]:
    """(start step, recovery step or inf) of each stretch where the moving average ``ma`` is below ``floor(best)``,
    best its running maximum over full windows; counting starts once it reached ``arm_at``, a stretch ends when it
    is back at ``back(best)``."""
    spans: list[tuple[float, float]] = []
    best, armed, start = -math.inf, False, None
    for v, ok, s in zip(ma, full, x, strict=True):
        if not ok:
            continue  # warm-up: the window reaches back before the run started
        best = max(best, v)
        armed = armed or v >= arm_at
        if start is None and armed and v < floor(best):
            start = s
        elif start is not None and v >= back(best):
            spans.append((start, s))
            start = None
    if start is not None:
        spans.append((start, math.inf))
    return spans


def collapse_events(reward: Sequence[float] | None, reward_format: Sequence[float] | None = None, *,
                    steps: Sequence[float] | None = None, drop: float = COLLAPSE_DROP,
                    window: int | None = None) -> list[float]:
    """Training steps where a collapse starts (module docstring): the reward's moving average over ``window``
    steps (default :func:`collapse_window`) falls ``drop`` below its running best, or the format reward's falls
    below 0.5 after having reached 0.9. An event lasts until the curve is back halfway; a new fall after that
    counts again; a reward and a format collapse that overlap in time are one event."""
    def smoothed(values: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y = _xy(values, steps)
        ma, full = moving_average(y, window or collapse_window(x[-1] - x[0] + 1 if x.size else 0), x)
        return ma, full, x

    spans = _collapse_spans(*smoothed(reward), floor=lambda best: best - drop, back=lambda best: best - drop / 2)
    spans += _collapse_spans(*smoothed(reward_format), floor=lambda best: FORMAT_FLOOR,
                             back=lambda best: (FORMAT_FLOOR + FORMAT_REACHED) / 2, arm_at=FORMAT_REACHED)
    events: list[float] = []
    end = -math.inf
    for start, stop in sorted(spans):
        if start > end:  # does not overlap the event before it
            events.append(float(start))
        end = max(end, stop)
    return events


def run_scorecard(history: Mapping[str, Sequence[float]], *, rollouts: int | None = None,
                  reward_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """One run's scorecard from its per-step series, one entry per logged step each: ``step`` (the training step
    numbers; consecutive when missing), ``reward``, ``reward_std``, ``reward_format``, ``entropy``, ``grad_norm``,
    ``response_length``, and the last pass's ``eur``, ``abs_ratio_dev_p95`` and ``ratio_max`` (missing series give
    NaN). ``rollouts``: rollouts per step (the batch size N of the reward's mean; without it the reward volatility
    is NaN); ``reward_range``: the values one rollout's reward can take, for the variance bound of steps without a
    ``reward_std``."""
    get = history.get
    steps = get(K.STEP)
    return {
        "eur_mean": float(_arr(get(K.EUR)).mean()) if _arr(get(K.EUR)).size else math.nan,
        "eur_slope": slope_per_step(get(K.EUR), steps),
        "entropy_change": end_minus_start(get(K.ENTROPY)),
        "entropy_slope": slope_per_step(get(K.ENTROPY), steps),
        "reward_volatility": reward_volatility(get(K.REWARD), rollouts=rollouts, reward_std=get(K.REWARD_STD),
                                               steps=steps, reward_range=reward_range),
        "grad_norm_spike_rate": spike_rate(get(K.GRAD_NORM)),
        "ratio_dev_p95": float(_arr(get(K.ABS_RATIO_DEV_P95)).mean()) if _arr(get(K.ABS_RATIO_DEV_P95)).size
        else math.nan,
        "ratio_max_p95": upper_quantile(get(K.RATIO_MAX)),
        "length_drift": end_minus_start(get(K.RESPONSE_LENGTH)),
        "collapse_events": float(len(collapse_events(get(K.REWARD), get(K.REWARD_FORMAT), steps=steps))),
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
