"""Figures and reports. This module draws; it computes nothing that the gates or metrics own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from harness.gates import ClipGate, effective_tau, get_gate

GATE_COLORS = {"sigmoid": "#1f77b4", "erf": "#2ca02c", "arctan": "#ff7f0e", "softsign": "#9467bd", "clip": "#d62728"}


def plot_gate_shapes(gates: Sequence[str], taus: Sequence[float], out: str | Path, *, width: str = "raw",
                     r_max: float = 3.0):
    """Draw f(r) (top row) and w(r) (bottom row) of every gate, one column per τ; save to ``out``.

    ``clip`` is drawn for A > 0 (solid) and A < 0 (dotted) since its gate differs by sign.
    Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = torch.linspace(0.0, r_max, 1201, dtype=torch.float64)
    fig, axes = plt.subplots(2, len(taus), figsize=(4.2 * len(taus), 6.4), squeeze=False, sharex=True)
    for j, tau in enumerate(taus):
        ax_f, ax_w = axes[0, j], axes[1, j]
        for i, spec in enumerate(gates):
            g = get_gate(spec)
            color = GATE_COLORS.get(spec, f"C{i}")
            if isinstance(g, ClipGate):
                for sign, style in ((1, "-"), (-1, ":")):
                    label = f"clip (A{'>' if sign > 0 else '<'}0)"
                    ax_f.plot(r, g.value(r, sign=sign), style, color=color, label=label, lw=1.6)
                    ax_w.plot(r, g.weight_x(r - 1.0, sign), style, color=color, label=label, lw=1.6)
                continue
            t = effective_tau(g, tau, width)
            ax_f.plot(r, g.value(r, t), color=color, label=spec, lw=1.6)
            ax_w.plot(r, g.weight(r, torch.ones_like(r), torch.full_like(r, t)), color=color, label=spec, lw=1.6)
        ax_f.plot(r, r, color="0.6", lw=0.8, ls="--", label="r (no gate)")
        ax_f.set_title(f"τ = {tau:g}" + (" (sigmoid-equivalent width)" if width == "hwhm" else ""))
        ax_f.set_ylabel("gate value f(r)")
        ax_f.set_ylim(0.0, min(r_max, 3.0))
        ax_w.set_ylabel("gradient weight w(r) = f'(r)")
        ax_w.set_xlabel("importance ratio r")
        ax_w.set_ylim(-0.03, 1.05)
        for ax in (ax_f, ax_w):
            ax.axvline(1.0, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig
