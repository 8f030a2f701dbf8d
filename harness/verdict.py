r"""The verdict: which gate is ahead of which, on data the selection never saw, and what the data cannot decide.

Input per benchmark: every trained configuration as an :class:`Arm` (its gate, its seeds and the seeds × problems
matrix of item scores). The procedure, the same for a report and for the simulation study that checks it
(``scripts/verdict_simulation.py``):

1. **Selection apart from testing.** When some gate has several configurations (several τ), each gate's
   representative is the configuration with the highest accuracy on the benchmark's *selection half*
   (:func:`harness.stats.split_problems`), and every comparison uses the *test half* only. When every gate has one
   configuration nothing is selected and the comparisons use every problem.
2. **All pairs of gates**, not "the best against the rest": the family is every pair of gates on every tested
   benchmark (a pooled benchmark such as AIME24 + AIME25 is reported, not tested again), Holm-adjusted over the
   whole family, so the family-wise error rate is at most α whatever the truth.
3. **Seeds paired only where earned.** Problems are always paired. Seed s of X and seed s of Y are paired only
   when the design shares randomness between them (a harness sweep gives every configuration the same prompts in the
   same order at one seed) *and* the data show it (:func:`harness.stats.seed_pairing`: F-test of a shared seed
   effect at :data:`PAIRING_ALPHA`); otherwise the seeds are treated as unpaired
   (:func:`harness.stats.unpaired_two_stage_interval`).
4. **One seed ranks nothing.** A pair where either side has fewer than 2 seeds gets the problems-only interval and
   no claim: with one training run per configuration, a difference cannot be told apart from the luck of that run.
5. **Claims**: X is *ahead* of Y where the Holm-adjusted p-value is below α; X *leads* a benchmark when it is ahead
   of every other gate there. Everything else is undecided, and the verdict says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.stats import (
    holm,
    probability_of_improvement,
    seed_pairing,
    split_problems,
    two_stage_interval,
    unpaired_two_stage_interval,
)

ALPHA = 0.05
EFFECT = 0.02  # the difference (2 accuracy points) power statements ask about
PAIRING_ALPHA = 0.05  # the F-test of a shared seed effect must reject at this level before seeds are paired
MIN_SEEDS = 2  # fewer seeds per configuration: no ranking claim


@dataclass(frozen=True)
class Arm:
    """One configuration on one benchmark: ``scores[s, p]`` is the mean correctness of seed ``seeds[s]`` on problem
    ``problems[p]`` over its k samples."""

    label: str
    gate: str
    seeds: tuple[str, ...]
    problems: tuple[str, ...]
    scores: np.ndarray = field(repr=False)

    def columns(self, problems: Sequence[str]) -> np.ndarray:
        """The S × len(problems) sub-matrix of ``problems`` (every one must be among :attr:`problems`)."""
        index = {p: i for i, p in enumerate(self.problems)}
        return self.scores[:, [index[p] for p in problems]]

    def mean_on(self, problems: Sequence[str]) -> float:
        return float(self.columns(problems).mean()) if problems else float("nan")


def representatives(arms: Sequence[Arm]) -> tuple[dict[str, Arm], list[str], list[str], bool]:
    """Each gate's configuration to compare, the problems it was chosen on and the problems to test on, and whether
    anything was selected (module docstring, step 1). Problems are those every arm has."""
    common = sorted(set.intersection(*(set(a.problems) for a in arms))) if arms else []
    by_gate: dict[str, list[Arm]] = {}
    for arm in arms:
        by_gate.setdefault(arm.gate, []).append(arm)
    if all(len(v) == 1 for v in by_gate.values()):
        return {g: v[0] for g, v in by_gate.items()}, [], common, False
    selection, test = split_problems(common)
    chosen = {g: max(v, key=lambda a: a.mean_on(selection)) for g, v in by_gate.items()}
    return chosen, selection, test, True


def choose_pairing(arms: Sequence[Arm], problems: Sequence[str], *, design_shares_seeds: bool) -> dict[str, Any]:
    """Pair seeds by seed value, or not (module docstring, step 3): the decision, the estimated correlation of two
    configurations' results at one seed and the test's p-value, and the reason in words."""
    seeds = sorted(set.intersection(*(set(a.seeds) for a in arms)), key=_seed_order) if arms else []
    if not design_shares_seeds:
        return {"paired": False, "rho": float("nan"), "p_value": float("nan"),
                "reason": "the configurations do not share randomness by seed"}
    if len(arms) < 2 or len(seeds) < 3:
        return {"paired": False, "rho": float("nan"), "p_value": float("nan"),
                "reason": f"{len(seeds)} common seeds: too few to estimate a shared seed effect (3 needed)"}
    means = np.array([[a.columns(problems)[a.seeds.index(s)].mean() for s in seeds] for a in arms])
    test = seed_pairing(means)
    paired = bool(test["p_value"] < PAIRING_ALPHA)
    word = "shared" if paired else "no detectable shared"
    return {"paired": paired, "rho": test["rho"], "p_value": test["p_value"],
            "reason": f"{word} seed effect across configurations (correlation at one seed {test['rho']:.2f}, "
                      f"F-test p = {test['p_value']:.2g}, pairing needs p < {PAIRING_ALPHA:g})"}


def compare_arms(a: Arm, b: Arm, problems: Sequence[str], *, paired_seeds: bool) -> dict[str, Any]:
    """``a`` minus ``b`` on ``problems`` (paired by problem; by seed only with ``paired_seeds`` and common seeds):
    the two-stage interval and p-value, or with fewer than :data:`MIN_SEEDS` seeds on a side the problems-only
    interval of their first seeds and ``ranked`` False."""
    xa, xb = a.columns(problems), b.columns(problems)
    common = [s for s in a.seeds if s in b.seeds]
    row: dict[str, Any] = {"a": a.label, "b": b.label, "gate_a": a.gate, "gate_b": b.gate, "n": len(problems),
                           "seeds_a": len(a.seeds), "seeds_b": len(b.seeds)}
    if min(len(a.seeds), len(b.seeds)) < MIN_SEEDS:
        ts = two_stage_interval(xa[:1] - xb[:1])
        row.update(kind="problems only (one seed)", ranked=False, design="paired")
    elif paired_seeds and len(common) >= MIN_SEEDS:
        ia, ib = [a.seeds.index(s) for s in common], [b.seeds.index(s) for s in common]
        ts = two_stage_interval(xa[ia] - xb[ib])
        row.update(kind="two-stage, seeds paired", ranked=True, design="paired", seeds=common)
    else:
        ts = unpaired_two_stage_interval(xa, xb)
        row.update(kind="two-stage, seeds unpaired", ranked=True, design="unpaired")
    row.update(diff=ts["mean"], ci_low=ts["ci_low"], ci_high=ts["ci_high"], se=ts["se"], p_value=ts["p_value"],
               components=ts["components"],
               poi=probability_of_improvement(xa.mean(axis=1), xb.mean(axis=1)))
    return row


def gate_verdict(arms_by_bench: Mapping[str, Sequence[Arm]], *, tested: Sequence[str] | None = None,
                 design_shares_seeds: bool = True, alpha: float = ALPHA) -> dict[str, Any]:
    """The verdict over benchmarks (module docstring): per benchmark the representatives, the halves, the pairing
    and every pair of gates, oriented so that ``a`` is ahead on the tested problems; one Holm family over the ranked
    pairs of the ``tested`` benchmarks (default: all); who leads where; the pairs left undecided."""
    tested = list(arms_by_bench) if tested is None else list(tested)
    benches: dict[str, dict[str, Any]] = {}
    family: list[dict[str, Any]] = []
    for bench, arms in arms_by_bench.items():
        if not arms:
            continue
        chosen, selection, test, selected = representatives(arms)
        pairing = choose_pairing(list(chosen.values()), test, design_shares_seeds=design_shares_seeds)
        rows = []
        # an interval over problems needs two of them: fewer on the test half (a tiny eval.limit) compares nothing
        pairs = itertools.combinations(chosen, 2) if len(test) >= 2 else []
        for ga, gb in pairs:
            a, b = chosen[ga], chosen[gb]
            if a.mean_on(test) < b.mean_on(test):
                a, b = b, a
            row = compare_arms(a, b, test, paired_seeds=pairing["paired"])
            row.update(benchmark=bench, tested=bench in tested)
            rows.append(row)
            if row["ranked"] and row["tested"]:
                family.append(row)
        benches[bench] = {"chosen": {g: a.label for g, a in chosen.items()}, "selected": selected,
                          "n_selection": len(selection), "n_test": len(test), "pairing": pairing, "rows": rows,
                          "one_seed": bool(rows) and not any(r["ranked"] for r in rows),
                          "unranked": [(r["gate_a"], r["gate_b"]) for r in rows if not r["ranked"]]}
    for row, p in zip(family, holm([r["p_value"] for r in family]) if family else [], strict=True):
        row.update(p_holm=p, survives=p < alpha, family_size=len(family))
    for info in benches.values():
        gates = list(info["chosen"])
        ahead = {(r["gate_a"], r["gate_b"]) for r in info["rows"] if r.get("survives")}
        info["leader"] = next((g for g in gates if all((g, o) in ahead for o in gates if o != g)), None) \
            if len(gates) > 1 else None
        info["undecided"] = [(r["gate_a"], r["gate_b"]) for r in info["rows"] if not r.get("survives")]
    return {"benchmarks": benches, "family": family, "family_size": len(family), "alpha": alpha,
            "claims": [r for r in family if r["survives"]]}


def _seed_order(seed: str) -> tuple[float, str]:
    try:
        return (float(seed), seed)
    except ValueError:
        return (float("inf"), seed)
