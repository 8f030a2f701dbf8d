"""Report section: the verdict, shown first (:attr:`harness.reporting.data.ExperimentData.verdict`, the procedure
of :mod:`harness.verdict`). Per benchmark: which gate leads, which pairs of gates are ordered after Holm's correction
over the whole family, and which the data cannot order; how the configurations were chosen and tested; whether seeds
were paired and why; what one seed cannot tell."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.reporting.data import ExperimentData
from harness.reporting.render import Section
from harness.reporting.sections.text import plural

MAX_LISTED = 10  # unordered pairs written out per benchmark, largest gap first


def verdict(data: ExperimentData) -> Section:
    """One paragraph per benchmark (module docstring), then one sentence on the family and the halves."""
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
    v = data.verdict
    sec.record["comparisons"] = data.verdict_comparisons
    for bench in data.verdict_strata:
        info = v["benchmarks"].get(bench)
        if info is None:
            sec.paragraphs.append(f"**{bench}**: no per-sample records, so no comparison.")
            continue
        rows = info["rows"]
        entry: dict[str, Any] = {"benchmark": bench, "leader": info["leader"], "chosen": info["chosen"],
                                 "selected": info["selected"], "n_selection": info["n_selection"],
                                 "n_test": info["n_test"], "pairing": info["pairing"],
                                 "ahead": [[r["gate_a"], r["gate_b"]] for r in rows if r.get("survives")],
                                 "undecided": [[r["gate_a"], r["gate_b"]] for r in rows if not r.get("survives")]}
        sec.record["verdict"].append(entry)
        sec.paragraphs.append(bench_text(bench, info))
    sec.paragraphs.append(family_text(v, data))
    return sec


def bench_text(bench: str, info: Mapping[str, Any]) -> str:
    """The verdict on one benchmark in words."""
    rows = info["rows"]
    if not rows and len(info["chosen"]) > 1:
        return (f"**{bench}**: {info['n_test']} problem(s) to test on, too few to compare the gates (an interval "
                "over problems needs two; raise eval.limit).")
    if not rows:
        return f"**{bench}**: one gate evaluated, nothing to compare it with."
    if info["one_seed"]:
        shown = "; ".join(f"{r['gate_a']} − {r['gate_b']} {_fmt(r)}" for r in rows)
        return (f"**{bench}**: one seed per configuration, so no gate is ranked: a difference between two single "
                f"training runs mixes the gate with the luck of each run, and one run per gate cannot tell them "
                f"apart. Differences over problems only (not attributable to the gate): {shown}. A ranking needs at "
                "least 2 seeds per configuration; the power section says how many a 2-point difference needs.")
    tested = [r for r in rows if "p_holm" in r]
    if not tested:
        return (f"**{bench}** (pooled, reported but not tested again): "
                + "; ".join(f"{r['gate_a']} − {r['gate_b']} {_fmt(r)}" for r in rows) + ".")
    ahead = [r for r in tested if r["survives"]]
    undecided = [r for r in tested if not r["survives"]]
    if info["leader"]:
        text = f"**{bench}**: **{info['leader']}** leads, ahead of every other gate: "
    elif ahead:
        text = f"**{bench}**: no gate leads; ordered pairs: "
    else:
        text = f"**{bench}**: no difference between gates survives the correction. "
    if ahead:
        text += "; ".join(f"{r['gate_a']} ahead of {r['gate_b']} by {_fmt(r)}, adjusted p = {r['p_holm']:.2g}"
                          for r in ahead) + ". "
    if undecided:
        # Largest gap first; past MAX_LISTED pairs (a many-method sweep has 45 per benchmark) the rest is summed up,
        # every pair stays in report.json ("comparisons").
        undecided = sorted(undecided, key=lambda r: -abs(r["diff"]))
        listed = undecided[:MAX_LISTED]
        text += ("The data cannot order " + "; ".join(
            f"{r['gate_a']} and {r['gate_b']} ({_fmt(r)}, adjusted p = {r['p_holm']:.2g})" for r in listed))
        rest = undecided[MAX_LISTED:]
        if rest:
            text += (f"; nor the other {len(rest)} pairs, each within ±{max(abs(r['diff']) for r in rest):.3f} "
                     "(every pair with its interval: report.json, \"comparisons\")")
        text += ". "
    if all(r["diff"] == 0 and r["ci_low"] == r["ci_high"] for r in tested):
        text += "Every difference is exactly 0 (identical scores): there is no variance to judge by. "
    unranked = [r for r in rows if not r["ranked"]]
    if unranked:
        text += ("Not ranked, one side has a single seed (differences over problems only): " + "; ".join(
            f"{r['gate_a']} − {r['gate_b']} {_fmt(r)}" for r in unranked) + ". ")
    text += f"Seeds {'paired' if info['pairing']['paired'] else 'not paired'}: {info['pairing']['reason']}."
    return text


def family_text(v: Mapping[str, Any], data: ExperimentData) -> str:
    """How the configurations were chosen and tested, and the family the correction ran over."""
    benches = v["benchmarks"].values()
    selected = [b for b, info in v["benchmarks"].items() if info["selected"]]
    text = (f"Strict accuracy (the <answer> span, as the paper extracts). One Holm family of "
            f"{plural(v['family_size'], 'comparison')} (every pair of gates on every tested benchmark, "
            f"α = {v['alpha']:g}; a pooled benchmark is reported, not tested twice). ")
    if selected:
        n = sum(info["n_selection"] for info in benches if info["selected"])
        m = sum(info["n_test"] for info in benches if info["selected"])
        text += (f"Each gate's configuration was chosen on the selection half of each benchmark ({n} problems) and "
                 f"every difference, interval and p-value above uses the test half only ({m} problems), so the "
                 "choice cannot flatter the comparison.")
    else:
        text += "Every gate has one configuration, so nothing was selected and every problem is tested."
    return text


def _fmt(r: Mapping[str, Any]) -> str:
    return f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
