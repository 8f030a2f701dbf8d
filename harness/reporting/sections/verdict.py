"""Report section: the verdict, shown first. Per benchmark the best configuration, and which of its differences to
the best configuration of every other gate survive Holm's correction over the whole family
(:attr:`harness.reporting.data.ExperimentData.verdict_comparisons`), then what the data cannot decide."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.reporting.data import ExperimentData
from harness.reporting.render import Section
from harness.reporting.sections.text import plural


def verdict(data: ExperimentData) -> Section:
    """One sentence per benchmark: the best configuration, and which of its differences to the best configuration
    of every other gate survive Holm's correction over the whole family (paired by seed and problem, seed and
    problem variance in the intervals), then what the data cannot decide."""
    sec = Section("Verdict")
    sec.record["verdict"] = []
    sec.record["comparisons"] = []
    if not data.benchmarks:
        ranked = sorted(data.trained, key=data.score, reverse=True)
        if ranked and math.isfinite(data.score(ranked[0])):
            top = ranked[0]
            sec.paragraphs.append(
                f"No evaluation was logged, so there is no accuracy verdict. By the final training reward (a "
                f"noisy proxy of one batch) the top cell is **{top.label}** ({data.score(top):.3f}).")
        else:
            sec.paragraphs.append("No evaluation and no training metrics: no verdict.")
        return sec
    family = data.verdict_comparisons
    sec.record["comparisons"] = family
    for b in data.benchmarks:
        win = data.best(b)
        if win is None:
            continue
        wa = data.acc[(win.key, b)]
        rows = [r for r in family if r["benchmark"] == b]
        entry: dict[str, Any] = {"benchmark": b, "winner": win.label, "winner_gate": win.gate, **_ci(wa),
                                 "n_seeds": wa["n_seeds"]}
        runner = data.best(b, [g for g in data.trained if g.gate != win.gate])
        tie = runner is not None and data.acc[(runner.key, b)]["acc"] == wa["acc"]
        # equal accuracies (e.g. every configuration at 0 in a smoke run): no configuration is "best"
        if tie:
            text = (f"**{b}**: **{win.label}** and **{runner.label}** tie at the top ({_fmt_ci(wa)}, "
                    f"{plural(wa['n_seeds'], 'seed')})")
        else:
            text = f"**{b}**: best is **{win.label}** ({_fmt_ci(wa)}, {plural(wa['n_seeds'], 'seed')})"
        if runner is not None:
            ra = data.acc[(runner.key, b)]
            entry.update(runner_up=runner.label, runner_up_gate=runner.gate, runner_up_acc=ra["acc"],
                         runner_up_ci_low=ra["ci_low"], runner_up_ci_high=ra["ci_high"],
                         separated=wa["ci_low"] > ra["ci_high"])
        if not rows:
            text += ("; no other gate has per-sample records to compare with." if runner is not None else
                     "; no other gate was evaluated, so nothing to separate it from.")
        else:
            ahead = [r for r in rows if r["survives"]]
            tied = [r for r in rows if not r["survives"]]
            m = rows[0]["family_size"]
            text += f". Paired by seed and problem, Holm-corrected over the {plural(m, 'comparison')} of this verdict: "
            if ahead:
                text += "it is ahead of " + "; ".join(
                    f"{r['b']} by {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (adjusted p = "
                    f"{r['p_holm']:.3g})" for r in ahead)
                text += "; " if tied else "."
            if tied:
                text += ("the data cannot tell it from " if ahead else "no difference survives: the data cannot "
                         "tell it from ") + ", ".join(
                    f"{r['b']} ({r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], adjusted p = "
                    f"{r['p_holm']:.2g})" for r in tied) + "."
            entry["survive"] = [r["b"] for r in ahead]
            entry["undecided"] = [r["b"] for r in tied]
            if not all(r["seed_variance_included"] for r in rows):
                text += " One seed per configuration: run-to-run (seed) variance is not in these intervals."
            mdes = [r["mde"] for r in rows if math.isfinite(r["mde"])]
            if mdes and max(mdes) == 0:
                text += " Every paired difference is exactly 0 (identical scores): there is no variance to judge by."
            elif mdes:
                text += (f" With these seeds and problems the smallest difference detectable at 80% power is "
                         f"{min(mdes):.3f}–{max(mdes):.3f}.")
        sec.record["verdict"].append(entry)
        sec.paragraphs.append(text)
    return sec


def _ci(a: Mapping[str, Any]) -> dict[str, float]:
    return {"acc": a["acc"], "ci_low": a["ci_low"], "ci_high": a["ci_high"]}


def _fmt_ci(a: Mapping[str, Any]) -> str:
    return f"{a['acc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
