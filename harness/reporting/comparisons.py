"""Paired comparisons between configurations: the statistics of one pair, and Holm's correction over a family.

Two configurations X and Y are compared on one benchmark through their seeds × problems accuracy matrices: seeds are
paired by seed value (every configuration of a sweep trains seed s on the same prompts in the same order, so seed s
of X and seed s of Y share that randomness; seeds without a partner are dropped, and with no common seed at all they
are paired in numeric order), problems by id, and the S × n matrix of differences goes through
:func:`harness.stats.two_stage_interval` (seed and problem variance both in the interval) and
:func:`harness.stats.power_analysis`. :meth:`harness.reporting.data.ExperimentData.compare` names the pair; the
verdict's family (:attr:`harness.reporting.data.ExperimentData.verdict_comparisons`) is, per benchmark, the best
configuration against the best configuration of every other gate, with Holm's correction over the whole family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.stats import holm, power_analysis, probability_of_improvement, two_stage_interval

ALPHA = 0.05
EFFECT = 0.02  # the difference (2 accuracy points) the power statement asks about

# (seeds in numeric order, problem ids, S × n accuracies): ExperimentData.seed_problem_matrix
SeedProblemMatrix = tuple[list[str], list[str], np.ndarray]


def paired_difference(a: SeedProblemMatrix, b: SeedProblemMatrix, *, effect: float = EFFECT) -> dict[str, Any] | None:
    """``a`` minus ``b``, paired by seed and problem (module docstring): the seeds and problems used, the two-stage
    interval and p-value of the mean difference, P(a > b) over seeds and the power statement; None when the two
    have no problem in common."""
    (seeds_a, probs_a, xa), (seeds_b, probs_b, xb) = a, b
    common = [s for s in seeds_a if s in seeds_b]
    if common:
        ia, ib = [seeds_a.index(s) for s in common], [seeds_b.index(s) for s in common]
        pairing = "by seed"
    else:
        m = min(len(seeds_a), len(seeds_b))
        ia, ib, common = list(range(m)), list(range(m)), [f"{seeds_a[i]}~{seeds_b[i]}" for i in range(m)]
        pairing = "by seed order (no common seed)"
    problems = sorted(set(probs_a) & set(probs_b))
    if not problems:
        return None
    pa = [probs_a.index(p) for p in problems]
    pb = [probs_b.index(p) for p in problems]
    d = xa[np.ix_(ia, pa)] - xb[np.ix_(ib, pb)]
    ts = two_stage_interval(d)
    pw = power_analysis(d, alpha=ALPHA, effect=effect)
    acc_a, acc_b = xa[ia].mean(axis=1), xb[ib].mean(axis=1)
    return {"seeds": common, "pairing": pairing, "n": len(problems),
            "diff": ts["mean"], "ci_low": ts["ci_low"], "ci_high": ts["ci_high"], "se": ts["se"], "p_value":
            ts["p_value"], "seed_variance_included": ts["seed_variance_included"],
            "poi": probability_of_improvement(acc_a, acc_b), "mde": pw["mde"], "effect": effect,
            "seeds_needed": pw["seeds_needed"], "power_reachable": pw["reachable"],
            "power_note": pw.get("reason", ""), "excludes_0": ts["ci_low"] > 0 or ts["ci_high"] < 0}


def adjust(rows: Sequence[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Add Holm-adjusted p-values over ``rows`` (one family) and whether each survives at ``alpha``."""
    for row, p in zip(rows, holm([r["p_value"] for r in rows]) if rows else [], strict=True):
        row["p_holm"] = p
        row["survives"] = p < alpha
        row["family_size"] = len(rows)
