"""Figures of the report and of ``harness gates plot``: gate shapes, forest plots of paired differences, Optuna study
views, and the shared plotting helpers (one colour per gate everywhere)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import keys as K
from harness.gates import SIGMOID_HWHM, ClipGate, Gate, effective_tau, get_gate

# Okabe-Ito colour-blind-safe palette; clip in black so it never competes with a smooth gate.
GATE_COLORS = {"sigmoid": "#0072B2", "erf": "#E69F00", "arctan": "#009E73", "softsign": "#CC79A7",
               "softsign_abs": "#D55E00", "clip": "#000000",
               # the ratio-control methods: Tol's muted palette, apart from the gates' colours
               "dual_clip": "#555555", "cispo": "#332288", "cispo_two_sided": "#6699CC", "gmpo": "#DDCC77",
               "gppo": "#882255", "dppo_tv": "#44AA99", "dppo_kl": "#117733", "gpg": "#999933", "dro": "#AA4499",
               "kl_cov": "#661100", "clip_cov": "#88CCEE", "vespo": "#CC6677"}


def gate_color(name: str, i: int = 0) -> str:
    """The gate's colour in every figure (matplotlib's cycle for gates outside the palette)."""
    return GATE_COLORS.get(name, f"C{i}")


def plot_gate_shapes(gates: Sequence[str | Gate], taus: Sequence[float], out: str | Path | None = None, *,
                     width: str = "raw", r_max: float | None = None, clip_eps: tuple[float, float] | None = None):
    """Draw, one column per τ: f(r) (top), w(r) (middle) and w(r) on a log scale (bottom, where the
    exponential, Gaussian and polynomial tails separate). The r-range follows τ (±4 sigmoid
    half-widths, at least the clip range). ``clip`` is drawn first, thin, for A > 0 (solid) and A < 0
    (dotted), since its gate differs by sign; ``clip_eps`` = (ε_low, ε_high) it was run with (default 0.2/0.2).
    A gate is a name or a gate object (e.g. ``student_gate(4.0)``). Saves to ``out`` when given; returns the
    figure."""
    plt = pyplot()
    order = sorted(range(len(gates)), key=lambda i: gates[i] != "clip")  # clip first: underneath
    # one τ (the default sweep) still gets a figure wide enough for the title and the legend
    fig, axes = plt.subplots(3, len(taus), figsize=(max(4.4 * len(taus), 6.4), 9.0), squeeze=False,
                             gridspec_kw={"height_ratios": [1.1, 1.0, 0.9]})
    for j, tau in enumerate(taus):
        half = 4.0 * SIGMOID_HWHM / tau
        lo, hi = max(0.0, min(0.75, 1.0 - half)), max(1.3, 1.0 + half)
        if r_max is not None:
            hi = min(hi, r_max)
        r = torch.linspace(lo, hi, 1601, dtype=torch.float64)
        ax_f, ax_w, ax_log = axes[:, j]
        f_values = []
        for i in order:
            g = get_gate(gates[i], **({} if clip_eps is None else {"eps_low": clip_eps[0], "eps_high": clip_eps[1]}))
            spec = gates[i] if isinstance(gates[i], str) else g.name
            color = gate_color(spec, i)
            if isinstance(g, ClipGate):
                for sign, style in ((1, "-"), (-1, ":")):
                    label = f"{g.name} ε={g.eps_low:g}/{g.eps_high:g} (A{'>' if sign > 0 else '<'}0)"
                    w = g.weight_x(r - 1.0, sign)
                    ax_f.plot(r, g.value(r, sign=sign), style, color=color, label=label, lw=1.0, alpha=0.55)
                    ax_w.plot(r, w, style, color=color, label=label, lw=1.0, alpha=0.55)
                    ax_log.plot(r, w.clamp(min=1e-12), style, color=color, lw=1.0, alpha=0.55)
                continue
            t = effective_tau(g, tau, width)
            f = g.value(r, t)
            w = g.weight(r, torch.ones_like(r), torch.full_like(r, t))
            f_values.append(f)
            ax_f.plot(r, f, color=color, label=spec, lw=1.8)
            ax_w.plot(r, w, color=color, label=spec, lw=1.8)
            ax_log.plot(r, w.clamp(min=1e-12), color=color, label=spec, lw=1.8)
        ax_f.plot(r, r, color="0.55", lw=0.8, ls="--", label="r (no gate)")
        if f_values:
            stacked = torch.stack(f_values)
            pad = 0.05 * float(stacked.max() - stacked.min())
            ax_f.set_ylim(float(stacked.min()) - pad, float(stacked.max()) + pad)
        mode = "sigmoid-equivalent width" if width == "hwhm" else "raw τ"
        ax_f.set_title(f"τ = {tau:g} ({mode})")
        ax_f.set_ylabel("gate value f(r)")
        ax_w.set_ylabel("gradient weight w(r)")
        ax_w.set_ylim(-0.03, 1.05)
        ax_log.set_yscale("log")
        ax_log.set_ylim(1e-6, 1.5)
        ax_log.set_ylabel("w(r), log scale (tails)")
        ax_log.set_xlabel("importance ratio r = π/π_old")
        for ax in (ax_f, ax_w, ax_log):
            ax.set_xlim(lo, hi)
            ax.axvline(1.0, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    h_f, l_f = axes[0, 0].get_legend_handles_labels()
    handles += [h for h, lab in zip(h_f, l_f, strict=True) if lab == "r (no gate)"]
    labels += ["r (no gate)"] if "r (no gate)" in l_f else []
    # At most 4 entries per row (2 in a one-column figure): 7 in one row ran past the edges of a 2-column figure.
    ncol = max(1, min(len(labels), 4 if len(taus) > 1 else 2))
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    sep = ", " if len(taus) > 1 else "\n"
    fig.suptitle(f"Gate value f(r) and gradient weight w(r) = f'(r){sep}for A > 0 (smooth gates use τ_pos)")
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 0.97 if len(taus) > 1 else 0.95))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
    return fig


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    """A figure as PNG bytes (the figure is closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def log_x(ax: Any, values: Sequence[float]) -> None:
    """A log x axis with plain tick labels (1, 2, 5 — not 2×10⁰): at the values themselves when there are few."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    vals = sorted({float(v) for v in values if v is not None and v > 0})
    ax.xaxis.set_minor_formatter(NullFormatter())
    if 0 < len(vals) <= 6:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(vals, [f"{v:.3g}" for v in vals])
        if len(vals) == 1:
            ax.set_xlim(vals[0] / 1.5, vals[0] * 1.5)
    else:
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def forest_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """Paired differences with their CIs, one panel per benchmark (a forest plot)."""
    plt = pyplot()
    benches = list(dict.fromkeys(r["benchmark"] for r in records))
    per = max(len([r for r in records if r["benchmark"] == b]) for b in benches)
    fig, axes = plt.subplots(1, len(benches), figsize=(max(6.5, 5.2 * len(benches)), 1.2 + 0.45 * per),
                             squeeze=False)
    for ax, b in zip(axes[0], benches, strict=True):
        rs = [r for r in records if r["benchmark"] == b]
        for y, r in enumerate(rs):
            ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]], fmt="o",
                        color=gate_color(r["gate"]), capsize=4, lw=1.6)
        ax.set_yticks(range(len(rs)), [f"{r['cell']}\nvs {r['sigmoid_cell']}" for r in rs], fontsize=8.5)
        ax.axvline(0, color="0.4", lw=1)
        ax.invert_yaxis()
        ax.set_title(b)
        ax.set_xlabel("Δ accuracy vs sigmoid (paired)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def study_figure(study: Any, trials: Sequence[Any], complete: Sequence[Any], pruned: Sequence[Any],
                  objective: str) -> Any:
    """One Optuna study: objective by trial, against τ_pos, and the intermediate values the pruner saw."""
    plt = pyplot()
    color = gate_color(str(study.user_attrs.get(K.STUDY_GATE, "")))
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.6))
    maximize = study.direction.name == "MAXIMIZE"
    from matplotlib.ticker import MaxNLocator

    best_number = study.best_trial.number if complete else None
    tau = {t.number: t.user_attrs.get(K.TRIAL_TAU_POS, t.params.get(K.TRIAL_TAU_POS)) for t in trials}
    if complete:
        xs = [t.number for t in complete]
        ys = [t.value for t in complete]
        a1.plot(xs, ys, "o", color=color, label="COMPLETE")
        best = np.maximum.accumulate(ys) if maximize else np.minimum.accumulate(ys)
        a1.step(xs, best, where="post", color="0.3", lw=1.2, label="best so far")
        a2.plot([tau[t.number] for t in complete], ys, "o", color=color, label="COMPLETE")
        a2.plot([tau[best_number]], [study.best_value], "*", color="black", ms=13, label="best")
    for t in pruned:  # no objective value: marked on the x axes only
        a1.axvline(t.number, color="0.55", lw=1.0, ls="--")
        if tau[t.number] is not None:
            a2.plot([tau[t.number]], [0.0], marker="|", ms=16, mew=2, color="0.35",
                    transform=a2.get_xaxis_transform(), clip_on=False)
    if pruned:
        a1.plot([], [], color="0.55", ls="--", label="PRUNED (no objective)")
        a2.plot([], [], marker="|", ls="", ms=12, mew=2, color="0.35", label="PRUNED (τ)")
    a1.set_xlabel("trial")
    a1.set_ylabel(objective)
    a1.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.legend(fontsize=8.5)
    log_x(a2, [v for v in tau.values() if v is not None])
    a2.set_xlabel("τ_pos (log scale)")
    a2.set_ylabel(objective)
    a2.legend(fontsize=8.5)
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        vals = [t.intermediate_values[s] for s in steps]
        if t.state.name == "PRUNED":
            a3.plot(steps, vals, color="0.6", lw=1.0)
            a3.plot(steps[-1], vals[-1], "x", color="0.25", ms=8, mew=1.8)
        elif t.number == best_number:
            a3.plot(steps, vals, color="black", lw=2.0, label=f"best (trial {t.number})")
        else:
            a3.plot(steps, vals, color=color, lw=1.2, alpha=0.8)
    a3.plot([], [], color=color, lw=1.2, label="other COMPLETE/FAIL")
    if pruned:
        a3.plot([], [], color="0.6", marker="x", mec="0.25", label="PRUNED (× = stop)")
    a3.set_xlabel("training step (one rollout batch)")
    a3.set_ylabel("intermediate value (pruning metric, moving avg.)")
    a3.xaxis.set_major_locator(MaxNLocator(integer=True))
    a3.legend(fontsize=8.5)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    fig.suptitle(study.study_name)
    fig.tight_layout()
    return fig
