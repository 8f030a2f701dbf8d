"""Gate sweeps: every gate × temperature × seed cell as a Hydra multirun job.

``harness sweep [NAME] [overrides]`` composes ``sweeps/NAME.yaml`` (default ``gates``), which includes
``conf/run.yaml`` and selects :class:`GateSweeperImpl` as the Hydra sweeper. The sweeper

1. expands the cells (:func:`harness.cell.cell_overrides`: smooth gates over the τ grid, ``clip`` once at its ε,
   times seeds, times any comma-separated command-line overrides),
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

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness import tracking
from harness.cell import BASELINE_KEYS, TAU_MODES, cell_dir, cell_name, cell_overrides, config_hash, run_tracked
from harness.sweeper import SweeperBase, expand_arguments, job_result

log = logging.getLogger(__name__)


@dataclass
class GateSweeperConf:
    """``hydra.sweeper`` node of the gate sweeps (see sweeps/gates.yaml)."""

    _target_: str = "hydra_plugins.harness_sweepers.GateSweeper"
    gates: list[str] = field(default_factory=lambda: ["sigmoid", "erf", "arctan", "softsign", "clip"])
    taus: list[float] = field(default_factory=lambda: [1.0, 4.0])  # smooth gates' τ grid (τ_pos)
    tau_mode: str = "tied"  # tied: τ_neg = τ·tau_neg_scale | separate: τ_pos grid × tau_neg grid
    tau_neg_scale: float = 1.05
    tau_neg: list[float] = field(default_factory=list)  # τ_neg grid for tau_mode=separate
    tau_pairs: list[list[float]] = field(default_factory=list)  # explicit [[τ_pos, τ_neg], ...]: replaces the grid
    seeds: list[int] = field(default_factory=lambda: [0])
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
    if settings.tau_mode not in TAU_MODES:
        raise ValueError(f"hydra.sweeper.tau_mode must be one of {', '.join(TAU_MODES)}, got {settings.tau_mode!r}")
    return settings


class GateSweeperImpl(SweeperBase):
    """Hydra Sweeper (registered as ``hydra_plugins.harness_sweepers.GateSweeper``)."""

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        p = gate_sweeper_settings(self.params)
        cells = cell_overrides(p.gates, p.taus, p.seeds, tau_mode=p.tau_mode, tau_neg_scale=p.tau_neg_scale,
                               tau_neg=p.tau_neg, tau_pairs=p.tau_pairs)
        jobs = [cell + extra for cell in cells for extra in expand_arguments(arguments)]
        composed = self.compose_checked(jobs)
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
        for start in range(0, len(jobs), batch):
            returns += self.launch(jobs[start:start + batch])
        results = [job_result(r, job) for r, job in zip(returns, jobs, strict=True)]
        summary = summarize(results, time.perf_counter() - t0)
        (self.sweep_dir / "sweep_summary.json").write_text(json.dumps({"summary": summary, "cells": results},
                                                                      indent=2))
        tracking.end_parent(store, parent, summary)
        print(format_summary(summary, results))
        if p.report:
            self.write_report(first)
        return returns


def baseline_jobs(jobs: Sequence[list[str]], composed: Sequence[DictConfig]) -> list[list[str]]:
    """One ``role=baseline`` job per distinct (model, evaluation) among the cells that evaluate: the starting
    checkpoint, evaluated once per sweep whatever the gates, temperatures and seeds."""
    out, seen = [], set()
    for job, cfg in zip(jobs, composed, strict=True):
        if not cfg.eval.get("enabled", True):
            continue
        key = json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True) for k in BASELINE_KEYS}, sort_keys=True,
                         default=str)
        if key not in seen:
            seen.add(key)
            out.append([*job, "role=baseline"])
    return out


def summarize(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    counts = {s: sum(r["status"] == s for r in results) for s in ("finished", "skipped", "failed")}
    return {**counts, "cells": len(results), "seconds": round(seconds, 1)}


def format_summary(summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    lines = [f"sweep: {summary['cells']} cells — {summary['finished']} finished, {summary['skipped']} skipped, "
             f"{summary['failed']} failed ({summary['seconds']} s)"]
    for r in results:
        extra = f" — {r.get('reason')}" if r["status"] == "failed" else ""
        lines.append(f"  {r['status']:8s} {r['overrides']}{extra}")
    return "\n".join(lines)


def cell_task(cfg: DictConfig) -> dict[str, Any]:
    """One sweep job: skip if finished, else train → evaluate → log, recording failures."""
    from hydra.core.hydra_config import HydraConfig

    t0 = time.perf_counter()
    chash = config_hash(cfg)
    name = cell_name(cfg)
    store = tracking.open_store(cfg.tracking)
    done = tracking.finished_run(store, chash)
    if done is not None:
        log.info("skip %s: FINISHED run %s has config hash %s", name, done, chash)
        return {"status": "skipped", "run_id": done, "config_hash": chash, "seconds": time.perf_counter() - t0}
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.initialized() else None
    with open_dict(cfg):
        cfg.output_dir = str(cell_dir(cfg, chash))
        cfg.resume = True
    run_id = None

    def remember(run: Any) -> None:
        nonlocal run_id
        run_id = run.run_id

    try:
        run_id, _ = run_tracked(cfg, store, run_name=name, parent_run_id=tracking.read_parent(sweep_dir),
                                supersede_stale=True, on_start=remember)
    except Exception as exc:  # recorded FAILED (tag failure_reason); the sweep goes on
        log.exception("cell %s failed", name)
        return {"status": "failed", "run_id": run_id, "config_hash": chash, "reason": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    return {"status": "finished", "run_id": run_id, "config_hash": chash, "seconds": time.perf_counter() - t0}
