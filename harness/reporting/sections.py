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
from harness.gates import get_gate
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import forest_figure, gate_color, log_x, plot_gate_shapes, png, pyplot
from harness.reporting.render import Figure, Section, Table
from harness.stats import BOOT_SEED, N_BOOT, paired_bootstrap
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
    pruned = runs[(runs["status"] == "KILLED") & runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    if not pruned.empty:
        sec.paragraphs.append(f"{_n(len(pruned), 'run')} stopped early (KILLED: pruned Optuna trials) and left "
                              "out of the tables; the pruner's view of them is in the Optuna section.")
    record["runs"] = {"cell_runs": len(cell_runs), "status": status, "parent_runs": n_parents,
                      "cells": n_cells, "groups": len(d.groups)}
    return sec


def verdict(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Per benchmark: the best configuration, the runner-up of another gate, and whether the data tell them apart."""
    sec = Section("Verdict")
    out = []
    if not data.benchmarks:
        ranked = sorted(data.trained, key=data.score, reverse=True)
        if ranked and math.isfinite(data.score(ranked[0])):
            top = ranked[0]
            sec.paragraphs.append(
                f"No evaluation was logged, so there is no accuracy verdict. By the final training reward (a "
                f"noisy proxy of one batch) the top cell is **{top.label}** ({data.score(top):.3f}).")
        else:
            sec.paragraphs.append("No evaluation and no training metrics: no verdict.")
        record["verdict"] = []
        return sec
    for b in data.benchmarks:
        win = data.best(b)
        if win is None:
            continue
        wa = data.acc[(win.key, b)]
        others = [g for g in data.trained if g.gate != win.gate]
        run = data.best(b, others)
        entry: dict[str, Any] = {"benchmark": b, "winner": win.label, "winner_gate": win.gate, **_ci(wa)}
        text = f"**{b}**: **{win.gate}** wins ({win.label}: {_fmt_ci(wa)})"
        if run is None:
            text += "; no other gate was evaluated, so nothing to separate it from."
        else:
            ra = data.acc[(run.key, b)]
            separated = wa["ci_low"] > ra["ci_high"]
            entry.update(runner_up=run.label, runner_up_gate=run.gate, runner_up_acc=ra["acc"],
                         runner_up_ci_low=ra["ci_low"], runner_up_ci_high=ra["ci_high"], separated=separated)
            text += (f"; runner-up {run.gate} ({run.label}: {_fmt_ci(ra)}). The 95% CIs "
                     + ("do not overlap: the win is clear at this evaluation size." if separated else
                        "overlap: not separated by the CIs."))
            a, c = data.group_problems(win, b), data.group_problems(run, b)
            if a is not None and c is not None:
                pb = paired_bootstrap(a, c)
                entry["paired"] = pb
                excl = pb["ci_low"] > 0 or pb["ci_high"] < 0
                text += (f" Paired by problem (n = {pb['n']}): difference {pb['diff']:+.3f} "
                         f"[{pb['ci_low']:+.3f}, {pb['ci_high']:+.3f}], which "
                         + ("excludes 0 — the ranking is unlikely to be problem-sampling noise."
                            if excl else "includes 0 — we cannot tell these two apart on this benchmark."))
                if min(wa["n_seeds"], ra["n_seeds"]) > 1:
                    text += " (The paired interval pools the seeds: it covers problem sampling only.)"
            if min(wa["n_seeds"], ra["n_seeds"]) < 2:
                text += " One seed per cell: run-to-run (seed) variance is not in these intervals."
        out.append(entry)
        sec.paragraphs.append(text)
    record["verdict"] = out
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
    drawable = []
    for spec in gates:
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
    keys = ["reward", "reward_accuracy", "ratio_std", "eur", "entropy", "gated"]
    titles = {"reward": "reward (format + accuracy)", "reward_accuracy": "reward accuracy",
              "entropy": "token entropy", "ratio_std": "std of ratio r (last update)",
              "eur": "effective update ratio, EUR (last update)",
              "gated": "gated fraction (last update)\nsmooth: w < 0.5; clip: clipped"}
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
            histories[row["run_id"]] = {key: data.history(row["run_id"], name) for key, name in names.items()}
    n_steps = max((len(s) for h in histories.values() for s in h.values()), default=0)
    # Every cell sees the same prompts at a given step, so raw curves wiggle together with batch difficulty.
    window = max(1, round(n_steps / 10))
    multi_seed = any(len(g.runs) > 1 for g in groups)

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15.5, 8.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    seen_tau: dict[str, int] = {}
    # clip first, so where curves coincide (early steps are often identical) the smooth gates stay visible
    for g in sorted(groups, key=lambda g: g.gate != "clip"):
        ls = styles[seen_tau.setdefault(g.gate, 0) % len(styles)]
        seen_tau[g.gate] += 1
        color = gate_color(g.gate)
        for ax, key in zip(axes.flat, keys, strict=True):
            series = [histories[r][key] for r in g.run_ids if not histories[r][key].empty]
            if not series:
                continue
            frame = pd.concat(series, axis=1).sort_index()
            smooth = frame.rolling(window, min_periods=1).mean()
            mean = smooth.mean(axis=1)
            ax.plot(mean.index, mean.to_numpy(), ls, color=color, lw=1.7, zorder=3,
                    label=f"{g.label} ({len(series)} seed{'s' if len(series) > 1 else ''})")
            if len(series) > 1:
                # Light bands (clip's in grey, not black): overlapping bands of several gates stay readable.
                ax.fill_between(mean.index, smooth.min(axis=1).to_numpy(), smooth.max(axis=1).to_numpy(),
                                color="0.5" if g.gate == "clip" else color, alpha=0.09, lw=0, zorder=1)
    for ax, key in zip(axes.flat, keys, strict=True):
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
                              "averaged over each prompt's tokens, then over prompts; clip: 1 − clip fraction)."))
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
            best = max(gs, key=data.score)
            sec.notes.append(f"{gate}: {len(gs)} configurations; only the best ({best.label}) is drawn.")
            gs = [best]
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
                         str(a["n_seeds"]), "—" if a["n_problems"] is None else f"{a['n_problems']:.0f}",
                         "best" if is_best else ""])
            records.append({**a, "best": is_best})
    sec.tables.append(Table(["gate", "τ_pos / τ_neg (clip: ε)", "benchmark", "accuracy", "95% CI", "seeds",
                             "problems", ""], rows, highlight,
                            caption="Accuracy = mean correctness over the k samples of each problem, averaged "
                                    "over problems (eval/<benchmark>/acc). Best cell per benchmark marked."))
    multi = any(r["n_seeds"] > 1 for r in records)
    sec.paragraphs.append(
        "95% CI: with one seed, the evaluator's bootstrap over problems exactly as logged "
        "(eval/<benchmark>/acc_ci_low / acc_ci_high)"
        + ("; with several seeds, the mean over seeds ± the quadrature sum of the mean per-seed bootstrap "
           "half-width and the Student-t half-width across seeds." if multi else "."))
    if not multi:
        sec.notes.append("One seed per cell: the CIs cover which problems were drawn, not run-to-run variance.")
    record["accuracy"] = records
    return sec


def paired(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Each configuration against a sigmoid one, paired by problem (bootstrap over problems)."""
    sec = Section("(d) Each gate against the sigmoid baseline, paired by problem")
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
            same = [s for s in sig if g.smooth and s.tau_pos == g.tau_pos and s.tau_neg == g.tau_neg
                    and (s.key, b) in data.acc]
            if same:
                pairs.append((g, same[0], b, "same τ"))
            else:
                best = data.best(b, sig)
                if best is not None:
                    why = ("clip has no τ: best sigmoid cell" if not g.smooth
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
    rows, records, missing = [], [], []
    for g, s, b, why in pairs:
        a, c = data.group_problems(g, b), data.group_problems(s, b)
        if a is None or c is None:
            missing.append(f"{g.label if a is None else s.label} on {b}")
            continue
        pb = paired_bootstrap(a, c)
        excl = pb["ci_low"] > 0 or pb["ci_high"] < 0
        verdict = "no" if not excl else "yes: better" if pb["diff"] > 0 else "yes: worse"
        rows.append([b, g.label, s.label, why, f"{pb['diff']:+.3f}", f"[{pb['ci_low']:+.3f}, {pb['ci_high']:+.3f}]",
                     str(pb["n"]), verdict])
        records.append({"benchmark": b, "gate": g.gate, "cell": g.label, "sigmoid_cell": s.label, "why": why,
                        "run_ids": g.run_ids, "sigmoid_run_ids": s.run_ids, **pb, "excludes_0": excl})
    if missing:
        sec.notes.append("No per-sample artifacts (eval/samples/<benchmark>.jsonl) for: " + "; ".join(missing))
    if not rows:
        return sec
    better = {i for i, r in enumerate(rows) if r[-1] == "yes: better"}
    worse = {i for i, r in enumerate(rows) if r[-1] == "yes: worse"}
    sec.tables.append(Table(["benchmark", "cell", "vs sigmoid cell", "sigmoid chosen by", "Δ accuracy", "95% CI",
                             "n problems", "CI excludes 0"], rows, better,
                            caption="Δ = mean over problems of (per-problem accuracy of the cell − that of the "
                                    "sigmoid cell); per-problem accuracy pools the k samples of every seed. Green: "
                                    "clearly better than sigmoid; red: clearly worse.", worse=worse))
    sec.paragraphs.append(
        f"Paired bootstrap: the per-problem differences are resampled over problems ({N_BOOT} resamples, seed "
        f"{BOOT_SEED}); pairing removes problem difficulty, which both cells share, so this is far tighter than "
        "comparing two independent CIs. The sigmoid partner is the sigmoid cell with the same τ_pos/τ_neg when "
        "there is one, else the best sigmoid cell on that benchmark (column 4 says which).")
    sec.figures.append(Figure("fig_paired.png", png(forest_figure(records)),
                              "Accuracy difference to the sigmoid cell with its paired 95% bootstrap CI; right of "
                              "the line: better than sigmoid."))
    if any(min(len(p[0].runs), len(p[1].runs)) > 1 for p in pairs):
        sec.notes.append("With several seeds the samples of all seeds are pooled per problem: the interval "
                         "covers problem sampling, not seed-to-seed variance.")
    record["paired"] = records
    return sec


def tau_sensitivity(data: ExperimentData, record: dict[str, Any]) -> Section:
    """Accuracy (or the final training reward) against τ_pos per gate, clip as a reference line."""
    sec = Section("(e) τ sensitivity")
    smooth = [g for g in data.groups if g.smooth and g.tau_pos is not None]
    if not smooth:
        sec.notes.append("No smooth-gate cells with a temperature: nothing to plot.")
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
        log_x(ax, [g.tau_pos for g in smooth])
        ax.set_xlabel("τ_pos (log scale)" + ("; τ_neg varies at equal τ_pos" if taus_neg_vary else ""))
        ax.set_ylabel("accuracy (95% CI)" if use_eval else "final train reward")
        ax.set_title(b)
        ax.grid(alpha=0.3)
    # One legend under the panels: inside a panel it covers CIs that reach the top.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    sec.figures.append(Figure("fig_tau.png", png(fig),
                              ("Accuracy against τ_pos per gate with 95% CIs (as in table c); clip as a dashed "
                               "line with its CI band. " if use_eval else "Final training reward against τ_pos. ")
                              + "Points of different gates at one τ are nudged apart slightly on the x axis."))
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
    return f"{g.tau_pos:.3g} / {g.tau_neg:.3g}" if g.tau_pos is not None and g.tau_neg is not None else "—"


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
