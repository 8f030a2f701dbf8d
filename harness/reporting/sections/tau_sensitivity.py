"""Report section (e): accuracy (or the final training reward) against τ_pos per gate, fixed-τ configurations as
points, clip, the base model and moving-τ configurations as lines."""

from __future__ import annotations

import numpy as np

from harness import keys as K
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import gate_color, log_x, png, pyplot
from harness.reporting.render import Figure, Section


def tau_sensitivity(data: ExperimentData) -> Section:
    """Accuracy (or the final training reward) against τ_pos per gate, clip as a reference line."""
    sec = Section("(e) τ sensitivity")
    smooth = [g for g in data.groups if g.fixed_tau and g.tau_pos is not None]
    moving = [g for g in data.groups if g.smooth and not g.fixed_tau]
    if not smooth:
        sec.notes.append("No smooth-gate cells with a fixed temperature: nothing to plot.")
        return sec
    use_eval = bool(data.acc)
    benches = data.benchmarks if use_eval else ["train/reward (final)"]
    if not use_eval:
        sec.notes.append("No evaluation metrics: the y axis is the final training reward (the tuning proxy), "
                         "mean over seeds with min–max bars when there are several.")
    taus_neg_vary = any(len({g.tau_neg for g in smooth if g.tau_pos == t}) > 1 for t in {g.tau_pos for g in smooth})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(benches), figsize=(max(7.0, 5.6 * len(benches)), 4.6), squeeze=False)
    gates = list(dict.fromkeys(g.gate for g in smooth))
    records = []
    for ax, b in zip(axes[0], benches, strict=True):
        for gi, gate in enumerate(gates):
            pts = []
            for g in (x for x in smooth if x.gate == gate):
                y = _y(data, g, b, use_eval)
                if y is not None:
                    pts.append((g.tau_pos, *y, g))
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            # Nudge gates apart on the log axis so error bars at the same τ do not hide each other.
            shift = 1.0 + 0.025 * (gi - (len(gates) - 1) / 2)
            x = np.array([p[0] for p in pts]) * shift
            y = np.array([p[1] for p in pts])
            err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
            # Lines join a grid of a few τ; a tuning study's scattered τ only get markers (a line through
            # near-equal τ with noisy accuracies zigzags and suggests structure that is not there).
            ax.errorbar(x, y, yerr=err, fmt="o-" if len(pts) <= 5 else "o", color=gate_color(gate), capsize=3,
                        lw=1.5, ms=5, label=gate)
            records += [{"benchmark": b, "gate": gate, "tau_pos": p[0], "tau_neg": p[4].tau_neg, "y": p[1],
                         "low": p[2], "high": p[3]} for p in pts]
        for g in (x for x in data.groups if not x.smooth):
            y = _y(data, g, b, use_eval)
            if y is not None:
                ax.axhspan(y[1], y[2], color="0.2", alpha=0.07, lw=0)
                color = "black" if g.gate == "clip" else "0.45" if g.is_baseline else gate_color(g.gate)
                ax.axhline(y[0], color=color, lw=1.3,
                           ls="--" if g.gate == "clip" else ":", label=f"{g.label} (no τ)")
        for i, g in enumerate(moving):  # a schedule has no single τ: a line across, in its gate's colour
            y = _y(data, g, b, use_eval)
            if y is not None:
                ax.axhspan(y[1], y[2], color=gate_color(g.gate), alpha=0.06, lw=0)
                ax.axhline(y[0], color=gate_color(g.gate), lw=1.3, ls=["-.", (0, (5, 2, 1, 2)), ":"][i % 3],
                           label=f"{g.label} (τ moves)")
        log_x(ax, [g.tau_pos for g in smooth])
        ax.set_xlabel("τ_pos (log scale)" + ("; τ_neg varies at equal τ_pos" if taus_neg_vary else ""))
        ax.set_ylabel("accuracy (95% CI)" if use_eval else "final train reward")
        ax.set_title(b)
        ax.grid(alpha=0.3)
    # One legend under the panels: inside a panel it covers CIs that reach the top.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # as many entries per row as the figure's width holds (a label is up to ~2.6 inches), rows below the panels
    ncol = max(1, min(len(labels), int(fig.get_figwidth() // 2.6)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * -(-len(labels) // ncol) + 0.02, 1, 1))
    sec.figures.append(Figure("fig_tau.png", png(fig),
                              ("Accuracy against τ_pos per gate with 95% CIs (as in table c); clip as a dashed "
                               "line with its CI band. " if use_eval else "Final training reward against τ_pos. ")
                              + "Points of different gates at one τ are nudged apart slightly on the x axis."
                              + (" Configurations whose τ moves during training (a schedule or the EUR "
                                 "controller) are horizontal lines with their CI band." if moving else "")))
    sec.record["tau_sensitivity"] = records
    return sec


def _y(data: ExperimentData, g: Group, bench: str, use_eval: bool) -> tuple[float, float, float] | None:
    if use_eval:
        a = data.acc.get((g.key, bench))
        return None if a is None else (a["acc"], a["ci_low"], a["ci_high"])
    r = data.metric_column(g.runs, K.train_key(K.REWARD))
    if r is None or not r.notna().any():
        return None
    r = r.dropna().astype(float)
    return float(r.mean()), float(r.min()), float(r.max())
