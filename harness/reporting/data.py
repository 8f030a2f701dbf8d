"""What a report reads: the runs of one MLflow experiment, through an explicit ``MlflowClient``.

A *cell* is the latest FINISHED run of one config hash; a *group* is the cells that differ only in the seed (gate ×
τ × everything else), which is what tables and curves aggregate over. Every metric a section reads goes through
:meth:`ExperimentData.metric_column` or :meth:`ExperimentData.history` by a name built with :mod:`harness.keys`, and
is recorded in :attr:`ExperimentData.keys_read` (``tests/test_keys.py`` checks those against a real cell).

What several sections share is computed here once, on first use, and kept: the accuracies
(:attr:`ExperimentData.acc`), the paired comparisons of the verdict (:attr:`ExperimentData.verdict_comparisons`,
which the power section and ``harness report --power`` read as well) and the run counts of the report's head.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import keys as K
from harness.evaluation.settings import POOLED_BENCHMARKS
from harness.gates import RATIO_CONTROL, has_temperature
from harness.reporting.comparisons import power_of
from harness.stats import interquartile_mean, per_problem_correct, seed_interval, split_problems, two_stage_interval
from harness.verdict import Arm, compare_arms, gate_verdict

BASELINE = "base"  # harness.cell.BASELINE_GATE: the starting checkpoint's evaluation, no RL
GATE_ORDER = (BASELINE, "sigmoid", "erf", "arctan", "softsign", "softsign_abs", *RATIO_CONTROL)
# Column order of benchmarks (others follow alphabetically); "aime" is AIME24 + AIME25 pooled.
BENCH_ORDER = ("arith", "gsm8k", "math500", "aime24", "aime25", "aime")


def float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


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
    nu: float | None = None  # tail index of the student gate family
    schedule: str = "constant"  # gate.tau_schedule: constant | linear | cosine | eur_target
    params: str = ""  # a ratio-control method's own keys, "clip_c=3" (the gate_params tag)

    @property
    def fixed_tau(self) -> bool:
        """A smooth gate that ran at one (τ_pos, τ_neg) throughout."""
        return self.smooth and self.schedule == "constant"

    @property
    def run_ids(self) -> list[str]:
        return list(self.runs["run_id"])

    @property
    def seeds(self) -> list[str]:
        return [str(s) for s in self.runs.get(f"tags.{K.TAG_SEED}", pd.Series(dtype=str)).tolist()]

    @property
    def smooth(self) -> bool:
        return self.gate != BASELINE and has_temperature(self.gate)

    @property
    def is_baseline(self) -> bool:
        return self.gate == BASELINE

    @property
    def staleness(self) -> int:
        """The policy lag its rollouts ran at (``train.staleness``; 0 for runs logged before the tag existed)."""
        value = float_or_none(self.runs.iloc[0].get(f"tags.{K.TAG_STALENESS}")) if not self.runs.empty else None
        return int(value or 0)


def runs_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """MLflow runs as one row each: ``run_id``, ``status``, ``start_time`` and ``metrics.<key>`` (latest value),
    ``params.<key>``, ``tags.<key>`` columns (the layout of ``mlflow.search_runs``)."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run_id": r.info.run_id, "status": r.info.status,
                               "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
                               "artifact_uri": r.info.artifact_uri}
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "status", "start_time"])


def group_params(row: pd.Series) -> dict[str, str]:
    return {k[len("params."):]: v for k, v in row.items()
            if k.startswith("params.") and isinstance(v, str)
            and not k[len("params."):].startswith(K.GROUP_IGNORED_PREFIXES)}


def group_cells(cells: pd.DataFrame) -> list[Group]:
    """Cells that differ only in the seed form one group; labels name the gate and τ (or ε), plus any other
    parameter that tells two groups with the same gate and τ apart."""
    by_key: dict[str, list[int]] = {}
    params: dict[str, dict[str, str]] = {}
    for i, row in cells.iterrows():
        p = group_params(row)
        key = json.dumps(p, sort_keys=True) if p else str(row.get(f"tags.{K.TAG_CONFIG_HASH}"))
        by_key.setdefault(key, []).append(i)
        params[key] = p
    groups = []
    for key, idx in by_key.items():
        rows = cells.loc[idx]
        first = rows.iloc[0]
        gate = str(first.get(f"tags.{K.TAG_GATE}") or "?")
        tp, tn = float_or_none(first.get(f"tags.{K.TAG_TAU_POS}")), float_or_none(first.get(f"tags.{K.TAG_TAU_NEG}"))
        el, eh = float_or_none(first.get(f"tags.{K.TAG_EPS_LOW}")), float_or_none(first.get(f"tags.{K.TAG_EPS_HIGH}"))
        eps = (el, eh) if el is not None and eh is not None else None
        nu = float_or_none(first.get(f"tags.{K.TAG_NU}"))
        schedule = str(first.get(f"tags.{K.TAG_TAU_SCHEDULE}") or "constant")
        own = str(first.get(f"tags.{K.TAG_GATE_PARAMS}") or "")
        if gate == BASELINE:
            label = "base model (no RL)"
        elif not has_temperature(gate):
            label = " ".join(x for x in (gate, f"ε={el:g}/{eh:g}" if eps else "", own) if x)
        else:
            name = gate.split(":")[-1] + ("" if nu is None else f" ν={nu:g}")
            label = f"{name} τ={tp:.3g}/{tn:.3g}" if tp is not None and tn is not None else name
            if schedule == "eur_target":
                label = f"{name} EUR→{float_or_none(first.get(f'tags.{K.TAG_EUR_TARGET}')):g}"
            elif schedule != "constant":
                start = float_or_none(first.get(f"params.{K.PARAM_TAU_START}")) or tp
                end = float_or_none(first.get(f"params.{K.PARAM_TAU_END}")) or tp
                label = f"{name} τ {start:g}→{end:g} ({schedule})"
        groups.append(Group(key, label, gate, tp, tn, eps,
                            rows.sort_values(f"tags.{K.TAG_SEED}").reset_index(drop=True), nu, schedule, own))
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
    order = {name: i for i, name in enumerate(GATE_ORDER)}
    return sorted(groups, key=lambda g: (order.get(g.gate, 99), g.gate, g.tau_pos or 0.0, g.tau_neg or 0.0, g.label))


@dataclass
class ExperimentData:
    """One experiment's runs, cells and groups, and the reads of everything else a section needs."""

    name: str
    experiment_id: str
    tracking_uri: str
    client: Any  # mlflow.tracking.MlflowClient
    runs: pd.DataFrame  # every run of the experiment but report holders
    cells: pd.DataFrame  # latest FINISHED run per config hash
    groups: list[Group]
    benchmarks: list[str]
    work: Path  # where artifacts are downloaded to
    optuna_storage: str | None = None  # the studies' storage when given (else the one tagged on the tuning run)
    keys_read: set[str] = field(default_factory=set)
    acc: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (group key, bench) -> accuracy
    _samples: dict[tuple[str, str], list[dict[str, Any]] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for g in self.groups:
            for b in self.benchmarks:
                row = self.group_accuracy(g, b)
                if row is not None:
                    self.acc[(g.key, b)] = row

    # -- reads ---------------------------------------------------------------------------------------------------

    def metric_column(self, frame: pd.DataFrame, key: str) -> pd.Series | None:
        """The latest logged value of metric ``key`` per run of ``frame`` (None when no run has it)."""
        self.keys_read.add(key)
        col = f"metrics.{key}"
        return frame[col] if col in frame.columns else None

    def history(self, run_id: str, key: str) -> pd.Series:
        """Metric ``key`` of one run by step (the last value logged at each step)."""
        self.keys_read.add(key)
        try:
            hist = self.client.get_metric_history(run_id, key)
        except Exception:
            return pd.Series(dtype=float)
        if not hist:
            return pd.Series(dtype=float)
        s = pd.Series({m.step: m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))}, dtype=float)
        return s[~s.index.duplicated(keep="last")]

    def last_pass(self, row: pd.Series) -> int:
        """k of the last optimizer pass over a rollout batch that has ratio metrics (``train/it{k}/ratio_std``)."""
        ks = []
        prefix = f"metrics.{K.TRAIN}/"
        for col in row.index:
            parsed = K.parse_pass_key(col[len(prefix):]) if col.startswith(prefix) else None
            if parsed is not None and parsed[1] == K.RATIO_STD and pd.notna(row[col]):
                ks.append(parsed[0])
        return max(ks, default=1)

    def samples(self, run_id: str, bench: str) -> list[dict[str, Any]] | None:
        """Per-sample records of one run on one benchmark (the logged JSONL artifact), or None."""
        key = (run_id, bench)
        if key not in self._samples:
            try:
                # MLflow draws a progress bar per download; one per file is noise in a sweep's log.
                with contextlib.redirect_stderr(io.StringIO()):
                    path = self.client.download_artifacts(run_id, K.samples_artifact(bench), str(self.work / run_id))
                with open(path, encoding="utf-8") as fh:
                    self._samples[key] = [json.loads(line) for line in fh if line.strip()]
            except Exception:  # no artifact (save_samples=false, or an old run): the caller notes it
                self._samples[key] = None
        return self._samples[key]

    def group_problems(self, group: Group, bench: str) -> dict[str, float] | None:
        """Per-problem accuracy of a group on a benchmark, pooling the k samples of every seed."""
        records: list[dict[str, Any]] = []
        for run_id in group.run_ids:
            r = self.samples(run_id, bench)
            if r is None:
                return None
            records += r
        return per_problem_correct(records)

    # -- derived -------------------------------------------------------------------------------------------------

    def seed_problem_matrix(self, group: Group, bench: str, field: str = K.RECORD_STRICT_CORRECT
                            ) -> tuple[list[str], list[str], np.ndarray] | None:
        """The group's per-seed, per-problem accuracies on ``bench`` from the logged per-sample records: (seeds in
        numeric order, the problems every seed has, an S × n array of the mean correctness over each problem's k
        samples; strict by default, ``field=K.RECORD_CORRECT`` for lenient), or None when a run has no per-sample
        artifact."""
        per_seed: list[tuple[str, dict[str, float]]] = []
        for _, row in group.runs.iterrows():
            records = self.samples(str(row["run_id"]), bench)
            if records is None:
                return None
            per_seed.append((str(row.get(f"tags.{K.TAG_SEED}")), per_problem_correct(records, field)))
        per_seed.sort(key=lambda item: float_or_none(item[0]) if float_or_none(item[0]) is not None else math.inf)
        problems = sorted(set.intersection(*(set(p) for _, p in per_seed))) if per_seed else []
        if not problems:
            return None
        return [s for s, _ in per_seed], problems, np.array([[p[q] for q in problems] for _, p in per_seed])

    def group_accuracy(self, group: Group, bench: str, level: float = 0.95) -> dict[str, Any] | None:
        """Strict accuracy (the ``<answer>`` span, as the paper extracts) of a group on a whole benchmark with its
        95% CI, and the lenient accuracy beside it (``lenient_acc``). One seed: the evaluator's bootstrap over
        problems, exactly as logged. Several: :func:`harness.stats.two_stage_interval` on the seeds × problems matrix
        of the per-sample records (seed and problem variance both in it), plus the IQM over seeds from 4 seeds on;
        without per-sample records, :func:`harness.stats.seed_interval` of the logged per-seed intervals
        (labelled)."""
        acc_col = self.metric_column(group.runs, K.eval_key(bench, K.STRICT_ACC))
        if acc_col is None:
            return None
        rows = group.runs[acc_col.notna()]
        if rows.empty:
            return None

        def column(metric: str) -> list[float]:
            col = self.metric_column(rows, K.eval_key(bench, metric))
            return [math.nan] * len(rows) if col is None else col.astype(float).tolist()

        n_problems = self.metric_column(rows, K.eval_key(bench, K.N_PROBLEMS))
        n_total = self.metric_column(rows, K.eval_key(bench, K.N_TOTAL))
        out: dict[str, Any] = {"group": group.label, "gate": group.gate, "tau_pos": group.tau_pos,
                               "tau_neg": group.tau_neg, "benchmark": bench, "n_seeds": len(rows),
                               "run_ids": list(rows["run_id"]),
                               "n_problems": None if n_problems is None else float_or_none(n_problems.iloc[0]),
                               "n_total": None if n_total is None else float_or_none(n_total.iloc[0])}
        acc = column(K.STRICT_ACC)
        out["seed_acc"] = acc
        out["lenient_acc"] = float(np.nanmean(column(K.ACC)))
        if len(rows) == 1:
            out.update(acc=acc[0], ci_low=column(K.STRICT_ACC_CI_LOW)[0], ci_high=column(K.STRICT_ACC_CI_HIGH)[0],
                       ci_kind="bootstrap over problems (one seed)")
            return out
        matrix = self.seed_problem_matrix(group, bench)
        if matrix is None:
            out.update(seed_interval(acc, column(K.STRICT_ACC_CI_LOW), column(K.STRICT_ACC_CI_HIGH), level=level))
            out["ci_kind"] = "per-seed CIs combined (no per-sample records)"
            return out
        seeds, _, a = matrix
        ts = two_stage_interval(a, level=level)
        out.update(acc=float(np.mean(acc)), ci_low=max(0.0, ts["ci_low"]), ci_high=min(1.0, ts["ci_high"]),
                   se=ts["se"], ci_kind="two-stage (seeds, then problems)", seeds=seeds, n_common=ts["n"])
        if len(acc) >= 4:
            out["iqm"] = interquartile_mean(acc)
        return out

    @property
    def trained(self) -> list[Group]:
        """The groups that trained (every group but the starting checkpoint's)."""
        return [g for g in self.groups if not g.is_baseline]

    @property
    def baseline(self) -> Group | None:
        return next((g for g in self.groups if g.is_baseline), None)

    def selection_accuracy(self, group: Group, bench: str) -> float:
        """Strict accuracy of a group on the selection half of ``bench`` (:func:`harness.stats.split_problems`),
        over its seeds: what every choice of a configuration looks at, so the test half stays unseen. Without
        per-sample records, the logged selection-half accuracy; NaN when neither exists."""
        matrix = self.seed_problem_matrix(group, bench)
        if matrix is not None:
            selection, _ = split_problems(matrix[1])
            if selection:
                return float(matrix[2][:, [matrix[1].index(p) for p in selection]].mean())
        col = self.metric_column(group.runs, K.eval_key(bench, K.SELECTION_STRICT_ACC))
        return float(col.mean()) if col is not None and col.notna().any() else math.nan

    def best(self, bench: str, groups: Sequence[Group] | None = None) -> Group | None:
        """The trained group (among ``groups`` when given) with the highest :meth:`selection_accuracy` on
        ``bench``: a choice made on the selection half, never on the problems a difference is tested on."""
        cands = [g for g in (groups if groups is not None else self.trained) if (g.key, bench) in self.acc]
        scored = [(g, self.selection_accuracy(g, bench)) for g in cands]
        scored = [(g, v) for g, v in scored if math.isfinite(v)] or [(g, self.acc[(g.key, bench)]["acc"])
                                                                      for g in cands]
        return max(scored, key=lambda gv: gv[1])[0] if scored else None

    def score(self, g: Group) -> float:
        """How good a group is overall: mean accuracy over benchmarks, else the final training reward."""
        accs = [self.acc[(g.key, b)]["acc"] for b in self.benchmarks if (g.key, b) in self.acc]
        if accs:
            return float(sum(accs) / len(accs))
        r = self.metric_column(g.runs, K.train_key(K.REWARD))
        return float(r.mean()) if r is not None and r.notna().any() else float("-inf")

    def arm(self, group: Group, bench: str) -> Arm | None:
        """A group on ``bench`` as the verdict sees it (:class:`harness.verdict.Arm`, strict scores), or None
        without per-sample records."""
        matrix = self.seed_problem_matrix(group, bench)
        if matrix is None:
            return None
        seeds, problems, scores = matrix
        return Arm(group.label, group.gate, tuple(seeds), tuple(problems), scores)

    def compare(self, a: Group, b: Group, bench: str, *, test_half: bool = False) -> dict[str, Any] | None:
        """``a`` minus ``b`` on ``bench`` (:func:`harness.verdict.compare_arms`: problems paired, seeds paired only
        where the verdict's pairing test found a shared seed effect on this benchmark); on the test half only with
        ``test_half`` (when ``b`` or ``a`` was chosen by :meth:`best`). None without per-sample records or with fewer
        than 2 problems both have on the half compared (an interval over problems needs two)."""
        arm_a, arm_b = self.arm(a, bench), self.arm(b, bench)
        if arm_a is None or arm_b is None:
            return None
        problems = sorted(set(arm_a.problems) & set(arm_b.problems))
        if test_half:
            problems = split_problems(problems)[1]
        if len(problems) < 2:
            return None
        pairing = self.verdict["benchmarks"].get(bench, {}).get("pairing", {})
        row = compare_arms(arm_a, arm_b, problems, paired_seeds=bool(pairing.get("paired")))
        return {"benchmark": bench, "run_ids_a": a.run_ids, "run_ids_b": b.run_ids, "test_half": test_half,
                "seed_variance_included": row["ranked"], **row}

    @cached_property
    def verdict_strata(self) -> dict[str, tuple[str, int | None]]:
        """What the verdict compares the gates within, by name: each benchmark; with configurations at several policy
        lags (``train.staleness``), each benchmark at each lag (``arith at staleness 4``), so a gate's configuration
        is chosen among, and compared with, configurations that ran at the same lag."""
        lags = sorted({g.staleness for g in self.trained})
        if len(lags) < 2:
            return {b: (b, None) for b in self.benchmarks}
        return {f"{b} at staleness {k}": (b, k) for b in self.benchmarks for k in lags}

    @cached_property
    def verdict(self) -> dict[str, Any]:
        """:func:`harness.verdict.gate_verdict` over every stratum (:attr:`verdict_strata`) with per-sample records
        (pooled benchmarks reported, not tested). Computed once; the verdict, the power section, table (d) and
        ``harness report --power`` read it."""
        arms = {name: [a for g in self.trained if lag in (None, g.staleness) and (a := self.arm(g, bench)) is not None]
                for name, (bench, lag) in self.verdict_strata.items()}
        arms = {name: v for name, v in arms.items() if v}
        return gate_verdict(arms, tested=[name for name in arms
                                          if self.verdict_strata[name][0] not in POOLED_BENCHMARKS])

    @cached_property
    def verdict_comparisons(self) -> list[dict[str, Any]]:
        """Every pair of gates of the verdict, benchmark by benchmark (ranked or not, tested or pooled)."""
        return [r for info in self.verdict["benchmarks"].values() for r in info["rows"]]

    @cached_property
    def verdict_power(self) -> list[dict[str, Any]]:
        """For each comparison of the verdict's family: what its design can detect
        (:func:`harness.reporting.comparisons.power_of`)."""
        return [{**{k: r[k] for k in ("benchmark", "a", "b", "gate_a", "gate_b", "n", "design", "se")},
                 "seeds": (r["seeds_a"], r["seeds_b"]), **power_of(r)} for r in self.verdict["family"]]

    # -- what the experiment holds (the head of report.json, shown by the overview) ---------------------------------

    @cached_property
    def run_counts(self) -> dict[str, Any]:
        """Cell runs (every status) and how many ended in each status, sweep/tune parent runs, cells (latest
        FINISHED run per config hash) and configurations."""
        cell_runs = self.runs[self.runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
        status = cell_runs["status"].value_counts().to_dict() if not cell_runs.empty else {}
        return {"cell_runs": len(cell_runs), "status": status,
                "parent_runs": int(self.runs[f"tags.{K.TAG_SWEEP}"].notna().sum()), "cells": len(self.cells),
                "groups": len(self.groups)}

    @cached_property
    def run_warnings(self) -> list[tuple[str, str, str]]:
        """``(run name, run id, warning)`` of every cell that finished with a warning (e.g. no learning signal)."""
        col = f"tags.{K.TAG_WARNING}"
        warned = self.cells[self.cells[col].notna()] if col in self.cells else self.cells[:0]
        return [(str(r.get(f"tags.{K.TAG_RUN_NAME}", "")), str(r["run_id"]), str(r[col]))
                for _, r in warned.iterrows()]


def load_experiment(experiment: str, tracking_uri: str, work: Path, *,
                    optuna_storage: str | None = None) -> ExperimentData:
    """Every run of ``experiment`` and its cells grouped by configuration (``ValueError`` if it does not exist);
    ``optuna_storage``: where its Optuna studies are, when the tuning run's tag does not say (or masks it)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        raise ValueError(f"no MLflow store at {tracking_uri} (pass --tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"MLflow experiment {experiment!r} not found at {tracking_uri}; experiments: "
                         f"{', '.join(names)}")
    found, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            break
    runs = runs_frame(found)
    for tag in (K.TAG_CONFIG_HASH, K.TAG_GATE, K.TAG_REPORT, K.TAG_SWEEP, K.TAG_STUDY):
        if f"tags.{tag}" not in runs.columns:
            runs[f"tags.{tag}"] = None
    runs = runs[runs[f"tags.{K.TAG_REPORT}"].isna()]
    cells = runs[runs[f"tags.{K.TAG_CONFIG_HASH}"].notna() & (runs["status"] == "FINISHED")]
    cells = cells.sort_values("start_time", ascending=False).drop_duplicates(f"tags.{K.TAG_CONFIG_HASH}")
    cells = cells.sort_values([f"tags.{K.TAG_GATE}", "start_time"]).reset_index(drop=True)
    benches = set()
    for col in cells.columns:
        parsed = K.parse_eval_key(col[len("metrics."):]) if col.startswith("metrics.") else None
        if parsed is not None and parsed[1] == K.ACC and cells[col].notna().any():
            benches.add(parsed[0])
    order = {b: i for i, b in enumerate(BENCH_ORDER)}
    return ExperimentData(experiment, exp.experiment_id, tracking_uri, client, runs.reset_index(drop=True), cells,
                          group_cells(cells), sorted(benches, key=lambda b: (order.get(b, len(order)), b)), work,
                          optuna_storage)
