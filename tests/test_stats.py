"""harness.stats: every statistic the harness reports, against independent computations."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import stats


def _pass_at_k_bruteforce(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 8), (6, 0, 3)])
def test_pass_at_k_matches_subset_enumeration(n, c, k):
    assert stats.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_bruteforce(n, c, k))


def test_pass_at_k_edge_cases():
    assert stats.pass_at_k(16, 5, 1) == pytest.approx(5 / 16)  # pass@1 is the mean accuracy
    assert stats.pass_at_k(16, 12, 8) == 1.0  # fewer than k wrong samples: every subset has a correct one
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 1, 5)


def test_bootstrap_ci_seeded_and_brackets_mean():
    values = [0, 1, 1, 0, 1, 0.5, 0.25, 1, 0, 0]
    lo, hi = stats.bootstrap_ci(values, n_boot=2000, seed=3)
    assert (lo, hi) == stats.bootstrap_ci(values, n_boot=2000, seed=3)
    assert lo < sum(values) / len(values) < hi
    assert stats.bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    assert all(math.isnan(x) for x in stats.bootstrap_ci([]))


def test_paired_bootstrap_by_hand():
    a = {"p1": 1.0, "p2": 0.5, "p3": 0.0, "p4": 1.0, "only_a": 1.0}
    b = {"p1": 0.5, "p2": 0.5, "p3": 0.5, "p4": 0.0, "only_b": 0.0}
    out = stats.paired_bootstrap(a, b, n_boot=500, seed=3)
    d = np.array([0.5, 0.0, -0.5, 1.0])  # p1..p4, sorted by id
    assert out["n"] == 4 and out["only_a"] == 1 and out["only_b"] == 1
    assert out["diff"] == pytest.approx(0.25)
    means = d[np.random.default_rng(3).integers(0, 4, size=(500, 4))].mean(axis=1)
    assert out["ci_low"] == pytest.approx(np.quantile(means, 0.025))
    assert out["ci_high"] == pytest.approx(np.quantile(means, 0.975))
    assert stats.paired_bootstrap(a, b, n_boot=500, seed=3) == out  # seeded
    assert stats.per_problem_correct([{"problem_id": "x", "correct": True}, {"problem_id": "x", "correct": False},
                                      {"problem_id": "y", "correct": True}]) == {"x": 0.5, "y": 1.0}


def test_bootstrap_se_matches_the_analytic_standard_error():
    values = [0.0, 1.0] * 50  # mean 0.5, population sd 0.5: SE = 0.5 / sqrt(100) = 0.05
    assert stats.bootstrap_se(values) == pytest.approx(0.05, abs=0.01)
    assert stats.bootstrap_se(values, seed=1) == stats.bootstrap_se(values, seed=1)
    assert math.isnan(stats.bootstrap_se([1.0]))


def test_t_quantile_is_students_t():
    assert stats.t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(0.95, 9) == pytest.approx(2.262, abs=1e-3)
    assert stats.t_quantile(0.9, 4) == pytest.approx(scipy_stats.t.ppf(0.95, 4))


def test_seed_interval_by_hand():
    one = stats.seed_interval([0.4], [0.35], [0.45])
    assert (one["acc"], one["ci_low"], one["ci_high"]) == (0.4, 0.35, 0.45)
    acc, lo, hi = [0.40, 0.44, 0.42], [0.36, 0.40, 0.38], [0.44, 0.48, 0.46]
    out = stats.seed_interval(acc, lo, hi)
    hw_boot = 0.04
    hw_seed = scipy_stats.t.ppf(0.975, 2) * np.std(acc, ddof=1) / np.sqrt(3)
    assert out["acc"] == pytest.approx(0.42)
    assert out["hw"] == pytest.approx(math.hypot(hw_boot, hw_seed))
    assert out["ci_low"] == pytest.approx(0.42 - out["hw"]) and out["ci_high"] == pytest.approx(0.42 + out["hw"])
    wide = stats.seed_interval([0.0, 1.0], [0.0, 1.0], [0.0, 1.0])  # t at 1 dof reaches far past [0, 1]
    assert wide["ci_low"] == 0.0 and wide["ci_high"] == 1.0


# ----------------------------------------------------------------------------------------- seeds × problems


def _simulated_difference(rng, S=3, n=200, k=4, seed_sd=0.04, truth=0.05):
    """One synthetic paired experiment: two configurations, S seeds each, the same n problems (shared
    difficulty), k samples per problem; the true accuracy difference is ``truth``."""
    difficulty = rng.uniform(-0.35, 0.35, n)
    p_x = np.clip(0.5 + truth / 2 + rng.normal(0, seed_sd, S)[:, None] + difficulty, 0, 1)
    p_y = np.clip(0.5 - truth / 2 + rng.normal(0, seed_sd, S)[:, None] + difficulty, 0, 1)
    return rng.binomial(k, p_x) / k - rng.binomial(k, p_y) / k


def test_crossed_components_by_hand():
    a = np.array([[1.0, 0.5, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0], [1.0, 1.0, 0.5, 0.5]])
    S, n = a.shape
    grand, row, col = a.mean(), a.mean(1), a.mean(0)
    ms_s = n * ((row - grand) ** 2).sum() / (S - 1)
    ms_p = S * ((col - grand) ** 2).sum() / (n - 1)
    ms_e = ((a - row[:, None] - col[None, :] + grand) ** 2).sum() / ((S - 1) * (n - 1))
    c = stats.crossed_components(a)
    assert (c["ms_s"], c["ms_p"], c["ms_e"]) == pytest.approx((ms_s, ms_p, ms_e))
    assert c["var"] == pytest.approx(max(ms_s + ms_p - ms_e, ms_p) / (S * n))
    assert c["sigma2_seed"] == pytest.approx(max(0.0, (ms_s - ms_e) / n))
    one = stats.crossed_components(a[:1])
    assert one["var"] == pytest.approx(a[0].var(ddof=1) / n) and one["df"] == n - 1


def test_two_stage_interval_covers_the_truth_and_problems_only_does_not():
    """2000 simulated sweeps with a known difference and seeds that differ: the two-stage interval covers the
    truth 93-97% of the time; resampling problems only (seeds pooled) under-covers badly."""
    rng = np.random.default_rng(2026)
    two_stage = one_stage = 0
    n_sim = 2000
    for i in range(n_sim):
        d = _simulated_difference(rng)
        r = stats.two_stage_interval(d, n_draws=2000, seed=i)
        two_stage += r["ci_low"] <= 0.05 <= r["ci_high"]
        lo, hi = stats.problems_only_interval(d, n_boot=500, seed=i)
        one_stage += lo <= 0.05 <= hi
    assert 0.93 <= two_stage / n_sim <= 0.97, two_stage / n_sim
    assert one_stage / n_sim < 0.85, one_stage / n_sim


def test_two_stage_interval_with_one_seed_is_the_problem_term_and_says_so():
    rng = np.random.default_rng(0)
    a = rng.binomial(4, 0.4, (1, 300)) / 4
    r = stats.two_stage_interval(a)
    assert not r["seed_variance_included"]
    half = (r["ci_high"] - r["ci_low"]) / 2
    assert half == pytest.approx(1.96 * a.std(ddof=1) / np.sqrt(300), rel=0.05)  # ~ a t-interval over problems


def test_two_stage_p_value_and_seeding():
    rng = np.random.default_rng(1)
    d = _simulated_difference(rng, truth=0.0, seed_sd=0.0)
    a, b = stats.two_stage_interval(d, seed=3), stats.two_stage_interval(d, seed=3)
    assert a == b  # seeded: a report is reproducible
    assert 0.0 <= a["p_value"] <= 1.0
    big = _simulated_difference(rng, truth=0.3, seed_sd=0.0, n=400)
    # A large real difference is significant, though never "p = 0": 2 degrees of freedom for the seed variance
    # leave heavy tails.
    assert stats.two_stage_interval(big)["p_value"] < 0.01


def test_probability_of_improvement_against_enumeration():
    x, y = [0.40, 0.42, 0.38], [0.39, 0.42, 0.30, 0.41]
    wins = sum((xi > yj) + 0.5 * (xi == yj) for xi in x for yj in y)
    assert stats.probability_of_improvement(x, y) == pytest.approx(wins / 12)
    assert stats.probability_of_improvement([1.0], [0.0]) == 1.0
    assert stats.probability_of_improvement([0.5, 0.5], [0.5]) == 0.5
    assert math.isnan(stats.probability_of_improvement([], [1.0]))


def test_interquartile_mean_by_hand():
    assert stats.interquartile_mean([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5)  # 25% of 4 = one cut each side
    assert stats.interquartile_mean([0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36, 0.99]) == pytest.approx(
        np.mean([0.32, 0.33, 0.34, 0.35]))  # the outlying seed does not move it


def test_holm_against_a_hand_computation():
    # p sorted: 0.001 (x4 = 0.004), 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, monotone)
    assert stats.holm([0.04, 0.001, 0.02, 0.01]) == pytest.approx([0.04, 0.004, 0.04, 0.03])
    assert stats.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 2 x 0.4 = 0.8, then max(0.8, 1 x 0.5)
    assert stats.holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0]  # capped at 1


def test_power_analysis():
    rng = np.random.default_rng(4)
    d = _simulated_difference(rng, S=3, n=500, seed_sd=0.01, truth=0.0)
    p = stats.power_analysis(d, effect=0.02)
    c = stats.crossed_components(d)
    assert p["mde"] == pytest.approx((scipy_stats.t.ppf(0.975, c["df"]) + scipy_stats.t.ppf(0.8, c["df"])) * c["se"])
    if p["reachable"]:
        assert p["seeds_needed"] >= 2
        assert stats.power_analysis(d, effect=0.04)["seeds_needed"] <= p["seeds_needed"]  # a larger effect is cheaper
    tiny = _simulated_difference(rng, S=3, n=20, seed_sd=0.0)
    assert stats.power_analysis(tiny, effect=0.005)["reachable"] is False  # 20 problems cannot show 0.5 points
    assert stats.power_analysis(d[:1], effect=0.02)["seeds_needed"] is None  # one seed: seed variance unknown


def test_two_stage_interval_of_the_reversed_comparison_is_its_mirror_image():
    """A verdict quotes a − b and the table b − a: the two intervals and p-values must agree exactly."""
    rng = np.random.default_rng(3)
    d = rng.normal(0.01, 0.3, size=(3, 200)) + rng.normal(0, 0.02, size=(3, 1))
    ab, ba = stats.two_stage_interval(d), stats.two_stage_interval(-d)
    assert ab["ci_low"] == pytest.approx(-ba["ci_high"], abs=1e-12)
    assert ab["ci_high"] == pytest.approx(-ba["ci_low"], abs=1e-12)
    assert ab["p_value"] == pytest.approx(ba["p_value"], abs=1e-12)


def test_identical_runs_give_a_zero_width_answer_not_an_error():
    """Two configurations that scored identically on every seed and problem (e.g. a 2-step smoke sweep): the
    difference matrix is all zeros, every mean square 0."""
    d = np.zeros((3, 40))
    ts = stats.two_stage_interval(d)
    assert ts["mean"] == ts["ci_low"] == ts["ci_high"] == 0.0
    pw = stats.power_analysis(d)
    assert pw["mde"] == 0.0 and pw["seeds_needed"] == 2 and pw["reachable"] is True
