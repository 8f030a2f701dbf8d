"""Gate sweeps: every gate × temperature × seed cell as a Hydra multirun job.

``harness sweep [NAME] [overrides]`` composes ``sweeps/NAME.yaml`` (default ``gates``), which includes
``conf/run.yaml`` and selects :class:`GateSweeperImpl` as the Hydra sweeper. The sweeper

1. expands the cells (:mod:`harness.sweeping.grid`: smooth gates over the τ grid, ``clip`` once at its ε, times
   seeds, times the staleness levels, times any comma-separated command-line overrides, plus the adaptive-τ cells
   and one baseline job),
2. composes and validates every cell's config before any compute starts,
3. creates the MLflow store, the experiment and one parent run in the driver,
4. hands the cells to the configured Hydra launcher (basic, joblib, submitit) in batches,
5. prints a summary of finished / skipped / failed cells and writes the report.

Each job runs :func:`cell_task`: a cell whose config hash already has a FINISHED run is skipped; a cell that
raises (including a NaN loss) is recorded FAILED with its reason and the sweep goes on. Cells write to
:func:`harness.cell.cell_dir` and resume from their last checkpoint, so a killed sweep re-run completes only what
is missing.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness import tracking
from harness.backends.common import num_processes
from harness.cell import cell_dir, cell_name, check_machine, config_hash, local_result, run_tracked, upload_cell
from harness.config import config_errors
from harness.launch import gpu_slot, launches, run_launched, visible_gpus
from harness.sweeping.base import SweeperBase, expand_arguments, job_result
from harness.sweeping.grid import (
    TAU_MODES,
    TIED_TAU_NEG_SCALE,
    adaptive_overrides,
    baseline_jobs,
    cell_overrides,
    check_gate_overrides,
    for_the_cells_gate,
)

log = logging.getLogger(__name__)


@dataclass
class GateSweeperConf:
    """``hydra.sweeper`` node of the gate sweeps (see sweeps/gates.yaml)."""

    _target_: str = "hydra_plugins.harness_sweepers.GateSweeper"
    gates: list[str] = field(default_factory=lambda: ["sigmoid", "erf", "arctan", "softsign", "clip"])
    taus: list[float] = field(default_factory=lambda: [10.0])  # smooth gates' τ grid (τ_pos)
    tau_mode: str = "tied"  # tied: τ_neg = τ·tau_neg_scale | separate: τ_pos grid × tau_neg grid
    tau_neg_scale: float = TIED_TAU_NEG_SCALE
    tau_neg: list[float] = field(default_factory=list)  # τ_neg grid for tau_mode=separate
    # explicit [[τ_pos, τ_neg], ...]: replaces the grid (typed loosely: OmegaConf refuses ints in nested float lists)
    tau_pairs: list[Any] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Policy lags (train.staleness) that multiply the grid like seeds: [0] is the synchronous sweep (no override).
    staleness: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] = field(default_factory=dict)  # more axes: {config key: [values]}, e.g. gate.nu
    # Adaptive cells besides the grid: per smooth gate, target, seed, τ controlled toward the EUR target (starting at
    # the first τ of the grid / tau_pairs).
    eur_targets: list[float] = field(default_factory=list)
    max_batch_size: int | None = None  # cells handed to the launcher at once (None: all)
    baseline: bool = True  # also evaluate the starting checkpoint once (the report's "no RL" row)
    report: bool = True  # write reports/<experiment>/ when the sweep ends


def gate_sweeper_settings(params: dict[str, Any]) -> GateSweeperConf:
    """The typed ``hydra.sweeper`` node (unknown keys and wrong types are errors naming the key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(GateSweeperConf), params)
        settings: GateSweeperConf = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad hydra.sweeper node: {exc}") from exc
    if not settings.staleness or any(k < 0 for k in settings.staleness):
        raise ValueError(f"hydra.sweeper.staleness must be a non-empty list of integers >= 0, got {settings.staleness}")
    if settings.tau_mode not in TAU_MODES:
        raise ValueError(f"hydra.sweeper.tau_mode must be one of {', '.join(TAU_MODES)}, got {settings.tau_mode!r}")
    return settings


class GateSweeperImpl(SweeperBase):
    """Hydra Sweeper (registered as ``hydra_plugins.harness_sweepers.GateSweeper``)."""

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        with config_errors():  # every check before any compute: a bad value exits 2 with one line
            p = gate_sweeper_settings(self.params)
            cells = cell_overrides(p.gates, p.taus, p.seeds, tau_mode=p.tau_mode, tau_neg_scale=p.tau_neg_scale,
                                   tau_neg=p.tau_neg, tau_pairs=p.tau_pairs)
            cells += adaptive_overrides(p.gates, p.taus, p.seeds, p.eur_targets, tau_mode=p.tau_mode,
                                        tau_neg_scale=p.tau_neg_scale, tau_neg=p.tau_neg, tau_pairs=p.tau_pairs)
            axes = [[f"{key}={v}" for v in values] for key, values in p.axes.items()]
            if p.staleness != [0]:
                axes.append([f"train.staleness={k}" for k in p.staleness])
            extras = expand_arguments(arguments)
            for extra in extras:
                check_gate_overrides(cells, extra)
            jobs = [cell + for_the_cells_gate(cell, [*axis, *extra]) for cell in cells
                    for axis in itertools.product(*axes) for extra in extras]
            composed = self.compose_checked(jobs)
            check_gpus_per_task(self.config, composed)
            baselines: list[list[str]] = []
            if p.baseline:
                baselines = baseline_jobs(jobs, composed)
                jobs, composed = baselines + jobs, self.compose_checked(baselines) + composed
        first = composed[0]
        log.info("sweep of %d cells -> MLflow experiment %r at %s", len(jobs), first.tracking.experiment,
                 tracking.tracking_uri(first.tracking))
        store, parent = self.open(composed, name=f"sweep-{self.sweep_dir.name}",
                                  tags={"sweep": str(self.config.get("sweep_name", "gates")), "cells": str(len(jobs))})

        returns = []
        batch = p.max_batch_size or len(jobs)
        t0 = time.perf_counter()
        # Cells of several GPUs side by side hold shares of the GPUs; the baselines (one process, on the first GPU)
        # run before them, not beside them.
        alone = any(launches(c) for c in composed) and cells_at_once(self.config.hydra.launcher) > 1
        batches = job_batches(jobs, batch, first=len(baselines) if alone else 0)
        with self.killed_closes_parent(store, parent):  # SIGTERM/Ctrl-C: the parent and its running cells -> KILLED
            for jobs_at_once in batches:
                returns += self.launch(jobs_at_once)
        results = [job_result(r, job) for r, job in zip(returns, jobs, strict=True)]
        summary = summarize(results, time.perf_counter() - t0)
        (self.sweep_dir / "sweep_summary.json").write_text(json.dumps({"summary": summary, "cells": results},
                                                                      indent=2))
        tracking.end_parent(store, parent, summary)
        print(format_summary(summary, results, tracking.mask_url(store.uri)))
        if p.report:
            self.write_report(first, store)
        self.raise_if_incomplete(summary)  # after the summary: failed cells exit 1, results awaiting upload exit 3
        return returns


def job_batches(jobs: Sequence[Any], size: int, *, first: int = 0) -> list[list[Any]]:
    """The jobs in the batches handed to the launcher one after another: the first ``first`` jobs alone, then the
    rest ``size`` at a time."""
    batches = [list(jobs[:first])] if first else []
    return batches + [list(jobs[start:start + size]) for start in range(first, len(jobs), size)]


def check_gpus_per_task(config: DictConfig, composed: Sequence[DictConfig]) -> None:
    """Multi-process cells must get their GPUs, checked before any compute. A launcher that gives each job a fixed
    number (SLURM's ``gpus_per_node``) must give every cell as many as it starts processes: the task asks for the
    sweep's ``backend.num_processes``, so a cell given more by its own overrides (an axis over it) is refused. Cells
    run side by side on this machine (``hydra.launcher.n_jobs``) must not need more GPUs together than it has, and
    one-process cells (on the first GPU) may not run beside multi-process ones (which hold shares of the GPUs)."""
    launcher = (config.get("hydra") or {}).get("launcher", {})
    most = max((num_processes(cfg) for cfg in composed), default=1)
    at_once = cells_at_once(launcher)
    if most > 1 and at_once > 1 and launcher.get("gpus_per_node") is None:
        import torch

        gpus = torch.cuda.device_count()
        if gpus and at_once * most > gpus:
            raise ValueError(f"hydra.launcher.n_jobs={launcher.get('n_jobs')} runs {at_once} cells at once, each on "
                             f"up to backend.num_processes={most} GPUs, but this machine has {gpus}: run them one "
                             "after another (hydra/launcher=local) or lower hydra.launcher.n_jobs")
        if gpus and any(num_processes(cfg) == 1 for cfg in composed):
            raise ValueError(f"hydra.launcher.n_jobs={launcher.get('n_jobs')} would run cells of one process (on the "
                             "first GPU) beside cells of several, which hold shares of the GPUs: give every cell "
                             "backend.num_processes > 1, or run them one after another (hydra/launcher=local)")
    gpus = launcher.get("gpus_per_node")
    if gpus is None:
        return
    for cfg in composed:
        if num_processes(cfg) > int(gpus):
            raise ValueError(f"a cell asks for backend.num_processes={num_processes(cfg)} but each launcher task gets "
                             f"hydra.launcher.gpus_per_node={gpus} GPU(s): set backend.num_processes for the whole "
                             "sweep (the task size follows it) or raise hydra.launcher.gpus_per_node")


def cells_at_once(launcher: Any) -> int:
    """How many cells the launcher runs side by side on this machine: ``n_jobs`` (joblib's: -1 is one per CPU, -2
    all CPUs but one, ...), 1 for a launcher without it."""
    n = int(launcher.get("n_jobs", 1) or 1)
    if n < 0:
        from joblib import effective_n_jobs

        return max(1, int(effective_n_jobs(n)))
    return n


def gpus_of_this_job(cfg: DictConfig, sweep_dir: str | None) -> AbstractContextManager[str | None]:
    """A multi-process cell's GPUs when ``hydra.launcher.n_jobs`` cells run side by side on this machine: a share of
    its GPUs no other running cell holds (:func:`harness.launch.gpu_slot`). None (the job's own GPUs) for one cell at
    a time, a SLURM task (its GPUs are its own), or a CPU."""
    from hydra.core.hydra_config import HydraConfig

    at_once = cells_at_once(HydraConfig.get().launcher if HydraConfig.initialized() else {})
    visible = visible_gpus() if at_once > 1 and sweep_dir is not None and not _uses_cpu(cfg) else []
    if not visible:
        return nullcontext(None)
    return gpu_slot(Path(sweep_dir) / ".gpu_slots", at_once, num_processes(cfg), visible)


def _uses_cpu(cfg: DictConfig) -> bool:
    import torch

    return str(cfg.backend.get("device", "auto")) == "cpu" or not torch.cuda.is_available()


STATUSES = ("finished", "skipped", "uploaded", "pending", "failed")  # pending: done before, still awaiting upload


def summarize(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    counts = {s: sum(r["status"] == s for r in results) for s in STATUSES}
    awaiting = sum(bool(r.get("pending_upload")) for r in results)
    return {**counts, "awaiting_upload": awaiting, "cells": len(results), "seconds": round(seconds, 1)}


def format_summary(summary: dict[str, Any], results: Sequence[dict[str, Any]], uri: str = "") -> str:
    more = "".join(f", {summary[k]} {k.replace('_', ' ')}" for k in ("uploaded", "pending", "awaiting_upload")
                   if summary.get(k))
    lines = [f"sweep: {summary['cells']} cells — {summary['finished']} finished, {summary['skipped']} skipped, "
             f"{summary['failed']} failed{more} ({summary['seconds']} s)"]
    for r in results:
        extra = f" — {r.get('reason')}" if r["status"] == "failed" else ""
        if r.get("pending_upload"):
            extra += f" — awaits upload ({r['pending_upload']})"
        lines.append(f"  {r['status']:8s} {r['overrides']}{extra}")
    if summary.get("awaiting_upload"):
        lines.append(f"{summary['awaiting_upload']} cell(s) await upload to tracking.uri={uri}: their results are in "
                     "their cell directories; once the store answers, run the same command again to upload them "
                     "without retraining")
    return "\n".join(lines)


def cell_task(cfg: DictConfig) -> dict[str, Any]:
    """One sweep job: skip if finished; upload if it finished locally while the store was away; else train →
    evaluate → log, recording failures. A store that does not answer never stops the cell (it then awaits upload)."""
    from hydra.core.hydra_config import HydraConfig

    t0 = time.perf_counter()
    chash = config_hash(cfg)
    name = cell_name(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(cell_dir(cfg, chash))
        cfg.resume = True
    store = tracking.open_store_or_offline(cfg.tracking)
    done = None
    if store.online:
        try:
            done = tracking.finished_run(store, chash)
        except Exception as exc:  # it stopped answering: train (or keep) the cell without it
            store.error = tracking.describe(exc)
    if done is not None:
        log.info("skip %s: FINISHED run %s has config hash %s", name, done, chash)
        tracking.clear_pending(cfg.output_dir)
        return {"status": "skipped", "run_id": done, "config_hash": chash, "seconds": time.perf_counter() - t0}
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.initialized() else None
    if local_result(cfg.output_dir):  # trained and evaluated before, but its run is missing or incomplete
        if store.online:
            run_id, uploaded = upload_cell(cfg, store, run_name=name, parent_run_id=tracking.read_parent(sweep_dir))
        else:
            run_id, uploaded = (tracking.read_pending(cfg.output_dir) or {}).get("run_id"), False
        log.info("%s %s from %s", "uploaded" if uploaded else "still awaiting upload:", name, cfg.output_dir)
        return {"status": "uploaded" if uploaded else "pending", "run_id": run_id, "config_hash": chash,
                "seconds": time.perf_counter() - t0, **({} if uploaded else {"pending_upload": store.error})}
    run_id = None

    def remember(run: Any) -> None:
        nonlocal run_id
        run_id = run.run_id

    try:
        check_machine(cfg)  # a submitted cell's GPUs, DeepSpeed and memory: its driver could not see them
        if launches(cfg):  # backend.num_processes > 1: this job starts the cell's ranks and waits for them
            with gpus_of_this_job(cfg, sweep_dir) as devices:
                run_id, summary = run_launched(cfg, store, run_name=name,
                                               parent_run_id=tracking.read_parent(sweep_dir), supersede_stale=True,
                                               devices=devices)
        else:
            run_id, summary = run_tracked(cfg, store, run_name=name, parent_run_id=tracking.read_parent(sweep_dir),
                                          supersede_stale=True, on_start=remember)
    except Exception as exc:  # recorded FAILED (tag failure_reason); the sweep goes on
        log.exception("cell %s failed", name)
        run_id = getattr(exc, "run_id", run_id)  # a failed launch names the run its rank 0 logged
        return {"status": "failed", "run_id": run_id, "config_hash": chash, "reason": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    pending = {"pending_upload": summary["pending_upload"]} if summary.get("pending_upload") else {}
    return {"status": "finished", "run_id": run_id, "config_hash": chash, "seconds": time.perf_counter() - t0,
            **pending}
