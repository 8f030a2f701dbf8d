"""harness.stability: the scorecard metrics on synthetic histories, each against a hand computation, and collapse
detection (a collapsing run is flagged, a stable one is not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import stability as S


def _stable(n: int = 60, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return {"reward": list(1.2 + 0.004 * steps + 0.03 * rng.standard_normal(n)),
            "reward_format": [0.98] * n,
            "entropy": list(1.0 - 0.002 * steps),
            "grad_norm": list(0.5 + 0.01 * rng.standard_normal(n)),
            "response_length": list(12.0 + 0.02 * steps),
            "eur": list(0.9 - 0.001 * steps),
            "abs_ratio_dev_p95": [0.05] * n,
            "ratio_max": list(1.2 + 0.001 * steps)}


def test_a_stable_run_is_not_flagged_and_a_collapsing_one_is():
    stable = _stable()
    assert S.collapse_events(stable["reward"], stable["reward_format"]) == []
    collapsing = _stable()
    collapsing["reward"] = [1.4] * 30 + [0.3] * 30  # the reward falls far below its running best
    events = S.collapse_events(collapsing["reward"])
    assert len(events) == 1 and 30 <= events[0] < 40
    assert S.run_scorecard(collapsing)["collapse_events"] == 1.0
    fmt = _stable()
    fmt["reward_format"] = [0.95] * 40 + [0.2] * 20  # the format rate collapses after it was learned
    assert S.collapse_events(fmt["reward"], fmt["reward_format"]) == [40]
    # a fall, a recovery and a second fall are two events
    twice = [1.5] * 20 + [0.4] * 10 + [1.6] * 20 + [0.5] * 10
    assert len(S.collapse_events(twice, window=1)) == 2


def test_each_scorecard_metric_by_hand():
    h = _stable()
    card = S.run_scorecard(h)
    x = np.arange(60.0)
    assert card["eur_mean"] == pytest.approx(np.mean(h["eur"]))
    assert card["eur_slope"] == pytest.approx(-0.1)  # -0.001 per step = -0.1 per 100 steps
    assert card["entropy_slope"] == pytest.approx(-0.2)
    assert card["entropy_change"] == pytest.approx(np.mean(h["entropy"][-6:]) - np.mean(h["entropy"][:6]))
    resid = np.array(h["reward"]) - np.polyval(np.polyfit(x, h["reward"], 1), x)
    assert card["reward_volatility"] == pytest.approx(np.diff(resid).std(ddof=1))
    assert card["length_drift"] == pytest.approx(np.mean(h["response_length"][-6:]) - np.mean(h["response_length"][:6]))
    assert card["ratio_dev_p95"] == pytest.approx(0.05)
    assert card["ratio_max"] == pytest.approx(1.2 + 0.059)
    assert card["grad_norm_spikes"] == 0.0 and card["collapse_events"] == 0.0


def test_grad_norm_spikes_use_a_robust_scale():
    g = [1.0, 1.1, 0.9, 1.05, 0.95] * 10
    assert S.spikes(g) == 0
    assert S.spikes([*g, 9.0, 12.0]) == 2  # far above median + 5 robust SDs
    assert S.spikes([*g, 1.3]) == 0  # a mild bump is not a spike


def test_missing_series_give_nan_not_errors():
    card = S.run_scorecard({"reward": [1.0, 1.1, 1.2, 1.3]})
    assert math.isnan(card["eur_mean"]) and math.isnan(card["entropy_slope"]) and math.isnan(card["ratio_max"])
    assert card["collapse_events"] == 0.0


def test_over_seeds_is_a_t_interval():
    v = [0.9, 0.92, 0.95]
    out = S.over_seeds(v)
    hw = scipy_stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert out["mean"] == pytest.approx(np.mean(v))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((np.mean(v) - hw, np.mean(v) + hw))
    one = S.over_seeds([0.5])
    assert one["n_seeds"] == 1 and math.isnan(one["ci_low"])
