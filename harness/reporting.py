"""Figures and reports. This module draws; it computes nothing that the gates or metrics own.

``plot_gate_shapes`` draws f(r) and w(r) of gates; ``write_report`` / ``harness report EXPERIMENT`` turns an MLflow
experiment of sweeps and tuning studies into a self-contained HTML page and a Markdown twin (reports/README.md).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harness.gates import ClipGate, effective_tau, get_gate

# Okabe-Ito colour-blind-safe palette; clip in black so it never competes with a smooth gate.
log = logging.getLogger(__name__)

GATE_COLORS = {"sigmoid": "#0072B2", "erf": "#E69F00", "arctan": "#009E73", "softsign": "#CC79A7", "clip": "#000000"}


def gate_color(name: str, i: int = 0) -> str:
    """The gate's colour in every figure (matplotlib's cycle for gates outside the palette)."""
    return GATE_COLORS.get(name, f"C{i}")


def plot_gate_shapes(gates: Sequence[str], taus: Sequence[float], out: str | Path | None = None, *,
                     width: str = "raw", r_max: float | None = None, clip_eps: tuple[float, float] | None = None):
    """Draw, one column per τ: f(r) (top), w(r) (middle) and w(r) on a log scale (bottom, where the
    exponential, Gaussian and polynomial tails separate). The r-range follows τ (±4 sigmoid
    half-widths, at least the clip range). ``clip`` is drawn first, thin, for A > 0 (solid) and A < 0
    (dotted), since its gate differs by sign; ``clip_eps`` = (ε_low, ε_high) it was run with (default 0.2/0.2).
    Saves to ``out`` when given; returns the figure."""
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
            g = get_gate(spec, **({} if clip_eps is None else {"eps_low": clip_eps[0], "eps_high": clip_eps[1]}))
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
    # At most 4 entries per row: 7 in one row ran past the edges of a 2-column figure.
    ncol = max(1, min(len(labels), 4))
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle("Gate value f(r) and gradient weight w(r) = f'(r), for A > 0 (smooth gates use τ_pos)")
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 0.97))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
    return fig


# ================================================================================================================
# The comparison report of an MLflow experiment: `harness report EXPERIMENT`
# ================================================================================================================
#
# Data: MLflow runs of the experiment (harness.tracking's layout). A *cell* is the latest FINISHED run of one
# config hash; a *group* is the cells that differ only in the seed (gate × τ × everything else), which is what
# tables and curves aggregate over. Every number in the report comes from MLflow (metrics, metric histories,
# per-sample artifacts) or from an Optuna study; report.json holds them at full precision.

REPORT_TAG = "harness.report"  # tag of the run that holds the report when the experiment has no parent run
BOOT_SEED = 0
N_BOOT = 2000
MAX_PAIRED_ROWS = 30
MAX_GROUPS_PER_GATE_IN_CURVES = 3
# Params that say where things are or how they are shown (as tracking.HASH_IGNORED), plus the seed, which a group
# pools over.
GROUP_IGNORED_PREFIXES = ("output_dir", "resume", "cache_dir", "data_dir", "tracking.", "backend.progress",
                          "backend.threads", "sweep", "sweep_name", "tune.", "cells_dir", "seed")


@dataclass
class Group:
    """The cells (one per seed) of one configuration."""

    key: str
    label: str
    gate: str
    tau_pos: float | None
    tau_neg: float | None
    eps: tuple[float, float] | None
    runs: pd.DataFrame  # one row per seed (latest FINISHED run of each config hash)

    @property
    def run_ids(self) -> list[str]:
        return list(self.runs["run_id"])

    @property
    def seeds(self) -> list[str]:
        return [str(s) for s in self.runs.get("tags.seed", pd.Series(dtype=str)).tolist()]

    @property
    def smooth(self) -> bool:
        return self.gate != "clip"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise (best cells, clear wins)
    caption: str = ""
    worse: set[int] = field(default_factory=set)  # row indices marked as clear losses (HTML: red)


@dataclass
class Figure:
    name: str  # file name of the PNG
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text (escaped in HTML); **bold** allowed
    notes: list[str] = field(default_factory=list)  # what is missing or approximate
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class ExperimentData:
    name: str
    experiment_id: str
    tracking_uri: str
    runs: pd.DataFrame  # every run of the experiment
    cells: pd.DataFrame  # latest FINISHED run per config hash
    groups: list[Group]
    benchmarks: list[str]


# ------------------------------------------------------------------------------------------------- loading


def _tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def load_experiment(experiment: str, tracking_uri: str | None = None) -> ExperimentData:
    """Every run of ``experiment`` and its cells grouped by configuration (``ValueError`` if it does not exist)."""
    import mlflow

    uri = _tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ValueError(f"no MLflow store at {uri} (pass --tracking-uri)")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in mlflow.search_experiments()]
        raise ValueError(f"MLflow experiment {experiment!r} not found at {uri}; experiments: {', '.join(names)}")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    if runs.empty:
        runs = pd.DataFrame(columns=["run_id", "status", "start_time"])
    for col in ("tags.config_hash", "tags.gate", f"tags.{REPORT_TAG}", "tags.sweep", "tags.study"):
        if col not in runs.columns:
            runs[col] = None
    runs = runs[runs[f"tags.{REPORT_TAG}"].isna()]
    cells = runs[runs["tags.config_hash"].notna() & (runs["status"] == "FINISHED")]
    cells = cells.sort_values("start_time", ascending=False).drop_duplicates("tags.config_hash")
    cells = cells.sort_values(["tags.gate", "start_time"]).reset_index(drop=True)
    benches = sorted({c.split("/")[1] for c in cells.columns
                      if c.startswith("metrics.eval/") and c.endswith("/acc") and cells[c].notna().any()})
    return ExperimentData(experiment, exp.experiment_id, uri, runs.reset_index(drop=True), cells,
                          group_cells(cells), benches)


def _group_params(row: pd.Series) -> dict[str, str]:
    return {k[len("params."):]: v for k, v in row.items()
            if k.startswith("params.") and isinstance(v, str)
            and not k[len("params."):].startswith(GROUP_IGNORED_PREFIXES)}


def group_cells(cells: pd.DataFrame) -> list[Group]:
    """Cells that differ only in the seed form one group; labels name the gate and τ (or ε), plus any other
    parameter that tells two groups with the same gate and τ apart."""
    by_key: dict[str, list[int]] = {}
    params: dict[str, dict[str, str]] = {}
    for i, row in cells.iterrows():
        p = _group_params(row)
        key = json.dumps(p, sort_keys=True) if p else str(row.get("tags.config_hash"))
        by_key.setdefault(key, []).append(i)
        params[key] = p
    groups = []
    for key, idx in by_key.items():
        rows = cells.loc[idx]
        first = rows.iloc[0]
        gate = str(first.get("tags.gate") or "?")
        tp, tn = _float_or_none(first.get("tags.tau_pos")), _float_or_none(first.get("tags.tau_neg"))
        el, eh = _float_or_none(first.get("tags.eps_low")), _float_or_none(first.get("tags.eps_high"))
        eps = (el, eh) if el is not None and eh is not None else None
        if gate == "clip":
            label = f"clip ε={el:g}/{eh:g}" if eps else "clip"
        else:
            label = f"{gate.split(':')[-1]} τ={tp:.3g}/{tn:.3g}" if tp is not None and tn is not None else gate
        groups.append(Group(key, label, gate, tp, tn, eps, rows.sort_values("tags.seed").reset_index(drop=True)))
    # Disambiguate equal labels by the parameters that differ between those groups.
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for g in same for k in params[g.key]})
        differing = [k for k in keys if len({params[g.key].get(k) for g in same}) > 1]
        for g in same:
            g.label += " (" + ", ".join(f"{k}={params[g.key].get(k)}" for k in differing[:3]) + ")"
    order = {name: i for i, name in enumerate(GATE_COLORS)}
    return sorted(groups, key=lambda g: (order.get(g.gate, 99), g.gate, g.tau_pos or 0.0, g.tau_neg or 0.0, g.label))


# ------------------------------------------------------------------------------------------------- statistics


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile (scipy when available, else a normal approximation with a small-dof table)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.5 + level / 2, dof))
    except ImportError:  # 95% values; other levels fall back to the normal quantile
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        if abs(level - 0.95) < 1e-9 and dof in table:
            return table[dof]
        from statistics import NormalDist

        return NormalDist().inv_cdf(0.5 + level / 2)


def group_accuracy(group: Group, bench: str, level: float = 0.95) -> dict[str, Any] | None:
    """Accuracy of a group on a benchmark with its 95% CI.

    One seed: the evaluator's bootstrap CI over problems exactly as logged (``eval/<bench>/acc_ci_low/high``).
    n >= 2 seeds: the mean over seeds; the CI half-width adds in quadrature the mean per-seed bootstrap half-width
    (which problems) and the t-interval half-width across seeds (which training run) — both are real sources of
    variation, and the seeds share one test set, so neither alone covers the other.
    """
    col = f"metrics.eval/{bench}/acc"
    if col not in group.runs.columns:
        return None
    rows = group.runs[group.runs[col].notna()]
    if rows.empty:
        return None
    acc = rows[col].astype(float).to_numpy()
    lo = rows.get(f"metrics.eval/{bench}/acc_ci_low", pd.Series([np.nan] * len(rows))).astype(float).to_numpy()
    hi = rows.get(f"metrics.eval/{bench}/acc_ci_high", pd.Series([np.nan] * len(rows))).astype(float).to_numpy()
    n = len(acc)
    out: dict[str, Any] = {"group": group.label, "gate": group.gate, "tau_pos": group.tau_pos,
                           "tau_neg": group.tau_neg, "benchmark": bench, "n_seeds": n, "run_ids": list(rows["run_id"]),
                           "n_problems": _float_or_none(rows.get(f"metrics.eval/{bench}/n_problems",
                                                                 pd.Series([None])).iloc[0])}
    if n == 1:
        out.update(acc=float(acc[0]), ci_low=float(lo[0]), ci_high=float(hi[0]), ci_kind="bootstrap over problems")
        return out
    mean = float(acc.mean())
    hw_boot = float(np.nanmean((hi - lo) / 2)) if np.isfinite(hi - lo).any() else 0.0
    hw_seed = t_quantile(level, n - 1) * float(acc.std(ddof=1)) / math.sqrt(n)
    hw = math.hypot(hw_boot, hw_seed)
    # Accuracy lives in [0, 1]; a t-interval over 2-3 seeds easily reaches past it (t = 12.7 at 1 dof).
    out.update(acc=mean, ci_low=max(0.0, mean - hw), ci_high=min(1.0, mean + hw), acc_min=float(acc.min()),
               acc_max=float(acc.max()), hw=hw, hw_boot=hw_boot, hw_seed=hw_seed, ci_kind="bootstrap ⊕ t over seeds")
    return out


def per_problem_correct(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean correctness per problem id over all of its samples (and, when records of several seeds are passed,
    over those too)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        acc.setdefault(str(r["problem_id"]), []).append(float(bool(r["correct"])))
    return {pid: sum(v) / len(v) for pid, v in acc.items()}


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = N_BOOT, level: float = 0.95,
                     seed: int = BOOT_SEED) -> dict[str, Any]:
    """Difference ``mean(a_p - b_p)`` over the problems both have, with a seeded percentile bootstrap CI that
    resamples problems (pairs stay together, so the problem-difficulty variance cancels)."""
    common = sorted(set(a) & set(b))
    n = len(common)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    d = np.array([a[p] - b[p] for p in common], dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"n": n, "diff": float(d.mean()), "se": float(means.std(ddof=1)) if n_boot > 1 else float("nan"),
            "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1 - alpha)), "p_le_0": float((means <= 0).mean()),
            "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a))}


# ------------------------------------------------------------------------------------------------- report


class _Report:
    """Builds the sections of one experiment's report."""

    def __init__(self, data: ExperimentData, work: Path, optuna_storage: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.data = data
        self.client = MlflowClient(tracking_uri=data.tracking_uri)
        self.work = work
        self.optuna_storage = optuna_storage
        self.json: dict[str, Any] = {"experiment": data.name, "tracking_uri": data.tracking_uri,
                                     "benchmarks": data.benchmarks}
        self._samples: dict[tuple[str, str], list[dict[str, Any]] | None] = {}
        self.acc: dict[tuple[str, str], dict[str, Any]] = {}  # (group key, bench) -> group_accuracy
        for g in data.groups:
            for b in data.benchmarks:
                row = group_accuracy(g, b)
                if row is not None:
                    self.acc[(g.key, b)] = row

    # -- helpers -------------------------------------------------------------------------------------------

    def samples(self, run_id: str, bench: str) -> list[dict[str, Any]] | None:
        """Per-sample records of one run on one benchmark (the logged JSONL artifact), or None."""
        key = (run_id, bench)
        if key not in self._samples:
            # One progress bar per file is noise in a sweep's log; restore the setting afterwards.
            saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
            try:
                path = self.client.download_artifacts(run_id, f"eval/samples/{bench}.jsonl",
                                                       str(self.work / run_id))
                with open(path, encoding="utf-8") as fh:
                    self._samples[key] = [json.loads(line) for line in fh if line.strip()]
            except Exception:  # no artifact (save_samples=false, or an old run): the caller notes it
                self._samples[key] = None
            finally:
                if saved is None:
                    os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
                else:
                    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
        return self._samples[key]

    def group_problems(self, group: Group, bench: str) -> dict[str, float] | None:
        records: list[dict[str, Any]] = []
        for run_id in group.run_ids:
            r = self.samples(run_id, bench)
            if r is None:
                return None
            records += r
        return per_problem_correct(records)

    def best(self, bench: str, groups: Sequence[Group] | None = None) -> Group | None:
        cands = [g for g in (groups if groups is not None else self.data.groups) if (g.key, bench) in self.acc]
        return max(cands, key=lambda g: self.acc[(g.key, bench)]["acc"]) if cands else None

    def score(self, g: Group) -> float:
        """How good a group is overall: mean accuracy over benchmarks, else the final training reward."""
        accs = [self.acc[(g.key, b)]["acc"] for b in self.data.benchmarks if (g.key, b) in self.acc]
        if accs:
            return float(np.mean(accs))
        r = g.runs.get("metrics.train/reward")
        return float(r.mean()) if r is not None and r.notna().any() else float("-inf")

    # -- sections ------------------------------------------------------------------------------------------

    def overview(self) -> Section:
        d = self.data
        runs = d.runs
        sec = Section("Overview")
        cell_runs = runs[runs["tags.config_hash"].notna()]
        status = cell_runs["status"].value_counts().to_dict() if not cell_runs.empty else {}
        n_parents = int(runs["tags.sweep"].notna().sum())
        n_cells = len(d.cells)
        seeds = sorted({s for g in d.groups for s in g.seeds})
        sec.paragraphs.append(
            f"Experiment **{d.name}** at {_mask(d.tracking_uri)}: {_n(len(cell_runs), 'cell run')} "
            f"({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}) under {_n(n_parents, 'sweep/tune run')}; "
            f"{_n(n_cells, 'finished cell')} "
            f"(latest FINISHED run per config hash) in {len(d.groups)} configurations; seeds: "
            f"{', '.join(seeds) or '-'}; benchmarks: {', '.join(d.benchmarks) or 'none (no evaluation logged)'}.")
        if not d.groups:
            sec.notes.append("No FINISHED cell run in this experiment: nothing to compare yet.")
        failed = runs[(runs["status"] == "FAILED") & runs["tags.config_hash"].notna()]
        if not failed.empty:
            rows = [[str(r.get("tags.mlflow.runName", "")), str(r["run_id"])[:8],
                     str(r.get("tags.failure_reason", ""))[:160]] for _, r in failed.iterrows()]
            sec.tables.append(Table(["run", "id", "failure reason"], rows, caption="FAILED cell runs"))
        pruned = runs[(runs["status"] == "KILLED") & runs["tags.config_hash"].notna()]
        if not pruned.empty:
            sec.paragraphs.append(f"{_n(len(pruned), 'run')} stopped early (KILLED: pruned Optuna trials) and left "
                                  "out of the tables; the pruner's view of them is in the Optuna section.")
        self.json["runs"] = {"cell_runs": len(cell_runs), "status": status, "parent_runs": n_parents,
                             "cells": n_cells, "groups": len(d.groups)}
        return sec

    def verdict(self) -> Section:
        sec = Section("Verdict")
        out = []
        if not self.data.benchmarks:
            ranked = sorted(self.data.groups, key=self.score, reverse=True)
            if ranked and math.isfinite(self.score(ranked[0])):
                top = ranked[0]
                sec.paragraphs.append(
                    f"No evaluation was logged, so there is no accuracy verdict. By the final training reward (a "
                    f"noisy proxy of one batch) the top cell is **{top.label}** ({self.score(top):.3f}).")
            else:
                sec.paragraphs.append("No evaluation and no training metrics: no verdict.")
            self.json["verdict"] = []
            return sec
        for b in self.data.benchmarks:
            win = self.best(b)
            if win is None:
                continue
            wa = self.acc[(win.key, b)]
            others = [g for g in self.data.groups if g.gate != win.gate]
            run = self.best(b, others)
            entry: dict[str, Any] = {"benchmark": b, "winner": win.label, "winner_gate": win.gate, **_ci(wa)}
            text = f"**{b}**: **{win.gate}** wins ({win.label}: {_fmt_ci(wa)})"
            if run is None:
                text += "; no other gate was evaluated, so nothing to separate it from."
            else:
                ra = self.acc[(run.key, b)]
                separated = wa["ci_low"] > ra["ci_high"]
                entry.update(runner_up=run.label, runner_up_gate=run.gate, runner_up_acc=ra["acc"],
                             runner_up_ci_low=ra["ci_low"], runner_up_ci_high=ra["ci_high"], separated=separated)
                text += (f"; runner-up {run.gate} ({run.label}: {_fmt_ci(ra)}). The 95% CIs "
                         + ("do not overlap: the win is clear at this evaluation size." if separated else
                            "overlap: not separated by the CIs."))
                a, c = self.group_problems(win, b), self.group_problems(run, b)
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
        self.json["verdict"] = out
        return sec

    def gate_shapes(self) -> Section:
        sec = Section("(a) Gate shapes at the swept temperatures")
        gates = list(dict.fromkeys(g.gate for g in self.data.groups))
        if not gates:
            sec.notes.append("No cells: no gates to draw.")
            return sec
        taus = sorted({g.tau_pos for g in self.data.groups if g.smooth and g.tau_pos is not None})
        if len(taus) > 4:
            # A tuning study has many τ: draw the range ends, the best cell's τ and the median.
            best = max((g for g in self.data.groups if g.smooth and g.tau_pos is not None), key=self.score)
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
        clip = next((g for g in self.data.groups if g.gate == "clip" and g.eps), None)
        widths = {str(w) for w in self.data.cells.get("tags.width", pd.Series(dtype=str)).dropna()}
        width = widths.pop() if len(widths) == 1 else "raw"
        if not drawable:
            return sec
        fig = plot_gate_shapes(drawable, taus, width=width, clip_eps=clip.eps if clip else None)
        sec.figures.append(Figure("fig_gate_shapes.png", _png(fig),
                                  "Gate value f(r) (top), gradient weight w(r) = f'(r) (middle) and w on a log scale "
                                  "(bottom), for A > 0 (smooth gates at τ_pos). Dashed grey: r itself (no gate)."))
        return sec

    def training_curves(self) -> Section:
        sec = Section("(b) Training curves")
        groups = self._curve_groups(sec)
        if not groups:
            sec.notes.append("No finished cells with training metrics.")
            return sec
        keys = ["reward", "reward_accuracy", "entropy", "ratio_std", "gate_weight", "gated"]
        titles = {"reward": "reward (format + accuracy)", "reward_accuracy": "reward accuracy",
                  "entropy": "token entropy", "ratio_std": "std of ratio r (last update)",
                  "gate_weight": "mean gate weight w(r) (last update)",
                  "gated": "gated fraction (last update)\nsmooth: w < 0.5; clip: clipped"}
        histories: dict[str, dict[str, pd.Series]] = {}
        last_k: dict[str, int] = {}
        for g in groups:
            for _, row in g.runs.iterrows():
                k = _last_update(row)
                last_k[row["run_id"]] = k
                names = {"reward": "train/reward", "reward_accuracy": "train/reward_accuracy",
                         "entropy": "train/entropy", "ratio_std": f"train/it{k}/ratio_std",
                         "gate_weight": f"train/it{k}/gate_weight",
                         "gated": f"train/it{k}/clip_frac" if g.gate == "clip" else f"train/it{k}/frac_w_lt_0.5"}
                histories[row["run_id"]] = {key: self._history(row["run_id"], name) for key, name in names.items()}
        n_steps = max((len(s) for h in histories.values() for s in h.values()), default=0)
        # Every cell sees the same prompts at a given step, so raw curves wiggle together with batch difficulty.
        window = max(1, round(n_steps / 10))
        multi_seed = any(len(g.runs) > 1 for g in groups)

        plt = _pyplot()
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
        sec.figures.append(Figure("fig_training.png", _png(fig),
                                  f"Per-step training metrics, moving average over {window} step(s); line: mean over "
                                  f"seeds, {band}. Ratio statistics are from the last optimizer update of each "
                                  f"rollout batch (it{max(last_k.values(), default=1)}), where r ≠ 1."))
        if not multi_seed:
            sec.notes.append("One seed per configuration: no seed bands.")
        return sec

    def _curve_groups(self, sec: Section) -> list[Group]:
        by_gate: dict[str, list[Group]] = {}
        for g in self.data.groups:
            by_gate.setdefault(g.gate, []).append(g)
        out = []
        for gate, gs in by_gate.items():
            if len(gs) > MAX_GROUPS_PER_GATE_IN_CURVES:
                best = max(gs, key=self.score)
                sec.notes.append(f"{gate}: {len(gs)} configurations; only the best ({best.label}) is drawn.")
                gs = [best]
            out += gs
        return out

    def _history(self, run_id: str, key: str) -> pd.Series:
        try:
            hist = self.client.get_metric_history(run_id, key)
        except Exception:
            return pd.Series(dtype=float)
        if not hist:
            return pd.Series(dtype=float)
        s = pd.Series({m.step: m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))}, dtype=float)
        return s[~s.index.duplicated(keep="last")]

    def accuracy_table(self) -> Section:
        sec = Section("(c) Accuracy by gate, τ and benchmark")
        if not self.acc:
            sec.notes.append("No evaluation metrics (eval/<benchmark>/acc) in this experiment: no accuracy table. "
                             "Runs with eval.enabled=false (e.g. tuning on the training-reward proxy) have none.")
            self.json["accuracy"] = []
            return sec
        rows, highlight, records = [], set(), []
        best_of = {b: self.best(b) for b in self.data.benchmarks}
        for g in self.data.groups:
            for b in self.data.benchmarks:
                a = self.acc.get((g.key, b))
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
        self.json["accuracy"] = records
        return sec

    def paired(self) -> Section:
        sec = Section("(d) Each gate against the sigmoid baseline, paired by problem")
        self.json["paired"] = []
        sig = [g for g in self.data.groups if g.gate == "sigmoid"]
        others = [g for g in self.data.groups if g.gate != "sigmoid"]
        if not self.data.benchmarks:
            sec.notes.append("No evaluation: no paired comparison.")
            return sec
        if not sig or not others:
            sec.notes.append("Needs sigmoid cells and cells of another gate, evaluated: "
                             + ("no sigmoid cell." if not sig else "only sigmoid cells."))
            return sec
        pairs: list[tuple[Group, Group, str, str]] = []  # (gate group, sigmoid group, benchmark, why)
        for b in self.data.benchmarks:
            for g in others:
                if (g.key, b) not in self.acc:
                    continue
                same = [s for s in sig if g.smooth and s.tau_pos == g.tau_pos and s.tau_neg == g.tau_neg
                        and (s.key, b) in self.acc]
                if same:
                    pairs.append((g, same[0], b, "same τ"))
                else:
                    best = self.best(b, sig)
                    if best is not None:
                        why = ("clip has no τ: best sigmoid cell" if not g.smooth
                               else "no sigmoid at this τ: best sigmoid cell")
                        pairs.append((g, best, b, why))
        if len(pairs) > MAX_PAIRED_ROWS:
            keep = []
            for b in self.data.benchmarks:
                for gate in dict.fromkeys(g.gate for g in others):
                    cand = [p for p in pairs if p[2] == b and p[0].gate == gate]
                    if cand:
                        keep.append(max(cand, key=lambda p: self.acc[(p[0].key, b)]["acc"]))
            sec.notes.append(f"{len(pairs)} comparisons; shown: the best cell of each gate per benchmark.")
            pairs = keep
        rows, records, missing = [], [], []
        for g, s, b, why in pairs:
            a, c = self.group_problems(g, b), self.group_problems(s, b)
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
        sec.figures.append(Figure("fig_paired.png", _png(self._forest(records)),
                                  "Accuracy difference to the sigmoid cell with its paired 95% bootstrap CI; right of "
                                  "the line: better than sigmoid."))
        if any(min(len(p[0].runs), len(p[1].runs)) > 1 for p in pairs):
            sec.notes.append("With several seeds the samples of all seeds are pooled per problem: the interval "
                             "covers problem sampling, not seed-to-seed variance.")
        self.json["paired"] = records
        return sec

    def _forest(self, records: Sequence[Mapping[str, Any]]):
        plt = _pyplot()
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

    def tau_sensitivity(self) -> Section:
        sec = Section("(e) τ sensitivity")
        smooth = [g for g in self.data.groups if g.smooth and g.tau_pos is not None]
        if not smooth:
            sec.notes.append("No smooth-gate cells with a temperature: nothing to plot.")
            return sec
        use_eval = bool(self.acc)
        benches = self.data.benchmarks if use_eval else ["train/reward (final)"]
        if not use_eval:
            sec.notes.append("No evaluation metrics: the y axis is the final training reward (the tuning proxy), "
                             "mean over seeds with min–max bars when there are several.")
        taus_neg_vary = any(len({g.tau_neg for g in smooth if g.tau_pos == t}) > 1 for t in {g.tau_pos for g in smooth})
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(benches), figsize=(max(7.0, 5.6 * len(benches)), 4.6), squeeze=False)
        gates = list(dict.fromkeys(g.gate for g in smooth))
        records = []
        for ax, b in zip(axes[0], benches, strict=True):
            for gi, gate in enumerate(gates):
                pts = []
                for g in (x for x in smooth if x.gate == gate):
                    y = self._y(g, b, use_eval)
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
            for g in (x for x in self.data.groups if x.gate == "clip"):
                y = self._y(g, b, use_eval)
                if y is not None:
                    ax.axhspan(y[1], y[2], color="0.2", alpha=0.07, lw=0)
                    ax.axhline(y[0], color="black", lw=1.3, ls="--", label=f"{g.label} (no τ)")
            _log_x(ax, [g.tau_pos for g in smooth])
            ax.set_xlabel("τ_pos (log scale)" + ("; τ_neg varies at equal τ_pos" if taus_neg_vary else ""))
            ax.set_ylabel("accuracy (95% CI)" if use_eval else "final train reward")
            ax.set_title(b)
            ax.grid(alpha=0.3)
        # One legend under the panels: inside a panel it covers CIs that reach the top.
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        sec.figures.append(Figure("fig_tau.png", _png(fig),
                                  ("Accuracy against τ_pos per gate with 95% CIs (as in table c); clip as a dashed "
                                   "line with its CI band. " if use_eval else "Final training reward against τ_pos. ")
                                  + "Points of different gates at one τ are nudged apart slightly on the x axis."))
        self.json["tau_sensitivity"] = records
        return sec

    def _y(self, g: Group, bench: str, use_eval: bool) -> tuple[float, float, float] | None:
        if use_eval:
            a = self.acc.get((g.key, bench))
            return None if a is None else (a["acc"], a["ci_low"], a["ci_high"])
        r = g.runs.get("metrics.train/reward")
        if r is None or not r.notna().any():
            return None
        r = r.dropna().astype(float)
        return float(r.mean()), float(r.min()), float(r.max())

    def optuna_section(self) -> Section:
        sec = Section("(f) Optuna temperature tuning")
        self.json["optuna"] = {}
        names = sorted({str(s) for s in self.data.runs["tags.study"].dropna() if str(s)})
        if not names:
            sec.notes.append("No Optuna study logged to this experiment (no run has a `study` tag).")
            return sec
        storage = self._optuna_storage()
        if storage is None:
            sec.notes.append(f"Studies {', '.join(names)} are tagged, but their storage is unknown or masked; pass "
                             "--optuna-storage URL.")
            return sec
        import optuna

        for name in names:
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except Exception as exc:
                sec.notes.append(f"study {name}: cannot load from {_mask(storage)} ({type(exc).__name__}: {exc})")
                continue
            self._study(sec, study)
        return sec

    def _optuna_storage(self) -> str | None:
        if self.optuna_storage:
            return self.optuna_storage
        parents = self.data.runs[self.data.runs.get("tags.optuna_storage", pd.Series(dtype=str)).notna()] \
            if "tags.optuna_storage" in self.data.runs.columns else pd.DataFrame()
        if not parents.empty:
            url = str(parents.sort_values("start_time", ascending=False).iloc[0]["tags.optuna_storage"])
            if "***" not in url:
                return url
        local = Path.cwd() / "optuna.db"
        return f"sqlite:///{local}" if local.exists() else None

    def _study(self, sec: Section, study: Any) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
        objective = study.user_attrs.get("objective", "objective")
        entry: dict[str, Any] = {"trials": len(trials), "states": states, "objective": objective}
        text = (f"Study **{study.study_name}** ({study.user_attrs.get('gate', '?')}, {study.direction.name.lower()} "
                f"{objective}): {len(trials)} trials — " + ", ".join(f"{v} {k}" for k, v in states.items()) + ".")
        if complete:
            best = study.best_trial
            tp = best.user_attrs.get("tau_pos", best.params.get("tau_pos"))
            tn = best.user_attrs.get("tau_neg", best.params.get("tau_neg"))
            text += f" Best: trial {best.number}, τ_pos = {tp:.4g}, τ_neg = {tn:.4g}, {objective} = {best.value:.4f}."
            entry.update(best_trial=best.number, best_value=best.value, best_tau_pos=tp, best_tau_neg=tn,
                         best_params=dict(best.params))
        else:
            sec.notes.append(f"study {study.study_name}: no COMPLETE trial yet.")
        sec.paragraphs.append(text)
        rows = []
        for t in trials:
            dur = t.duration.total_seconds() if t.duration is not None else None
            last = max(t.intermediate_values) if t.intermediate_values else None
            rows.append([str(t.number), t.state.name, "—" if t.value is None or t.state != TrialState.COMPLETE
                         else f"{t.value:.4f}", _g(t.user_attrs.get("tau_pos", t.params.get("tau_pos"))),
                         _g(t.user_attrs.get("tau_neg", t.params.get("tau_neg"))), "—" if last is None else str(last),
                         "—" if dur is None else f"{dur:.0f}", str(t.user_attrs.get("fail_reason", ""))[:80]])
        best_row = {i for i, t in enumerate(trials) if complete and t.number == study.best_trial.number}
        sec.tables.append(Table(["trial", "state", objective, "τ_pos", "τ_neg", "last step", "seconds", "note"], rows,
                                best_row, caption=f"Trials of {study.study_name} (best marked)."))
        if len(complete) >= 2:
            try:
                import warnings

                import optuna

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    imp = optuna.importance.get_param_importances(study)
                entry["importances"] = imp
                sec.tables.append(Table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()],
                                        caption="Parameter importances (Optuna's default importance evaluator)."))
                for w in caught:  # e.g. too few trials to tell the parameters apart: say so on the page
                    if issubclass(w.category, UserWarning):
                        sec.notes.append(f"study {study.study_name}, importances: {w.message}")
                if len(imp) == 1:
                    sec.notes.append(f"study {study.study_name}: one tuned parameter (τ tied), so its importance "
                                     "is 1 by construction.")
            except Exception as exc:
                sec.notes.append(f"study {study.study_name}: parameter importances unavailable ({exc}).")
        else:
            sec.notes.append(f"study {study.study_name}: parameter importances need at least 2 COMPLETE trials.")
        sec.figures.append(Figure(f"fig_optuna_{_slug(study.study_name)}.png",
                                  _png(self._study_figure(study, trials, complete, pruned, objective)),
                                  f"{study.study_name}: objective by trial with the best so far (left), against "
                                  "τ_pos (middle; pruned trials as ticks on the axis), and the intermediate values "
                                  "the pruner saw (right; pruned trials grey, × where they were stopped)."))
        self.json["optuna"][study.study_name] = entry

    @staticmethod
    def _study_figure(study: Any, trials: Sequence[Any], complete: Sequence[Any], pruned: Sequence[Any],
                      objective: str):
        plt = _pyplot()
        color = gate_color(str(study.user_attrs.get("gate", "")))
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.6))
        maximize = study.direction.name == "MAXIMIZE"
        from matplotlib.ticker import MaxNLocator

        best_number = study.best_trial.number if complete else None
        tau = {t.number: t.user_attrs.get("tau_pos", t.params.get("tau_pos")) for t in trials}
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
        _log_x(a2, [v for v in tau.values() if v is not None])
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


def _log_x(ax: Any, values: Sequence[float]) -> None:
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


def _last_update(row: pd.Series) -> int:
    """k of the last optimizer update of a rollout batch with ratio metrics (``train/it{k}/ratio_std``)."""
    ks = [int(m.group(1)) for c in row.index if (m := re.fullmatch(r"metrics\.train/it(\d+)/ratio_std", c))
          and pd.notna(row[c])]
    return max(ks, default=1)


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


def _g(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4g}"


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{font-size:1.25em;margin-top:2em;
border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f0f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e6f2e6;font-weight:600}tr.worse td{background:#fbeaea}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.9em;
padding-top:.3em}
.note{background:#fff8e1;border-left:4px solid #e6a700;padding:.35em .8em;margin:.4em 0;font-size:.92em}
.verdict p{background:#eef5fb;border-left:4px solid #0072B2;padding:.5em .9em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.meta{color:#666;font-size:.88em}
"""


def _inline_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def _is_num(cell: str) -> bool:
    return bool(re.fullmatch(r"[+\-−]?[\d.]+|\[.*\]", cell))


def render_html(title: str, sections: Sequence[Section], meta: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no external resource."""
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           f"<p class='meta'>{html.escape(meta)}</p>"]
    for sec in sections:
        cls = " class='verdict'" if sec.title == "Verdict" else ""
        out.append(f"<section{cls}><h2>{html.escape(sec.title)}</h2>")
        out += [f"<p>{_inline_html(p)}</p>" for p in sec.paragraphs]
        out += [f"<div class='note'>{_inline_html(n)}</div>" for n in sec.notes]
        for t in sec.tables:
            out.append("<table>")
            if t.caption:
                out.append(f"<caption>{html.escape(t.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header) + "</tr>")
            for i, row in enumerate(t.rows):
                cells = "".join(f"<td class='num'>{html.escape(c)}</td>" if _is_num(c) else f"<td>{html.escape(c)}</td>"
                                for c in row)
                cls = " class='best'" if i in t.highlight else " class='worse'" if i in t.worse else ""
                out.append(f"<tr{cls}>{cells}</tr>")
            out.append("</table>")
        for f in sec.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section], meta: str) -> str:
    """The Markdown twin of :func:`render_html`; figures are the PNG files next to it."""
    out = [f"# {title}", "", f"_{meta}_", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for p in sec.paragraphs:
            out += [p, ""]
        for n in sec.notes:
            out += [f"> **Note:** {n}", ""]
        for t in sec.tables:
            out.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
            out.append("|" + "|".join("---" for _ in t.header) + "|")
            for i, row in enumerate(t.rows):
                cells = [f"**{_md_cell(c)}**" if i in t.highlight and c else _md_cell(c) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            if t.caption:
                out += ["", f"_{t.caption}_"]
            out.append("")
        for f in sec.figures:
            out += [f"![{f.name}]({f.name})", "", f"_{f.caption}_", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- entry points


def write_report(experiment: str, *, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 optuna_storage: str | None = None, log_to_mlflow: bool = True) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` with its PNG figures, and ``report.json`` (every number
    at full precision) for an MLflow experiment to ``out_dir`` (default ``reports/<experiment>/`` under the working
    directory), log them to the experiment's newest parent run (or a new run named ``report``), and return the
    HTML path. Missing pieces (no evaluation, one seed, no Optuna study) become notes, never errors."""
    data = load_experiment(experiment, tracking_uri)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "reports" / _slug(experiment)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("fig_*.png"):  # figures of a previous report that this one may not redraw
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="harness-report-") as work:
        rep = _Report(data, Path(work), optuna_storage)
        builders = [rep.overview, rep.verdict, rep.gate_shapes, rep.training_curves, rep.accuracy_table, rep.paired,
                    rep.tau_sensitivity, rep.optuna_section]
        sections = []
        for build in builders:
            try:
                sections.append(build())
            except Exception as exc:  # one broken section must not cost the others
                log.exception("report section %s failed", build.__name__)
                sections.append(Section(build.__name__.replace("_", " "),
                                        notes=[f"This section failed: {type(exc).__name__}: {exc}"]))
    # The verdict goes first, right under the title; the overview follows it.
    sections[0], sections[1] = sections[1], sections[0]
    title = f"Gate comparison report: {experiment}"
    meta = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow {_mask(data.tracking_uri)}, experiment "
            f"id {data.experiment_id}; every number is read from MLflow (metrics, histories, per-sample artifacts) "
            "or the Optuna study.")
    for sec in sections:
        for f in sec.figures:
            (out / f.name).write_bytes(f.png)
    html_path = out / "report.html"
    html_path.write_text(render_html(title, sections, meta), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(title, sections, meta), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(rep.json, indent=2, default=_json_default), encoding="utf-8")
    if log_to_mlflow:
        _log_report(data, out)
    return html_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _log_report(data: ExperimentData, out: Path) -> str:
    """Log the report files to the newest parent (sweep/tune) run, or to a new run named ``report``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=data.tracking_uri)
    parents = data.runs[data.runs["tags.sweep"].notna()]
    if not parents.empty:
        run_id = str(parents.sort_values("start_time", ascending=False).iloc[0]["run_id"])
    else:
        run_id = client.create_run(data.experiment_id, run_name="report", tags={REPORT_TAG: "true"}).info.run_id
        client.set_terminated(run_id, "FINISHED")
    files = [p for p in out.iterdir() if p.suffix in (".html", ".md", ".json", ".png")]
    for p in files:
        client.log_artifact(run_id, str(p), artifact_path="report")
    return run_id


def main(argv: list[str] | None = None) -> int:
    """``harness report EXPERIMENT [--tracking-uri URI] [--out DIR] [--optuna-storage URL] [--no-log]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="harness report",
                                     description="Write the gate-comparison report of an MLflow experiment.")
    parser.add_argument("experiment", help="MLflow experiment name (tracking.experiment of the sweep or tuning)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the cwd)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<experiment>/)")
    parser.add_argument("--optuna-storage", default=None,
                        help="Optuna storage of the experiment's studies (default: the URL tagged on the tuning run)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out,
                            optuna_storage=args.optuna_storage, log_to_mlflow=not args.no_log)
    except ValueError as exc:
        print(f"harness report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
