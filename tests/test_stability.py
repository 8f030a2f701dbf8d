"""harness.stability: the scorecard metrics on synthetic histories: each against a hand computation; on stationary
series of 200, 1,000 and 5,000 steps each metric's expected value is the same (Monte-Carlo averages); pure binomial
noise scores the same volatility at any reward level; an injected collapse is detected at every run length and a
stationary run (even one with a lucky first batch) has none."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import stability as S

LENGTHS = (200, 1_000, 5_000)
STEPS_PER_LENGTH = 80_000  # simulated steps at each length (400 runs of 200 steps ... 16 of 5,000): equal MC error
ROLLOUTS = 64


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


def _stationary(n: int, rng: np.random.Generator, *, instability: float = 0.03) -> dict[str, list[float]]:
    """A run with nothing going on but noise: the reward a binomial batch mean (ROLLOUTS rollouts) around a success
    rate that itself wobbles by ``instability``; lognormal gradient norms with a 10x spike on 2% of the steps;
    per-step ratio maxima 1 + lognormal."""
    p = np.clip(0.6 + instability * rng.standard_normal(n), 0.0, 1.0)
    reward = rng.binomial(ROLLOUTS, p) / ROLLOUTS
    grad = np.exp(0.3 * rng.standard_normal(n)) * np.where(rng.random(n) < 0.02, 10.0, 1.0)
    return {"step": list(np.arange(1.0, n + 1)), "reward": list(reward),
            "reward_std": list(np.sqrt(reward * (1 - reward))),
            "reward_format": list(np.clip(0.95 + 0.02 * rng.standard_normal(n), 0.0, 1.0)),
            "entropy": list(1.0 + 0.05 * rng.standard_normal(n)), "grad_norm": list(grad),
            "response_length": list(20.0 + 2.0 * rng.standard_normal(n)),
            "eur": list(0.9 + 0.02 * rng.standard_normal(n)),
            "abs_ratio_dev_p95": list(0.05 + 0.01 * rng.standard_normal(n)),
            "ratio_max": list(1.0 + np.exp(-1.0 + 0.5 * rng.standard_normal(n)))}


def _rollout_rewards(rng: np.random.Generator, format_p: np.ndarray, accuracy_p: np.ndarray,
                     rollouts: int = 32) -> np.ndarray:
    """Per-step mean of format + accuracy rewards (each 0/1) over ``rollouts`` rollouts: a reward in [0, 2]."""
    return (rng.binomial(rollouts, format_p) + rng.binomial(rollouts, accuracy_p)) / rollouts


def test_every_metric_has_the_same_expected_value_at_200_1000_and_5000_steps():
    means, ses = {}, {}
    for n in LENGTHS:
        rng = np.random.default_rng(n)
        cards = [S.run_scorecard(_stationary(n, rng), rollouts=ROLLOUTS) for _ in range(STEPS_PER_LENGTH // n)]
        for metric, _ in S.SCORECARD:
            v = np.array([c[metric] for c in cards])
            means[metric, n], ses[metric, n] = v.mean(), v.std(ddof=1) / math.sqrt(v.size)
    zero_expected = ("eur_slope", "entropy_slope", "entropy_change", "length_drift")
    for metric, _ in S.SCORECARD:
        at = [means[metric, n] for n in LENGTHS]
        if metric in zero_expected:  # a stationary series has no trend: 0 at every length, within MC error
            assert all(abs(means[metric, n]) < 4 * ses[metric, n] + 1e-12 for n in LENGTHS), (metric, at)
        elif metric == "collapse_events":
            assert at == [0.0, 0.0, 0.0]
        else:
            assert all(ses[metric, n] < 0.03 * means[metric, n] for n in LENGTHS), metric  # MC error << 10%
            assert max(at) / min(at) - 1 <= 0.10, (metric, at)
    # the values the series were built with
    assert means["eur_mean", 1_000] == pytest.approx(0.9, abs=1e-3)
    assert means["grad_norm_spike_rate", 1_000] == pytest.approx(2.0, rel=0.15)  # 2 spikes per 100 steps injected
    assert means["reward_volatility", 1_000] == pytest.approx(math.sqrt(1 + 0.03**2 / (0.24 / ROLLOUTS)), rel=0.05)


def test_pure_binomial_noise_scores_one_at_any_reward_level():
    rng = np.random.default_rng(1)
    scores = {}
    for p in (0.5, 0.97):
        rewards = [rng.binomial(128, p, 1_000) / 128 for _ in range(40)]
        scores[p] = np.mean([S.reward_volatility(r, rollouts=128) for r in rewards])
        with_std = np.mean([S.reward_volatility(r, rollouts=128, reward_std=np.sqrt(r * (1 - r))) for r in rewards])
        assert with_std == pytest.approx(scores[p])  # 0/1 rewards: the logged SD is the level's p(1 - p)
    assert scores[0.5] == pytest.approx(scores[0.97], rel=0.10)
    assert scores[0.5] == pytest.approx(1.0, abs=0.05) and scores[0.97] == pytest.approx(1.0, abs=0.05)
    # a success rate that moves from step to step on top of the sampling noise scores above 1
    moving = [rng.binomial(128, np.clip(0.5 + 0.1 * rng.standard_normal(1_000), 0, 1)) / 128 for _ in range(10)]
    assert np.mean([S.reward_volatility(r, rollouts=128) for r in moving]) > 2.0
    assert math.isnan(S.reward_volatility(rewards[0], rollouts=None))  # no batch size: nothing to compare to


def test_an_injected_collapse_of_5_percent_of_the_run_is_detected_at_every_length():
    for n in LENGTHS:
        rng = np.random.default_rng(n)
        length = n // 20
        for _ in range(50):
            start = int(rng.integers(n // 5, n - length - n // 10))
            format_p, accuracy_p = np.full(n, 0.95), np.full(n, 0.65)  # reward 1.6 ...
            format_p[start:start + length], accuracy_p[start:start + length] = 0.6, 0.2  # ... falls to 0.8
            reward = _rollout_rewards(rng, format_p, accuracy_p)
            events = S.collapse_events(reward, steps=np.arange(1, n + 1))
            assert len(events) == 1 and start + 1 <= events[0] <= start + length, (n, start, events)
    # the audit's case: 100 steps from 1.6 to 0.8 in a 2,000-step run (a moving average of 200 steps missed it)
    reward = np.r_[np.full(1_000, 1.6), np.full(100, 0.8), np.full(900, 1.6)]
    assert S.collapse_events(reward) == [1_006.0]
    # a history logged every 5 steps: windows are in training steps, events at the real step numbers
    steps = np.arange(5, 1_001, 5)
    logged = np.r_[np.full(120, 1.6), np.full(10, 0.8), np.full(70, 1.6)]
    assert S.collapse_events(logged, steps=steps) == [610.0]  # 605 and 610 at 0.8: the 10-step mean is 0.8


def test_a_stationary_run_has_no_collapse_event_even_after_a_lucky_first_batch():
    for n in LENGTHS:
        rng = np.random.default_rng(n + 1)
        for _ in range(20):
            reward = _rollout_rewards(rng, np.full(n, 0.45), np.full(n, 0.05))  # reward 0.5 ...
            reward[0] = 1.9  # ... after a first batch at 1.9: one batch never sets the running best
            assert S.collapse_events(reward, steps=np.arange(1, n + 1)) == []
            fmt = np.clip(0.93 + 0.05 * rng.standard_normal(n), 0, 1)
            fmt[0] = 1.0
            assert S.collapse_events(None, fmt) == []


def test_collapse_events_by_hand():
    stable = _stable()
    assert S.collapse_events(stable["reward"], stable["reward_format"]) == []
    collapsing = _stable()
    collapsing["reward"] = [1.4] * 30 + [0.3] * 30  # the reward falls far below its running best
    events = S.collapse_events(collapsing["reward"])
    assert len(events) == 1 and 30 <= events[0] < 36  # within the 6-step window of a 60-step run
    assert S.run_scorecard(collapsing)["collapse_events"] == 1.0
    fmt = _stable()
    fmt["reward_format"] = [0.95] * 40 + [0.2] * 20  # the format rate collapses after it was learned
    assert S.collapse_events(fmt["reward"], fmt["reward_format"]) == [43.0]  # the 6-step mean is below 0.5 at 43
    # a fall, a recovery and a second fall are two events; a reward and a format collapse at once are one
    twice = [1.5] * 20 + [0.4] * 10 + [1.6] * 20 + [0.5] * 10
    assert S.collapse_events(twice, window=1) == [20.0, 50.0]
    assert S.collapse_events(twice, [0.95] * 20 + [0.2] * 10 + [0.95] * 30, window=1) == [20.0, 50.0]


def test_each_scorecard_metric_by_hand():
    h = _stable()
    card = S.run_scorecard(h, rollouts=16, reward_range=(0.0, 2.0))
    assert card["eur_mean"] == pytest.approx(np.mean(h["eur"]))
    assert card["eur_slope"] == pytest.approx(-0.001)  # per training step
    assert card["entropy_slope"] == pytest.approx(-0.002)
    assert card["entropy_change"] == pytest.approx(np.mean(h["entropy"][-6:]) - np.mean(h["entropy"][:6]))
    r = np.array(h["reward"])
    var = r * (2.0 - r) * 16 / 15  # the largest variance a reward in [0, 2] has at mean r, unbiased
    noise = np.sqrt(np.mean(var[1:] + var[:-1]) / 16)
    assert card["reward_volatility"] == pytest.approx(np.diff(r).std(ddof=1) / noise)
    assert card["length_drift"] == pytest.approx(np.mean(h["response_length"][-6:]) - np.mean(h["response_length"][:6]))
    assert card["ratio_dev_p95"] == pytest.approx(0.05)
    assert card["ratio_max_p95"] == pytest.approx(np.percentile(h["ratio_max"], 95))
    assert card["grad_norm_spike_rate"] == 0.0 and card["collapse_events"] == 0.0


def test_slopes_are_per_training_step_when_the_history_is_logged_every_k_steps():
    steps = np.arange(10, 1_001, 10)
    entropy = 1.0 - 0.0005 * steps
    assert S.slope_per_step(entropy, steps) == pytest.approx(-0.0005)
    card = S.run_scorecard({"step": list(steps), "entropy": list(entropy), "eur": list(0.9 + 0.0001 * steps)})
    assert card["entropy_slope"] == pytest.approx(-0.0005) and card["eur_slope"] == pytest.approx(0.0001)
    assert S.slope_per_step(entropy) == pytest.approx(-0.005)  # without step numbers: per logged point
    with pytest.raises(ValueError, match="step numbers"):
        S.run_scorecard({"step": [1.0, 2.0], "entropy": [1.0, 0.9, 0.8]})


def test_grad_norm_spikes_are_a_rate_against_a_robust_local_baseline():
    g = [1.0, 1.1, 0.9, 1.05, 0.95] * 10
    assert S.grad_norm_spikes(g).sum() == 0
    assert S.grad_norm_spikes([*g, 9.0, 12.0]).sum() == 2  # far above the local median + 5 robust SDs
    assert S.spike_rate([*g, 9.0, 12.0]) == pytest.approx(100 * 2 / 52)
    assert S.grad_norm_spikes([*g, 1.3]).sum() == 0  # a mild bump is not a spike
    assert S.grad_norm_spikes([1.0] * 40 + [1.5]).sum() == 0  # nor a 1.5x step of a flat norm (under 2x)
    rng = np.random.default_rng(3)
    # ordinary right skew: lognormal noise, even wide, and a norm that decays 10x over the run
    assert S.spike_rate(np.exp(rng.standard_normal(20_000))) < 0.05
    decaying = np.exp(np.linspace(0, -math.log(10), 5_000) + 0.3 * rng.standard_normal(5_000))
    assert S.spike_rate(decaying) < 0.05
    # 1% of steps 20x: found near the end of a trend as well as at its start
    spiky = decaying * np.where(rng.random(5_000) < 0.01, 20.0, 1.0)
    assert S.spike_rate(spiky) == pytest.approx(1.0, abs=0.3)


def test_missing_series_give_nan_not_errors():
    card = S.run_scorecard({"reward": [1.0, 1.1, 1.2, 1.3]})
    assert math.isnan(card["eur_mean"]) and math.isnan(card["entropy_slope"]) and math.isnan(card["ratio_max_p95"])
    assert math.isnan(card["reward_volatility"]) and math.isnan(card["grad_norm_spike_rate"])
    assert card["collapse_events"] == 0.0
    assert set(card) == {m for m, _ in S.SCORECARD}


def test_over_seeds_is_a_t_interval():
    v = [0.9, 0.92, 0.95]
    out = S.over_seeds(v)
    hw = scipy_stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert out["mean"] == pytest.approx(np.mean(v))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((np.mean(v) - hw, np.mean(v) + hw))
    one = S.over_seeds([0.5])
    assert one["n_seeds"] == 1 and math.isnan(one["ci_low"])
