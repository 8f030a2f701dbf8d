"""Report section (c): strict accuracy with its 95% CI per configuration and whole benchmark (comparable with published
numbers), the lenient accuracy beside it, the configuration chosen per benchmark (on the selection half) marked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.reporting.data import ExperimentData, Group
from harness.reporting.render import Section, Table


def accuracy_table(data: ExperimentData) -> Section:
    """Strict accuracy with its 95% CI per configuration and whole benchmark, lenient beside it; the configuration
    chosen per benchmark (on the selection half) marked."""
    sec = Section("(c) Accuracy by gate, τ and benchmark")
    if not data.acc:
        sec.notes.append("No evaluation metrics (eval/<benchmark>/acc) in this experiment: no accuracy table. "
                         "Runs with eval.enabled=false (e.g. tuning on the training-reward proxy) have none.")
        sec.record["accuracy"] = []
        return sec
    rows, highlight, records = [], set(), []
    best_of = {b: data.best(b) for b in data.benchmarks}
    for g in data.groups:
        for b in data.benchmarks:
            a = data.acc.get((g.key, b))
            if a is None:
                continue
            is_best = best_of[b] is g
            if is_best:
                highlight.add(len(rows))
            rows.append([g.gate, _tau_text(g) + _distinguishing(g), b, f"{a['acc']:.3f}",
                         f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                         f"{a['lenient_acc']:.3f}", str(a["n_seeds"]), "—" if "iqm" not in a else f"{a['iqm']:.3f}",
                         _problems_text(a), "yes" if is_best else ""])
            records.append({**a, "chosen": is_best})
    sec.tables.append(Table(["gate", "τ_pos / τ_neg (clip, methods: ε, own keys)", "benchmark", "strict accuracy",
                             "95% CI", "lenient", "seeds", "IQM over seeds", "problems", "best on selection half"],
                            rows,
                            highlight,
                            caption="Strict accuracy = the <answer> span judged, as the paper extracts "
                                    "(eval/<benchmark>/strict_acc), mean correctness over the k samples of each "
                                    "problem, averaged over the whole benchmark and the seeds: the number to compare "
                                    "with published ones. Lenient adds the \\boxed{} and last-number fallbacks "
                                    "(eval/<benchmark>/acc). Marked: the configuration with the best strict accuracy "
                                    "on the benchmark's selection half (the verdict compares each gate's best there "
                                    "when a gate has several configurations, else every gate as run); IQM (the mean "
                                    "of the middle half of the seeds) from 4 seeds."))
    multi = any(r["n_seeds"] > 1 for r in records)
    sec.paragraphs.append(
        "95% CI: with one seed, the evaluator's bootstrap over problems exactly as logged "
        "(eval/<benchmark>/strict_acc_ci_low / strict_acc_ci_high)"
        + ("; with several seeds, the two-stage interval of the seeds × problems accuracies (reports/README.md): "
           "both which training runs and which problems were drawn are in it." if multi else "."))
    if not multi:
        sec.notes.append("One seed per cell: the CIs cover which problems were drawn, not run-to-run variance.")
    sec.record["accuracy"] = records
    return sec


def _distinguishing(g: Group) -> str:
    """The parameters that tell this configuration from another with the same label (``(train.staleness=4)``, the
    tail :func:`harness.reporting.data.group_cells` appends), so that no two rows of the table read alike."""
    _, sep, tail = g.label.rpartition(" (")
    return f" ({tail}" if sep and tail.endswith(")") and "=" in tail else ""


def _tau_text(g: Group) -> str:
    if not g.smooth:  # clip and the ratio-control methods: ε and the method's own keys, as in its label
        text = " ".join(x for x in (f"ε {g.eps[0]:g}/{g.eps[1]:g}" if g.eps else "", g.params) if x)
        return text or "—"
    taus = f"{g.tau_pos:.3g} / {g.tau_neg:.3g}" if g.tau_pos is not None and g.tau_neg is not None else "—"
    if g.nu is None and g.schedule == "constant":
        return taus
    # the label without the gate's name: "ν=4 τ=10/12", "EUR→0.9" (from the start τ), "τ 1→20 (cosine)"
    text = g.label.split(" ", 1)[1] if " " in g.label else g.label
    return f"{text} (from {taus})" if g.schedule == "eur_target" else text


def _problems_text(a: Mapping[str, Any]) -> str:
    """``500``, or ``10 of 1319`` when an evaluation limit kept the first problems only."""
    if a["n_problems"] is None:
        return "—"
    n, total = a["n_problems"], a.get("n_total")
    return f"{n:.0f} of {total:.0f}" if total is not None and total > n else f"{n:.0f}"
