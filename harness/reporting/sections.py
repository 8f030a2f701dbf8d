"""The report's sections, one function each: ``section(data, record) -> Section``, where ``data`` is the experiment
(:class:`harness.reporting.data.ExperimentData`) and ``record`` the report's JSON, which each section adds its
numbers to at full precision."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import keys as K
from harness.gates import STUDENT, get_gate, student_gate
from harness.reporting.comparisons import adjust, compare, verdict_family
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import forest_figure, gate_color, log_x, plot_gate_shapes, png, pyplot
from harness.reporting.render import Figure, Section, Table
from harness.tracking import mask_url

MAX_PAIRED_ROWS = 30
MAX_GROUPS_PER_GATE_IN_CURVES = 3


def overview(data: ExperimentData, record: dict[str, Any]) -> Section:
    """How many runs, cells, configurations, seeds and benchmarks the experiment holds, and what failed."""
    d = data
    runs = d.runs
    sec = Section("Overview")
    cell_runs = runs[runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    status = cell_runs["status"].value_counts().to_dict() if not cell_runs.empty else {}
    n_parents = int(runs[f"tags.{K.TAG_SWEEP}"].notna().sum())
    n_cells = len(d.cells)
    seeds = sorted({s for g in d.groups for s in g.seeds})
    sec.paragraphs.append(
        f"Experiment **{d.name}** at {mask_url(d.tracking_uri)}: {_n(len(cell_runs), 'cell run')} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}) under {_n(n_parents, 'sweep/tune run')}; "
        f"{_n(n_cells, 'finished cell')} "
        f"(latest FINISHED run per config hash) in {len(d.groups)} configurations; seeds: "
        f"{', '.join(seeds) or '-'}; benchmarks: {', '.join(d.benchmarks) or 'none (no evaluation logged)'}.")
    if not d.groups:
        sec.notes.append("No FINISHED cell run in this experiment: nothing to compare yet.")
    failed = runs[(runs["status"] == "FAILED") & runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    if not failed.empty:
        rows = [[str(r.get(f"tags.{K.TAG_RUN_NAME}", "")), str(r["run_id"])[:8],
                 str(r.get(f"tags.{K.TAG_FAILURE_REASON}", ""))[:160]] for _, r in failed.iterrows()]
        sec.tables.append(Table(["run", "id", "failure reason"], rows, caption="FAILED cell runs"))
    warned = d.cells[d.cells[f"tags.{K.TAG_WARNING}"].notna()] if f"tags.{K.TAG_WARNING}" in d.cells else d.cells[:0]
    if not warned.empty:
        rows = [[str(r.get(f"tags.{K.TAG_RUN_NAME}", "")), str(r["run_id"])[:8], str(r[f"tags.{K.TAG_WARNING}"])]
                for _, r in warned.iterrows()]
        sec.tables.append(Table(["run", "id", "warning"], rows, caption="Warnings: what these runs' numbers mean "
                                "(a flat curve from a run that had nothing to learn from is not stability)"))
        record["warnings"] = {r[0]: r[2] for r in rows}
    pruned = runs[(runs["status"] == "KILLED") & runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    if not pruned.empty:
        sec.paragraphs.append(f"{_n(len(pruned), 'run')} stopped early (KILLED: pruned Optuna trials) and left "
                              "out of the tables; the pruner's view of them is in the Optuna section.")
    record["runs"] = {"cell_runs": len(cell_runs), "status": status, "parent_runs": n_parents,
                      "cells": n_cells, "groups": len(d.groups)}
    return sec


def verdict(data: ExperimentData, record: dict[str, Any]) -> Section:
    """One sentence per benchmark: the best configuration, and which of its differences to the best configuration
    of every other gate survive Holm's correction over the whole family (paired by seed and problem, seed and
    problem variance in the intervals), then what the data cannot decide."""
    sec = Section("Verdict")
    record["verdict"] = []
    record["comparisons"] = []
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
    family = verdict_family(data)
    record["comparisons"] = family
    for b in data.benchmarks:
        win = data.best(b)
        if win is None:
            continue
        wa = data.acc[(win.key, b)]
        rows = [r for r in family if r["benchmark"] == b]
        entry: dict[str, Any] = {"benchmark": b, "winner": win.label, "winner_gate": win.gate, **_ci(wa),
                                 "n_seeds": wa["n_seeds"]}
        runner = data.best(b, [g for g in data.trained if g.gate != win.gate])
        tie = runner is not None and data.acc[(runner.key, b)]["acc"] == wa["acc"]
        # equal accuracies (e.g. every configuration at 0 in a smoke run): no configuration is "best"
        if tie:
            text = (f"**{b}**: **{win.label}** and **{runner.label}** tie at the top ({_fmt_ci(wa)}, "
                    f"{_n(wa['n_seeds'], 'seed')})")
        else:
            text = f"**{b}**: best is **{win.label}** ({_fmt_ci(wa)}, {_n(wa['n_seeds'], 'seed')})"
        if runner is not None:
            ra = data.acc[(runner.key, b)]
            entry.update(runner_up=runner.label, runner_up_gate=runner.gate, runner_up_acc=ra["acc"],
                         runner_up_ci_low=ra["ci_low"], runner_up_ci_high=ra["ci_high"],
                         separated=wa["ci_low"] > ra["ci_high"])
        if not rows:
            text += ("; no other gate has per-sample records to compare with." if runner is not None else
                     "; no other gate was evaluated, so nothing to separate it from.")
        else:
            ahead = [r for r in rows if r["survives"]]
            tied = [r for r in rows if not r["survives"]]
            m = rows[0]["family_size"]
            text += f". Paired by seed and problem, Holm-corrected over the {_n(m, 'comparison')} of this verdict: "
            if ahead:
                text += "it is ahead of " + "; ".join(
                    f"{r['b']} by {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (adjusted p = "
                    f"{r['p_holm']:.3g})" for r in ahead)
                text += "; " if tied else "."
            if tied:
                text += ("the data cannot tell it from " if ahead else "no difference survives: the data cannot "
                         "tell it from ") + ", ".join(
                    f"{r['b']} ({r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], adjusted p = "
                    f"{r['p_holm']:.2g})" for r in tied) + "."
            entry["survive"] = [r["b"] for r in ahead]
            entry["undecided"] = [r["b"] for r in tied]
            if not all(r["seed_variance_included"] for r in rows):
                text += " One seed per configuration: run-to-run (seed) variance is not in these intervals."
            mdes = [r["mde"] for r in rows if math.isfinite(r["mde"])]
            if mdes and max(mdes) == 0:
                text += " Every paired difference is exactly 0 (identical scores): there is no variance to judge by."
            elif mdes:
                text += (f" With these seeds and problems the smallest difference detectable at 80% power is "
                         f"{min(mdes):.3f}–{max(mdes):.3f}.")
        record["verdict"].append(entry)
        sec.paragraphs.append(text)
    return sec


def gate_shapes(data: ExperimentData, record: dict[str, Any]) -> Section:
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
    for spec in gates:
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


def training_curves(data: ExperimentData, record: dict[str, Any]) -> Section:
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
              "gated": "gated fraction (last update)\nsmooth: w < 0.5; clip: clipped",
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
                     "gated": K.train_key(K.CLIP_FRAC if g.gate == "clip" else K.FRAC_W_LT_HALF, k)}
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
                              "averaged over each prompt's tokens, then over prompts; clip: 1 − clip fraction)."
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


def accuracy_table(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Accuracy with its 95% CI per configuration and benchmark; the best per benchmark marked."""
    sec = Section("(c) Accuracy by gate, τ and benchmark")
    if not data.acc:
        sec.notes.append("No evaluation metrics (eval/<benchmark>/acc) in this experiment: no accuracy table. "
                         "Runs with eval.enabled=false (e.g. tuning on the training-reward proxy) have none.")
        record["accuracy"] = []
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
            rows.append([g.gate, _tau_text(g), b, f"{a['acc']:.3f}", f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                         str(a["n_seeds"]), "—" if "iqm" not in a else f"{a['iqm']:.3f}",
                         _problems_text(a), "best" if is_best else ""])
            records.append({**a, "best": is_best})
    sec.tables.append(Table(["gate", "τ_pos / τ_neg (clip: ε)", "benchmark", "accuracy", "95% CI", "seeds",
                             "IQM over seeds", "problems", ""], rows, highlight,
                            caption="Accuracy = mean correctness over the k samples of each problem, averaged "
                                    "over problems and seeds (eval/<benchmark>/acc). Best configuration per "
                                    "benchmark marked; IQM (the mean of the middle half of the seeds) from 4 seeds."))
    multi = any(r["n_seeds"] > 1 for r in records)
    sec.paragraphs.append(
        "95% CI: with one seed, the evaluator's bootstrap over problems exactly as logged "
        "(eval/<benchmark>/acc_ci_low / acc_ci_high)"
        + ("; with several seeds, the two-stage interval of the seeds × problems accuracies (reports/README.md): "
           "both which training runs and which problems were drawn are in it." if multi else "."))
    if not multi:
        sec.notes.append("One seed per cell: the CIs cover which problems were drawn, not run-to-run variance.")
    record["accuracy"] = records
    return sec


def paired(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Each configuration against a sigmoid one, paired by seed and problem (the two-stage interval), with
    Holm's correction over the comparisons of this table."""
    sec = Section("(d) Each gate against the sigmoid baseline, paired by seed and problem")
    record["paired"] = []
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
                    why = ("clip has no τ: best sigmoid cell" if not g.smooth
                           else "τ moves: best sigmoid cell" if not g.fixed_tau
                           else "no sigmoid at this τ: best sigmoid cell")
                    pairs.append((g, best, b, why))
    if len(pairs) > MAX_PAIRED_ROWS:
        keep = []
        for b in data.benchmarks:
            for gate in dict.fromkeys(g.gate for g in others):
                cand = [p for p in pairs if p[2] == b and p[0].gate == gate]
                if cand:
                    keep.append(max(cand, key=lambda p: data.acc[(p[0].key, b)]["acc"]))
        sec.notes.append(f"{len(pairs)} comparisons; shown: the best cell of each gate per benchmark.")
        pairs = keep
    records, missing = [], []
    for g, s, b, why in pairs:
        c = compare(data, g, s, b)
        if c is None:
            missing.append(f"{g.label} vs {s.label} on {b}")
            continue
        records.append({**c, "gate": g.gate, "cell": g.label, "sigmoid_cell": s.label, "why": why,
                        "run_ids": g.run_ids, "sigmoid_run_ids": s.run_ids})
    if missing:
        sec.notes.append("No per-sample artifacts (eval/samples/<benchmark>.jsonl) for: " + "; ".join(missing))
    if not records:
        return sec
    adjust(records)
    rows = []
    for r in records:
        verdict = "no" if not r["survives"] else "yes: better" if r["diff"] > 0 else "yes: worse"
        r["verdict"] = verdict
        rows.append([r["benchmark"], r["cell"], r["sigmoid_cell"], r["why"], f"{r['diff']:+.3f}",
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_holm']:.3g}", f"{r['poi']:.2f}",
                     f"{len(r['seeds'])} × {r['n']}", verdict])
    better = {i for i, r in enumerate(records) if r["verdict"] == "yes: better"}
    worse = {i for i, r in enumerate(records) if r["verdict"] == "yes: worse"}
    sec.tables.append(Table(["benchmark", "cell", "vs sigmoid cell", "sigmoid chosen by", "Δ accuracy", "95% CI",
                             "Holm p", "P(cell > sigmoid)", "seeds × problems", "survives Holm"], rows, better,
                            caption="Δ = mean over paired seeds and problems of (cell − sigmoid cell) accuracy. "
                                    "Green: better than sigmoid after Holm's correction over this table; red: "
                                    "worse. P(cell > sigmoid) is over seed pairs.", worse=worse))
    sec.paragraphs.append(
        "Two-stage interval (reports/README.md): seed s of the cell is paired with seed s of the sigmoid cell, "
        "problem p with problem p, and the seed-to-seed and problem-to-problem variance of the differences are both "
        "in the interval. The sigmoid partner is the sigmoid cell with the same τ_pos/τ_neg when there is one, else "
        "the best sigmoid cell on that benchmark (column 4 says which).")
    sec.figures.append(Figure("fig_paired.png", png(forest_figure(records)),
                              "Accuracy difference to the sigmoid cell with its paired two-stage 95% interval; "
                              "right of the line: better than sigmoid."))
    if not all(r["seed_variance_included"] for r in records):
        sec.notes.append("One seed per cell in some comparisons: there the interval covers problem sampling only.")
    record["paired"] = records
    return sec



def tau_sensitivity(data: ExperimentData, record: dict[str, Any]) -> Section:
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
        for g in (x for x in data.groups if x.gate == "clip" or x.is_baseline):
            y = _y(data, g, b, use_eval)
            if y is not None:
                ax.axhspan(y[1], y[2], color="0.2", alpha=0.07, lw=0)
                ax.axhline(y[0], color="black" if g.gate == "clip" else "0.45", lw=1.3,
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
    record["tau_sensitivity"] = records
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


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _tau_text(g: Group) -> str:
    if not g.smooth:
        return f"ε {g.eps[0]:g}/{g.eps[1]:g}" if g.eps else "—"
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


def _ci(a: Mapping[str, Any]) -> dict[str, float]:
    return {"acc": a["acc"], "ci_low": a["ci_low"], "ci_high": a["ci_high"]}


def _fmt_ci(a: Mapping[str, Any]) -> str:
    return f"{a['acc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


# ------------------------------------------------------------------------------------------- against the paper

PAPER_TABLE = Path(__file__).resolve().parent / "reference" / "paper_table1.json"
PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
PAPER_TAUS = (10.0, 12.0)


def paper_reference() -> dict[str, Any]:
    """Table 1 of arXiv 2602.19345 v2 as kept in the repository (with its source)."""
    return json.loads(PAPER_TABLE.read_text(encoding="utf-8"))


def is_paper_experiment(data: ExperimentData) -> bool:
    """The paper's sweep: a parent run of sweep ``paper`` / ``paper_temperature``, or cells of the paper's model."""
    sweeps = {str(v) for v in data.runs.get(f"tags.{K.TAG_SWEEP}", pd.Series(dtype=str)).dropna()}
    models = {str(v) for v in data.cells.get(f"tags.{K.TAG_MODEL}", pd.Series(dtype=str)).dropna()}
    return bool(sweeps & {"paper", "paper_temperature"}) or PAPER_MODEL in models


def against_the_paper(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Our accuracy beside Table 1 of the paper, row by row (the paper's gates at (10, 12), clip at ε = 0.2)."""
    sec = Section("(g) Against the paper (arXiv 2602.19345 v2, Table 1)")
    ref = paper_reference()
    record["against_the_paper"] = []
    cols = [c for c in ref["columns"] if c in data.benchmarks]
    if not cols:
        sec.notes.append("None of the paper's benchmarks (GSM8K, MATH500, pooled AIME24 + AIME25) was evaluated here.")
        return sec
    models = sorted({str(v) for v in data.cells.get(f"tags.{K.TAG_MODEL}", pd.Series(dtype=str)).dropna()})
    if PAPER_MODEL not in models:
        sec.notes.append(f"This experiment trained {', '.join(models) or 'an unknown model'}, not the paper's "
                         f"{PAPER_MODEL}: the rows below are not comparable numbers, only the same layout.")
    rows, out = [], []
    for r in ref["rows"]:
        ours = _paper_partner(data, r["gate"])
        row = [r["label"], "—" if ours is None else ours.label]
        entry: dict[str, Any] = {"paper_row": r["label"], "ours": None if ours is None else ours.label}
        for c in cols:
            a = None if ours is None else data.acc.get((ours.key, c))
            row += [f"{100 * a['acc']:.1f} [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}]" if a else "—",
                    f"{r[c]:.1f}"]
            entry[c] = {"paper": r[c], **({} if a is None else {"ours": a["acc"], "ci_low": a["ci_low"],
                                                              "ci_high": a["ci_high"], "n_seeds": a["n_seeds"]})}
            if a is not None:
                entry[c]["paper_inside_ci"] = a["ci_low"] <= r[c] / 100 <= a["ci_high"]
        rows.append(row)
        out.append(entry)
    header = ["paper row", "our configuration"] + [h for c in cols for h in (f"{c} ours (95% CI)", f"{c} paper")]
    sec.tables.append(Table(header, rows, caption="Accuracy in %. Ours: mean over seeds with the 95% interval of "
                                                  "table (c); paper: one seed, no interval. " + ref["notes"]))
    sec.paragraphs.append(f"Source of the paper's numbers: {ref['source']}. Our partner of a paper row is the "
                          "configuration of the same gate at (τ_pos, τ_neg) = (10, 12) (clip at ε = 0.2), else that "
                          "gate's best configuration; the base model is the sweep's starting checkpoint.")
    record["against_the_paper"] = out
    return sec


def _paper_partner(data: ExperimentData, gate: str) -> Group | None:
    if gate == "base":
        return data.baseline
    same = [g for g in data.trained if g.gate == gate]
    at_paper = [g for g in same if (g.tau_pos, g.tau_neg) == PAPER_TAUS or (gate == "clip" and g.eps == (0.2, 0.2))]
    pool = at_paper or same
    return max(pool, key=data.score) if pool else None


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


# ------------------------------------------------------------------------------------------------------- power


def power_rows(data: ExperimentData, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict's comparisons (computed by :func:`verdict`, else here)."""
    return record.get("comparisons") or verdict_family(data)


def power_section(data: ExperimentData, record: dict[str, Any]) -> Section:
    """For each comparison of the verdict: the smallest difference detectable at 80% power with the measured seed
    and problem variances, and how many seeds a 2-point difference would need."""
    sec = Section("(i) Power: what these seeds and problems can detect")
    rows = power_rows(data, record)
    record["power"] = [{k: r[k] for k in ("benchmark", "a", "b", "n", "seeds", "se", "mde", "effect",
                                          "seeds_needed", "power_reachable", "power_note")} for r in rows]
    if not rows:
        sec.notes.append("No paired comparison (needs evaluated configurations of two gates with per-sample records).")
        return sec
    sec.tables.append(Table(
        ["benchmark", "comparison", "seeds × problems", "SE of Δ", "detectable at 80% power", "seeds for Δ = 0.02"],
        [[r["benchmark"], f"{r['a']} − {r['b']}", f"{len(r['seeds'])} × {r['n']}", f"{r['se']:.4f}",
          f"{r['mde']:.3f}", power_text(r)] for r in rows],
        caption="Two-sided test at α = 0.05 (before the multiple-comparison correction, which raises the bar). "
                "Seeds needed: the smallest seed count at these problems whose predicted standard error detects 2 "
                "accuracy points with 80% power, from the measured variance components."))
    sec.paragraphs.append(power_sentence(rows))
    return sec


def power_text(row: Mapping[str, Any]) -> str:
    if row["seeds_needed"] is not None:
        return str(row["seeds_needed"])
    return f"— ({row['power_note']})" if row.get("power_note") else "—"


def power_sentence(rows: list[dict[str, Any]]) -> str:
    """The power statement in one sentence (``harness report --power`` prints it)."""
    mdes = [r["mde"] for r in rows if math.isfinite(r["mde"])]
    needs = [r["seeds_needed"] for r in rows if r["seeds_needed"] is not None]
    text = (f"With these seeds and problems, differences smaller than {min(mdes):.3f}–{max(mdes):.3f} accuracy are "
            "below what the comparisons can detect at 80% power") if mdes else "No detectable difference estimated"
    if needs:
        text += f"; telling 2 points apart would need {min(needs)}–{max(needs)} seeds per configuration"
    unreachable = [r for r in rows if r["power_reachable"] is False]
    if unreachable:
        text += f"; for {len(unreachable)} comparison(s) more seeds alone would not do ({unreachable[0]['power_note']})"
    return text + "."
