"""Paired comparisons between configurations, the family the verdict tests, and what the data can detect.

Two configurations X and Y are compared on one benchmark through their seeds × problems accuracy matrices: seeds are
paired by seed value (every configuration of a sweep trains seed s on the same prompts in the same order, so seed s
of X and seed s of Y share that randomness; seeds without a partner are dropped, and with no common seed at all they
are paired in numeric order), problems by id, and the S × n matrix of differences goes through
:func:`harness.stats.two_stage_interval` (seed and problem variance both in the interval) and
:func:`harness.stats.power_analysis`. The verdict's family is, per benchmark, the best configuration against the best
configuration of every other gate; Holm's correction runs over the whole family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.reporting.data import ExperimentData, Group
from harness.stats import holm, power_analysis, probability_of_improvement, two_stage_interval

ALPHA = 0.05
EFFECT = 0.02  # the difference (2 accuracy points) the power statement asks about


def compare(data: ExperimentData, a: Group, b: Group, bench: str, *, effect: float = EFFECT) -> dict[str, Any] | None:
    """``a`` minus ``b`` on ``bench``, paired by seed and problem (module docstring); None without per-sample
    records."""
    ma, mb = data.seed_problem_matrix(a, bench), data.seed_problem_matrix(b, bench)
    if ma is None or mb is None:
        return None
    (seeds_a, probs_a, xa), (seeds_b, probs_b, xb) = ma, mb
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
    return {"benchmark": bench, "a": a.label, "b": b.label, "gate_a": a.gate, "gate_b": b.gate,
            "run_ids_a": a.run_ids, "run_ids_b": b.run_ids, "seeds": common, "pairing": pairing, "n": len(problems),
            "diff": ts["mean"], "ci_low": ts["ci_low"], "ci_high": ts["ci_high"], "se": ts["se"], "p_value":
            ts["p_value"], "seed_variance_included": ts["seed_variance_included"],
            "poi": probability_of_improvement(acc_a, acc_b), "mde": pw["mde"], "effect": effect,
            "seeds_needed": pw["seeds_needed"], "power_reachable": pw["reachable"],
            "power_note": pw.get("reason", ""), "excludes_0": ts["ci_low"] > 0 or ts["ci_high"] < 0}


def verdict_family(data: ExperimentData, *, effect: float = EFFECT) -> list[dict[str, Any]]:
    """Per benchmark, the best trained configuration against the best configuration of each other gate, with
    Holm-adjusted p-values over all of them (``p_holm``, ``survives`` at α = 0.05)."""
    out: list[dict[str, Any]] = []
    for bench in data.benchmarks:
        win = data.best(bench)
        if win is None:
            continue
        for gate in dict.fromkeys(g.gate for g in data.trained if g.gate != win.gate):
            other = data.best(bench, [g for g in data.trained if g.gate == gate])
            row = None if other is None else compare(data, win, other, bench, effect=effect)
            if row is not None:
                out.append(row)
    adjust(out)
    return out


def adjust(rows: Sequence[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Add Holm-adjusted p-values over ``rows`` (one family) and whether each survives at ``alpha``."""
    for row, p in zip(rows, holm([r["p_value"] for r in rows]) if rows else [], strict=True):
        row["p_holm"] = p
        row["survives"] = p < alpha
        row["family_size"] = len(rows)
