"""Figures and reports. This module draws; it computes nothing that the gates or metrics own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from harness.gates import ClipGate, effective_tau, get_gate

# Okabe-Ito colour-blind-safe palette; clip in black so it never competes with a smooth gate.
GATE_COLORS = {"sigmoid": "#0072B2", "erf": "#E69F00", "arctan": "#009E73", "softsign": "#CC79A7", "clip": "#000000"}


def gate_color(name: str, i: int = 0) -> str:
    return GATE_COLORS.get(name, f"C{i}")


def plot_gate_shapes(gates: Sequence[str], taus: Sequence[float], out: str | Path | None = None, *,
                     width: str = "raw", r_max: float | None = None):
    """Draw, one column per τ: f(r) (top), w(r) (middle) and w(r) on a log scale (bottom, where the
    exponential, Gaussian and polynomial tails separate). The r-range follows τ (±4 sigmoid
    half-widths, at least the clip range). ``clip`` is drawn first, thin, for A > 0 (solid) and A < 0
    (dotted), since its gate differs by sign. Saves to ``out`` when given; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.gates import SIGMOID_HWHM

    order = sorted(range(len(gates)), key=lambda i: gates[i] != "clip")  # clip first: underneath
    fig, axes = plt.subplots(3, len(taus), figsize=(4.4 * len(taus), 9.0), squeeze=False,
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
            spec = gates[i]
            g = get_gate(spec)
            color = gate_color(spec, i)
            if isinstance(g, ClipGate):
                for sign, style in ((1, "-"), (-1, ":")):
                    label = f"clip ε={g.eps_low:g}/{g.eps_high:g} (A{'>' if sign > 0 else '<'}0)"
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
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)
    fig.suptitle("Gate value f(r) and gradient weight w(r) = f'(r), for A > 0 (smooth gates use τ_pos)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
    return fig
