"""Report section (b): the training curves, reward, accuracy reward, entropy and the last pass's ratio and gate
statistics per step (and τ_pos when it moves), mean over seeds with a min–max band."""

from __future__ import annotations

import math

import pandas as pd

from harness import keys as K
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import gate_color, png, pyplot
from harness.reporting.render import Figure, Section

MAX_GROUPS_PER_GATE_IN_CURVES = 3


def training_curves(data: ExperimentData) -> Section:
    """Reward, accuracy reward, entropy and the last pass's ratio and gate statistics per step, mean over seeds."""
    sec = Section("(b) Training curves")
    groups = _curve_groups(data, sec)
    if not groups:
        sec.notes.append("No finished cells with training metrics.")
        return sec
    # EUR and entropy side by side (the paper's figures 4-5): higher entropy goes with lower EUR.
    # A moving τ (gate.tau_schedule) gets its own panel next to EUR, the quantity the EUR controller holds.
    moving = any(g.smooth and not g.fixed_tau for g in groups)
    keys = ["reward", "reward_accuracy", "ratio_std", "eur", "entropy", "gated"]
    if moving:
        keys = ["reward", "reward_accuracy", "ratio_std", "tau_pos", "eur", "entropy", "gated"]
    titles = {"reward": "reward (format + accuracy)", "reward_accuracy": "reward accuracy",
              "entropy": "token entropy", "ratio_std": "std of ratio r (last update)",
              "eur": "effective update ratio, EUR (last update)",
              "gated": "gated fraction (last update)\nsmooth: w < 0.5; clip, methods: not kept",
              "tau_pos": "τ_pos per step (log scale)"}
    histories: dict[str, dict[str, pd.Series]] = {}
    last_k: dict[str, int] = {}
    for g in groups:
        for _, row in g.runs.iterrows():
            k = data.last_pass(row)
            last_k[row["run_id"]] = k
            names = {"reward": K.train_key(K.REWARD), "reward_accuracy": K.train_key(K.REWARD_ACCURACY),
                     "entropy": K.train_key(K.ENTROPY), "ratio_std": K.train_key(K.RATIO_STD, k),
                     "eur": K.train_key(K.EUR, k),
                     "gated": K.train_key(K.CLIP_FRAC if not g.smooth else K.FRAC_W_LT_HALF, k)}
            if moving and g.smooth:  # clip has no temperature to draw
                names["tau_pos"] = K.train_key(K.TAU_POS)
            histories[row["run_id"]] = {key: data.history(row["run_id"], name) for key, name in names.items()}
    n_steps = max((len(s) for h in histories.values() for s in h.values()), default=0)
    # Every cell sees the same prompts at a given step, so raw curves wiggle together with batch difficulty.
    window = max(1, round(n_steps / 10))
    multi_seed = any(len(g.runs) > 1 for g in groups)

    plt = pyplot()
    ncols = 4 if moving else 3
    fig, axes = plt.subplots(2, ncols, figsize=(5.2 * ncols, 8.6), squeeze=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    styles = ["-", "--", ":", "-."]
    seen_tau: dict[str, int] = {}
    # clip first, so where curves coincide (early steps are often identical) the smooth gates stay visible
    for g in sorted(groups, key=lambda g: g.gate != "clip"):
        ls = styles[seen_tau.setdefault(g.gate, 0) % len(styles)]
        seen_tau[g.gate] += 1
        color = gate_color(g.gate)
        for ax, key in zip(axes.flat, keys, strict=False):
            series = [histories[r][key] for r in g.run_ids if key in histories[r] and not histories[r][key].empty]
            if not series:
                continue
            frame = pd.concat(series, axis=1).sort_index()
            # τ is a control signal, not a noisy measurement: drawn as it was, unsmoothed
            smooth = frame if key == "tau_pos" else frame.rolling(window, min_periods=1).mean()
            mean = smooth.mean(axis=1)
            ax.plot(mean.index, mean.to_numpy(), ls, color=color, lw=1.7, zorder=3,
                    label=f"{g.label} ({len(series)} seed{'s' if len(series) > 1 else ''})")
            if len(series) > 1:
                # Light bands (clip's in grey, not black): overlapping bands of several gates stay readable.
                ax.fill_between(mean.index, smooth.min(axis=1).to_numpy(), smooth.max(axis=1).to_numpy(),
                                color="0.5" if g.gate == "clip" else color, alpha=0.09, lw=0, zorder=1)
    for ax, key in zip(axes.flat, keys, strict=False):
        if key == "tau_pos":
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(titles[key], fontsize=10.5)
        ax.set_xlabel("training step (one rollout batch)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=9, frameon=False)
    n_rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.035 * n_rows + 0.01, 1, 1))
    band = "band: min–max over seeds" if multi_seed else "one seed per configuration, so no seed band"
    sec.figures.append(Figure("fig_training.png", png(fig),
                              f"Per-step training metrics, moving average over {window} step(s); line: mean over "
                              f"seeds, {band}. Ratio statistics are from the last optimizer update of each "
                              f"rollout batch (it{max(last_k.values(), default=1)}), where r ≠ 1. EUR: the mean "
                              "share of a token's full update it contributes (arXiv 2602.19345 eq. 12: f'(r) "
                              "averaged over each prompt's tokens, then over prompts; clip: one minus each prompt's "
                              "clip fraction, averaged over prompts)."
                              + (" τ_pos: the temperature each step ran at (not smoothed); τ_neg keeps its ratio "
                                 "to τ_pos unless the schedule sets it." if moving else "")))
    if not multi_seed:
        sec.notes.append("One seed per configuration: no seed bands.")
    return sec


def _curve_groups(data: ExperimentData, sec: Section) -> list[Group]:
    by_gate: dict[str, list[Group]] = {}
    for g in data.trained:
        by_gate.setdefault(g.gate, []).append(g)
    out = []
    for gate, gs in by_gate.items():
        if len(gs) > MAX_GROUPS_PER_GATE_IN_CURVES:
            # the best fixed-τ configuration, and every moving-τ one (their τ and EUR paths are the point)
            fixed, moving = [g for g in gs if g.fixed_tau], [g for g in gs if not g.fixed_tau]
            kept = ([max(fixed, key=data.score)] if fixed else []) + moving
            kept = kept[:MAX_GROUPS_PER_GATE_IN_CURVES]
            drawn = f"only the best ({kept[0].label})" if len(kept) == 1 else ", ".join(g.label for g in kept)
            sec.notes.append(f"{gate}: {len(gs)} configurations; drawn: {drawn}.")
            gs = kept
        out += gs
    return out
