"""Report section (j): configurations whose τ moves (``gate.tau_schedule``: linear, cosine or the EUR controller of
:mod:`harness.schedule`) against the best fixed τ of the same gate (chosen on the selection half, compared on the
test half), and where their τ went and which EUR they held."""

from __future__ import annotations

import math
from typing import Any

from harness import keys as K
from harness.reporting.comparisons import adjust, power_of
from harness.reporting.data import ExperimentData, Group, float_or_none
from harness.reporting.render import Section, Table
from harness.reporting.sections.text import seed_interval_text
from harness.stability import over_seeds


def trajectory(data: ExperimentData, g: Group) -> dict[str, Any]:
    """τ_pos at the first and last step and the EUR of the second half of training, per seed and over seeds."""
    first, last, eur = [], [], []
    for _, row in g.runs.iterrows():
        run = str(row["run_id"])
        tau = data.history(run, K.train_key(K.TAU_POS)).sort_index()
        e = data.history(run, K.train_key(K.EUR, data.last_pass(row))).sort_index()
        if not tau.empty:
            first.append(float(tau.iloc[0]))
            last.append(float(tau.iloc[-1]))
        if not e.empty:
            eur.append(float(e.iloc[len(e) // 2:].mean()))
    target = float_or_none(g.runs.iloc[0].get(f"tags.{K.TAG_EUR_TARGET}")) if not g.runs.empty else None
    positive = (0.0, math.inf)
    return {"group": g.label, "schedule": g.schedule, "eur_target": target,
            "tau_first": over_seeds(first, bounds=positive), "tau_last": over_seeds(last, bounds=positive),
            "tau_last_range": (min(last), max(last)) if last else None, "eur_late": over_seeds(eur, bounds=(0.0, 1.0))}


def adaptive_section(data: ExperimentData) -> Section:
    """Moving-τ configurations against the best fixed τ of their gate (module docstring)."""
    sec = Section("(j) Adaptive temperature against the best fixed τ")
    moving = [g for g in data.trained if g.smooth and not g.fixed_tau]
    sec.record["adaptive"] = {"trajectories": [], "comparisons": []}
    if not moving:
        sec.notes.append("No configuration with a moving τ (gate.tau_schedule): see sweeps/adaptive.yaml.")
        return sec
    trajectories = [trajectory(data, g) for g in moving]
    sec.record["adaptive"]["trajectories"] = trajectories
    rows = []
    for t in trajectories:
        rng = t["tau_last_range"]
        rows.append([t["group"], t["schedule"], "—" if t["eur_target"] is None else f"{t['eur_target']:g}",
                     seed_interval_text(t["tau_first"]), seed_interval_text(t["tau_last"]),
                     "—" if rng is None else f"{rng[0]:.3g}–{rng[1]:.3g}", seed_interval_text(t["eur_late"], ".3f")])
    sec.tables.append(Table(["configuration", "schedule", "EUR target", "τ_pos at step 1", "τ_pos at the last step",
                             "last τ_pos, min–max over seeds", "EUR, second half of training"], rows,
                            caption="Mean over seeds [Student-t 95% interval over seeds]. EUR: the last pass over "
                                    "each rollout batch (the one the controller reads)."))
    comparisons, missing = [], []
    for bench in data.benchmarks:
        for g in moving:
            fixed = [x for x in data.trained if x.gate == g.gate and x.fixed_tau]
            best = data.best(bench, fixed)
            if best is None:
                missing.append(f"{g.label} on {bench}: no fixed-τ {g.gate} configuration evaluated")
                continue
            c = data.compare(g, best, bench, test_half=True)
            if c is None:
                missing.append(f"{g.label} vs {best.label} on {bench}: no per-sample records, or fewer than 2 "
                               "problems in the test half")
                continue
            comparisons.append({**c, "best_fixed": best.label, "n_fixed": len(fixed)})
    if missing:
        sec.notes.extend(missing)
    if not comparisons:
        if not data.benchmarks:
            sec.notes.append("No evaluation: only the trajectories above.")
        return sec
    adjust(comparisons)
    rows, better, worse = [], set(), set()
    for i, c in enumerate(comparisons):
        if c["survives"]:
            outcome = "adaptive better" if c["diff"] > 0 else "fixed τ better"
            (better if c["diff"] > 0 else worse).add(i)
        else:
            mde = power_of(c)["mde"] if c["ranked"] else math.nan
            outcome = f"undecided (could detect ≈{mde:.3f})" if math.isfinite(mde) else "undecided"
        c["outcome"] = outcome
        a = data.acc.get((next(g.key for g in moving if g.label == c["a"]), c["benchmark"]))
        rows.append([c["benchmark"], c["a"], "—" if a is None else f"{a['acc']:.3f}",
                     f"{c['best_fixed']} (best of {c['n_fixed']})", f"{c['diff']:+.3f}",
                     f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", f"{c['p_holm']:.3g}",
                     f"{c['seeds_a']}, {c['seeds_b']} × {c['n']} (test half)", outcome])
    sec.tables.append(Table(["benchmark", "adaptive configuration", "accuracy", "vs best fixed τ of the gate",
                             "Δ accuracy", "95% CI", "Holm p", "seeds × problems", "outcome"], rows, better,
                            caption="Δ = adaptive − best fixed τ on the test half, problems paired (two-stage "
                                    "interval, seed variance included); Holm's correction over this table.",
                            worse=worse))
    sec.paragraphs.append(
        "The fixed τ it is compared with is the best of the grid on the selection half of each benchmark, and the "
        "difference is measured on the other half, so the choice does not flatter the fixed side. 'Undecided' "
        "means the interval includes 0; "
        "the number is the difference this many seeds and problems could detect with 80% power, so a smaller true "
        "difference is not ruled out.")
    sec.record["adaptive"]["comparisons"] = comparisons
    return sec
