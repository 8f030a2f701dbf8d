"""Report section (a): the gate value f(r) and gradient weight w(r) of the swept gates at the swept temperatures."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from harness import keys as K
from harness.gates import STUDENT, get_gate, has_temperature, student_gate
from harness.reporting.data import ExperimentData
from harness.reporting.figures import plot_gate_shapes, png
from harness.reporting.render import Figure, Section


def gate_shapes(data: ExperimentData) -> Section:
    """f(r) and w(r) of the swept gates at the swept temperatures."""
    sec = Section("(a) Gate shapes at the swept temperatures")
    gates = list(dict.fromkeys(g.gate for g in data.trained))
    if not gates:
        sec.notes.append("No cells: no gates to draw.")
        return sec
    taus = sorted({g.tau_pos for g in data.trained if g.smooth and g.tau_pos is not None})
    if len(taus) > 4:
        # A tuning study has many τ: draw the range ends, the best cell's τ and the median.
        best = max((g for g in data.trained if g.smooth and g.tau_pos is not None), key=data.score)
        picks = []
        for t in sorted({taus[0], float(np.median(taus)), best.tau_pos or taus[0], taus[-1]}):
            if not picks or t / picks[-1] > 1.15:  # nearly equal τ draw nearly equal shapes: one is enough
                picks.append(t)
            elif t == best.tau_pos:
                picks[-1] = t
        sec.notes.append(f"{len(taus)} distinct τ values; drawn: {', '.join(f'{t:.3g}' for t in picks)} "
                         f"(range ends, median, best cell's τ).")
        taus = picks
    taus = taus or [1.0]
    drawable: list[Any] = []
    methods = [spec for spec in gates if not has_temperature(spec) and spec != "clip"]
    if methods:
        sec.notes.append(f"Not drawn: {', '.join(methods)} (ratio-control methods; their formulas and properties "
                         "are in docs/methods.md).")
    for spec in (g for g in gates if g not in methods):
        if spec == STUDENT:  # one curve per tail index
            drawable += [student_gate(nu) for nu in sorted({g.nu for g in data.trained if g.gate == STUDENT})]
            continue
        try:
            get_gate(spec)
            drawable.append(spec)
        except Exception as exc:  # a custom gate whose module is not importable here
            sec.notes.append(f"gate {spec} not drawn: {exc}")
    clip = next((g for g in data.trained if g.gate == "clip" and g.eps), None)
    widths = {str(w) for w in data.cells.get(f"tags.{K.TAG_WIDTH}", pd.Series(dtype=str)).dropna()}
    width = widths.pop() if len(widths) == 1 else "raw"
    if not drawable:
        return sec
    fig = plot_gate_shapes(drawable, taus, width=width, clip_eps=clip.eps if clip else None)
    sec.figures.append(Figure("fig_gate_shapes.png", png(fig),
                              "Gate value f(r) (top), gradient weight w(r) = f'(r) (middle) and w on a log scale "
                              "(bottom), for A > 0 (smooth gates at τ_pos). Dashed grey: r itself (no gate)."))
    return sec
