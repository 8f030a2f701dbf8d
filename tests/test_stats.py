"""harness.stats: every statistic the harness reports, against independent computations."""

from __future__ import annotations

import hashlib
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


# ----------------------------------------------------------------------------- selection apart from testing


def test_problem_split_is_a_fixed_coin_per_id_and_halves_a_benchmark():
    ids = [f"gsm8k-{i}" for i in range(1319)]
    selection, test = stats.split_problems(ids)
    assert set(selection).isdisjoint(test) and sorted(selection + test) == sorted(ids)
    assert abs(len(selection) - len(test)) < 4 * math.sqrt(len(ids))  # a fair coin: within 2 SD of a half
    # the same id lands in the same half whatever else is in the list, on every machine (SHA-256, not hash())
    assert stats.split_problems(ids[::-1])[0] == selection[::-1]
    assert stats.in_selection_half("gsm8k-0") == (hashlib.sha256(b"gsm8k-0").digest()[0] % 2 == 0)


# ----------------------------------------------------------------------------- seeds paired only where earned


def test_seed_pairing_finds_a_shared_seed_effect_and_not_an_absent_one():
    rng = np.random.default_rng(11)
    shared = rng.normal(0, 0.02, size=(1, 5))
    with_shared = 0.5 + shared + rng.normal(0, 0.005, size=(6, 5))
    without = 0.5 + rng.normal(0, 0.02, size=(6, 5))
    assert stats.seed_pairing(with_shared)["p_value"] < 0.01 and stats.seed_pairing(with_shared)["rho"] > 0.8
    rejections = sum(stats.seed_pairing(0.5 + rng.normal(0, 0.02, size=(6, 3)))["p_value"] < 0.05
                     for _ in range(2000))
    assert 0.04 <= rejections / 2000 <= 0.06  # a valid test: 5% false pairing when nothing is shared
    assert stats.seed_pairing(without[:, :2])["p_value"] != stats.seed_pairing(without[:, :2])["p_value"]  # < 3 seeds


def test_unpaired_interval_covers_the_truth_and_does_not_depend_on_seed_order():
    """Seeds of a and b are independent runs: the interval must cover a true difference at least 93% of the time
    (it is conservative, ~98.7% at 3 vs 4 seeds: like the fiducial Behrens-Fisher interval it is built on, it
    pays for two seed variances known on 2 and 3 degrees of freedom), and shuffling which seed is called 0, 1, 2
    (meaningless here) changes nothing, unlike a by-seed pairing."""
    rng = np.random.default_rng(5)
    covered, n_sim, n = 0, 1500, 300
    for i in range(n_sim):
        v = rng.normal(0, 0.25, n)
        a = 0.03 + v + rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.3, (3, n))
        b = v + rng.normal(0, 0.02, (4, 1)) + rng.normal(0, 0.3, (4, n))
        r = stats.unpaired_two_stage_interval(a, b, n_draws=2000, seed=i)
        covered += r["ci_low"] <= 0.03 <= r["ci_high"]
    assert 0.93 <= covered / n_sim <= 0.995, covered / n_sim
    same = stats.unpaired_two_stage_interval(a[::-1], b[[2, 0, 3, 1]])
    assert same["ci_low"] == pytest.approx(stats.unpaired_two_stage_interval(a, b)["ci_low"], abs=1e-12)


# ----------------------------------------------------------------------------- power of the test that is run


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_stated_power_matches_the_detection_rate_of_the_real_test(kind):
    """two_stage_power predicts how often two_stage_interval / unpaired_two_stage_interval (the tests the verdict
    runs) find a true 3-point difference: within 4 percentage points over 800 simulated data sets."""
    rng = np.random.default_rng(21 if kind == "paired" else 22)
    S, n, su, sv, se, effect = 3, 300, 0.0001, 0.01, 0.05, 0.03
    if kind == "paired":
        comp = stats.expected_components("paired", n=n, seeds=S, sigma2_seed=2 * su, sigma2_resid=2 * se,
                                         sigma2_problem=sv)
    else:
        comp = stats.expected_components("unpaired", n=n, seeds=(S, S), sigma2_seed=(su, su),
                                         sigma2_resid=(se, se), sigma2_problem=sv)
    stated = stats.two_stage_power(kind, comp, effect)
    hits, n_sim = 0, 800
    for i in range(n_sim):
        v = rng.normal(0, math.sqrt(sv), n)
        if kind == "paired":
            d = effect + rng.normal(0, math.sqrt(2 * su), (S, 1)) + v + rng.normal(0, math.sqrt(2 * se), (S, n))
            r = stats.two_stage_interval(d, n_draws=2000, seed=i)
        else:
            a = effect + rng.normal(0, math.sqrt(su), (S, 1)) + v + rng.normal(0, math.sqrt(se), (S, n))
            b = rng.normal(0, math.sqrt(su), (S, 1)) + rng.normal(0, math.sqrt(se), (S, n))
            r = stats.unpaired_two_stage_interval(a, b, n_draws=2000, seed=i)
        hits += r["p_value"] < 0.05 and r["mean"] > 0
    assert abs(hits / n_sim - stated) < 0.04, (hits / n_sim, stated)


def test_mde_and_seeds_needed_are_consistent_and_ranged():
    rng = np.random.default_rng(4)
    d = _simulated_difference(rng, S=3, n=500, seed_sd=0.01, truth=0.0)
    comp = stats.crossed_components(d)
    fitted = stats.fitted_components("paired", comp)
    mde = stats.minimum_detectable_effect("paired", fitted)
    assert stats.two_stage_power("paired", stats.expected_components("paired", **fitted), mde) >= 0.8
    assert stats.two_stage_power("paired", stats.expected_components("paired", **fitted), 0.9 * mde) < 0.8
    need = stats.seeds_needed_range("paired", comp, 0.04)
    assert need["point"] is not None and need["low"] <= need["point"] <= (need["high"] or math.inf)
    assert stats.seeds_needed("paired", fitted, 0.08) <= need["point"]  # a larger effect is cheaper
    assert stats.seeds_needed("paired", {**fitted, "n": 20}, 0.005) is None  # 20 problems cannot show 0.5 points
