"""Report section (d): each configuration against a sigmoid one (problems paired; seeds paired where the verdict's
pairing test earned it), with Holm's correction over the comparisons of this table. Where a partner or a row was
chosen by accuracy, the choice used the selection half and the comparison the test half."""

from __future__ import annotations

from harness.reporting.comparisons import adjust
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import forest_figure, png
from harness.reporting.render import Figure, Section, Table

MAX_PAIRED_ROWS = 30


def paired(data: ExperimentData) -> Section:
    """Each configuration against a sigmoid one (module docstring), with Holm's correction over this table."""
    sec = Section("(d) Each gate against the sigmoid baseline, paired by problem")
    sec.record["paired"] = []
    sig = [g for g in data.trained if g.gate == "sigmoid"]
    others = [g for g in data.trained if g.gate != "sigmoid"]
    if not data.benchmarks:
        sec.notes.append("No evaluation: no paired comparison.")
        return sec
    if not sig or not others:
        sec.notes.append("Needs sigmoid cells and cells of another gate, evaluated: "
                         + ("no sigmoid cell." if not sig else "only sigmoid cells."))
        return sec
    pairs: list[tuple[Group, Group, str, str]] = []  # (gate group, sigmoid group, benchmark, why)
    for b in data.benchmarks:
        for g in others:
            if (g.key, b) not in data.acc:
                continue
            same = [s for s in sig if g.fixed_tau and s.fixed_tau and s.tau_pos == g.tau_pos
                    and s.tau_neg == g.tau_neg and (s.key, b) in data.acc]
            if same:
                pairs.append((g, same[0], b, "same τ"))
            else:
                best = data.best(b, sig)
                if best is not None:
                    why = (f"{g.gate} has no τ: best sigmoid cell" if not g.smooth
                           else "τ moves: best sigmoid cell" if not g.fixed_tau
                           else "no sigmoid at this τ: best sigmoid cell")
                    pairs.append((g, best, b, why))
    if len(pairs) > MAX_PAIRED_ROWS:
        keep = []
        for b in data.benchmarks:
            for gate in dict.fromkeys(g.gate for g in others):
                cand = [p for p in pairs if p[2] == b and p[0].gate == gate]
                if cand:
                    keep.append(max(cand, key=lambda p: data.selection_accuracy(p[0], b)))
        sec.notes.append(f"{len(pairs)} comparisons; shown: the best cell of each gate per benchmark (chosen on the "
                         "selection half, compared on the test half).")
        pairs = [(g, s, b, f"{why}; row chosen") for g, s, b, why in keep]
    records, missing = [], []
    for g, s, b, why in pairs:
        c = data.compare(g, s, b, test_half=why != "same τ")
        if c is None:
            missing.append(f"{g.label} vs {s.label} on {b}")
            continue
        records.append({**c, "gate": g.gate, "cell": g.label, "sigmoid_cell": s.label, "why": why,
                        "run_ids": g.run_ids, "sigmoid_run_ids": s.run_ids})
    if missing:
        sec.notes.append("Not compared (no per-sample artifacts eval/samples/<benchmark>.jsonl, or fewer than 2 "
                         "problems in common on the half compared): " + "; ".join(missing))
    if not records:
        return sec
    adjust(records)
    rows = []
    for r in records:
        verdict = "no" if not r["survives"] else "yes: better" if r["diff"] > 0 else "yes: worse"
        r["verdict"] = verdict
        rows.append([r["benchmark"], r["cell"], r["sigmoid_cell"], r["why"], f"{r['diff']:+.3f}",
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_holm']:.3g}", f"{r['poi']:.2f}",
                     f"{r['seeds_a']}, {r['seeds_b']} × {r['n']}{' (test half)' if r['test_half'] else ''}",
                     verdict])
    better = {i for i, r in enumerate(records) if r["verdict"] == "yes: better"}
    worse = {i for i, r in enumerate(records) if r["verdict"] == "yes: worse"}
    sec.tables.append(Table(["benchmark", "cell", "vs sigmoid cell", "sigmoid chosen by", "Δ accuracy", "95% CI",
                             "Holm p", "P(cell > sigmoid)", "seeds × problems", "survives Holm"], rows, better,
                            caption="Δ = mean over paired seeds and problems of (cell − sigmoid cell) accuracy. "
                                    "Green: better than sigmoid after Holm's correction over this table; red: "
                                    "worse. P(cell > sigmoid) is over seed pairs. Where the sigmoid partner or the "
                                    "row was chosen by accuracy (column 4), the choice used each benchmark's "
                                    "selection half and the comparison uses its test half.", worse=worse))
    sec.paragraphs.append(
        "Two-stage interval (reports/README.md): problem p is paired with problem p; seed s of the cell with seed s "
        "of the sigmoid cell only where the verdict found a shared seed effect; the seed-to-seed and "
        "problem-to-problem variance are both in the interval. The sigmoid partner is the sigmoid cell with the same "
        "τ_pos/τ_neg when there is one, else the best sigmoid cell on the selection half (column 4 says which).")
    sec.figures.append(Figure("fig_paired.png", png(forest_figure(records)),
                              "Accuracy difference to the sigmoid cell with its paired two-stage 95% interval; "
                              "right of the line: better than sigmoid."))
    if not all(r["seed_variance_included"] for r in records):
        sec.notes.append("One seed per cell in some comparisons: there the interval covers problem sampling only.")
    sec.record["paired"] = records
    return sec
