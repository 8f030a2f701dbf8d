"""table.tex: the report's accuracy table as LaTeX (booktabs), for a paper."""

from __future__ import annotations

from harness.reporting.data import ExperimentData


def latex_table(data: ExperimentData) -> str:
    """The accuracy table as LaTeX (booktabs): one row per configuration (the base model first), one column per
    benchmark, "acc ± half-width of the 95% CI" in %, the best trained configuration per column in bold."""
    benches = data.benchmarks
    lines = [r"\begin{tabular}{l" + "c" * len(benches) + "}", r"\toprule",
             "configuration & " + " & ".join(_tex(b) for b in benches) + r" \\", r"\midrule"]
    best = {b: data.best(b) for b in benches}
    for g in data.groups:
        cells = []
        for b in benches:
            a = data.acc.get((g.key, b))
            if a is None:
                cells.append("--")
                continue
            text = f"{100 * a['acc']:.1f} $\\pm$ {100 * (a['ci_high'] - a['ci_low']) / 2:.1f}"
            cells.append(f"\\textbf{{{text}}}" if best[b] is g else text)
        lines.append(_tex(g.label) + " & " + " & ".join(cells) + r" \\")
        if g.is_baseline:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    """Plain text in LaTeX: escape the specials, spell the Greek letters the labels use."""
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("τ", r"$\tau$"), ("ε", r"$\varepsilon$")):
        text = text.replace(a, b)
    return text
