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
