"""Gate sweeps: every gate × temperature × seed cell as a Hydra multirun job.

``harness sweep [NAME] [overrides]`` composes ``sweeps/NAME.yaml`` (default ``gates``), which
includes ``conf/run.yaml`` and selects :class:`GateSweeper` as the Hydra sweeper. The sweeper

1. expands the cells (smooth gates over the τ grid, ``clip`` once at its ε, times seeds, times any
   comma-separated command-line overrides),
2. composes and validates every cell's config before any compute starts,
3. creates the MLflow store, the experiment and one parent run in the driver (NOTES.md: a fresh
   SQLite store migrated by several processes at once crashes),
4. hands the cells to the configured Hydra launcher (basic, joblib, submitit) in batches,
5. prints a summary of finished / skipped / failed cells and writes the report.

Each job runs :func:`cell_task`: a cell whose config hash already has a FINISHED run is skipped; a
cell that raises (including a NaN loss) is recorded FAILED with its reason and the sweep goes on.
Cells write to ``<cells_dir>/<gate>-<config hash>`` and resume from their last checkpoint, so a
killed sweep re-run completes only what is missing.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness import tracking
from harness.app import REPO_ROOT, run_cell, validate_cell

log = logging.getLogger(__name__)
SWEEPS_DIR = REPO_ROOT / "sweeps"
TAU_MODES = ("tied", "separate")


@dataclass
class GateSweeperConf:
    """``hydra.sweeper`` node of the gate sweeps (see sweeps/gates.yaml)."""

    _target_: str = "hydra_plugins.harness_sweepers.GateSweeper"
    gates: list[str] = field(default_factory=lambda: ["sigmoid", "erf", "arctan", "softsign", "clip"])
    taus: list[float] = field(default_factory=lambda: [1.0, 4.0])  # smooth gates' τ grid (τ_pos)
    tau_mode: str = "tied"  # tied: τ_neg = τ·tau_neg_scale | separate: τ_pos grid × tau_neg grid
    tau_neg_scale: float = 1.05
    tau_neg: list[float] = field(default_factory=list)  # τ_neg grid for tau_mode=separate
    seeds: list[int] = field(default_factory=lambda: [0])
    max_batch_size: int | None = None  # cells handed to the launcher at once (None: all)
    report: bool = True  # write reports/<experiment>/ when the sweep ends


def cell_overrides(gates: Sequence[str], taus: Sequence[float], seeds: Sequence[int], *, tau_mode: str = "tied",
                   tau_neg_scale: float = 1.05, tau_neg: Sequence[float] = ()) -> list[list[str]]:
    """The override list of every cell. ``clip`` ignores τ, so it gets one cell per seed."""
    if tau_mode not in TAU_MODES:
        raise ValueError(f"hydra.sweeper.tau_mode must be one of {', '.join(TAU_MODES)}, got {tau_mode!r}")
    if tau_mode == "separate" and not tau_neg:
        raise ValueError("hydra.sweeper.tau_mode=separate needs a hydra.sweeper.tau_neg grid")
    if not gates or not seeds:
        raise ValueError("hydra.sweeper.gates and hydra.sweeper.seeds must not be empty")
    cells = []
    for gate, seed in itertools.product(gates, seeds):
        base = [f"gate={'custom' if ':' in gate else gate}", f"seed={seed}"]
        if ":" in gate:
            base.append(f"gate.name={gate}")
        if gate == "clip":
            cells.append(base)
            continue
        if not taus:
            raise ValueError("hydra.sweeper.taus must not be empty when a smooth gate is swept")
        if tau_mode == "tied":
            pairs = [(t, round(t * tau_neg_scale, 10)) for t in taus]
        else:
            pairs = list(itertools.product(taus, tau_neg))
        cells += [[*base, f"gate.tau_pos={tp}", f"gate.tau_neg={tn}"] for tp, tn in pairs]
    return cells


def expand_arguments(arguments: Sequence[str]) -> list[list[str]]:
    """Cartesian product of command-line overrides (``a=1,2 b=x`` → two override lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([f"{key}={ov.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


class GateSweeperImpl:
    """Hydra Sweeper (registered as ``hydra_plugins.harness_sweepers.GateSweeper``)."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        p = self.params
        cells = cell_overrides(p["gates"], p["taus"], p["seeds"], tau_mode=p["tau_mode"],
                               tau_neg_scale=p["tau_neg_scale"], tau_neg=p["tau_neg"])
        jobs = [cell + extra for cell in cells for extra in expand_arguments(arguments)]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)

        # Compose and validate every cell before any compute (a typo fails in seconds, not hours).
        composed = [self.hydra_context.config_loader.load_sweep_config(self.config, job) for job in jobs]
        for cfg in composed:
            validate_cell(cfg)
        first = composed[0]
        log.info("sweep of %d cells -> MLflow experiment %r at %s", len(jobs), first.tracking.experiment,
                 tracking.tracking_uri(first.tracking))
        experiment_id = tracking.prepare(first.tracking)
        _prebuild_models(composed)
        parent = tracking.start_parent(experiment_id, name=f"sweep-{sweep_dir.name}",
                                       tags={"sweep": str(self.config.get("sweep_name", "gates")),
                                             "cells": str(len(jobs))})
        (sweep_dir / tracking.PARENT_FILE).write_text(parent)

        returns = []
        batch = p.get("max_batch_size") or len(jobs)
        t0 = time.perf_counter()
        for start in range(0, len(jobs), batch):
            returns += list(self.launcher.launch(jobs[start:start + batch], initial_job_idx=start))
        results = [_job_result(r, job) for r, job in zip(returns, jobs, strict=True)]
        summary = summarize(results, time.perf_counter() - t0)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps({"summary": summary, "cells": results}, indent=2))
        tracking.end_parent(parent, summary)
        print(format_summary(summary, results))
        if p.get("report", True):
            _write_report(first)
        return returns


def _prebuild_models(composed: Sequence[DictConfig]) -> None:
    """Build the embedded model once in the driver, so parallel cells only load it."""
    from harness.models import resolve_model_path

    seen = set()
    for cfg in composed:
        key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))


def _job_result(ret: Any, job: list[str]) -> dict[str, Any]:
    try:
        value = ret.return_value  # re-raises if the job itself crashed outside cell_task
    except Exception as exc:  # the sweep records every failure and goes on
        value = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {"overrides": " ".join(job), **(value or {"status": "failed", "reason": "no return value"})}


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


def _write_report(cfg: DictConfig) -> None:
    try:
        from harness.reporting import write_report
    except ImportError:
        return
    try:
        out = write_report(cfg.tracking.experiment, tracking_uri=tracking.tracking_uri(cfg.tracking))
        print(f"report: {out}")
    except Exception as exc:  # a report failure must not lose the sweep's results
        log.exception("report failed: %s", exc)


def cell_task(cfg: DictConfig) -> dict[str, Any]:
    """One sweep job: skip if finished, else train → evaluate → log, recording failures."""
    from hydra.core.hydra_config import HydraConfig

    t0 = time.perf_counter()
    chash = tracking.config_hash(cfg)
    name = cell_name(cfg)
    experiment_id = tracking.prepare(cfg.tracking)
    done = tracking.finished_run(experiment_id, chash)
    if done is not None:
        log.info("skip %s: FINISHED run %s has config hash %s", name, done, chash)
        return {"status": "skipped", "run_id": done, "config_hash": chash, "seconds": time.perf_counter() - t0}
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.initialized() else None
    with open_dict(cfg):
        cfg.output_dir = str(Path(cfg.cells_dir) / f"{name}-{chash}")
        cfg.resume = True
    run_id = None
    try:
        with tracking.cell_run(cfg, experiment_id=experiment_id, run_name=name,
                               parent_run_id=tracking.read_parent(sweep_dir) if sweep_dir else None) as run:
            run_id = run.info.run_id
            tracking.supersede_stale_runs(experiment_id, chash, run_id)
            summary = run_cell(cfg, on_step=tracking.log_step)
            tracking.log_cell(summary, Path(cfg.output_dir))
    except Exception as exc:  # recorded FAILED (tag failure_reason); the sweep goes on
        log.exception("cell %s failed", name)
        return {"status": "failed", "run_id": run_id, "config_hash": chash, "reason": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    return {"status": "finished", "run_id": run_id, "config_hash": chash, "seconds": time.perf_counter() - t0}


def cell_name(cfg: DictConfig) -> str:
    g = cfg.gate
    gate = str(g.name).split(":")[-1]
    if g.name == "clip":
        return f"clip-e{g.eps_low:g}-{g.eps_high:g}-s{cfg.seed}"
    return f"{gate}-t{g.tau_pos:g}-{g.tau_neg:g}-s{cfg.seed}"


def sweep_main(argv: list[str]) -> int:
    """``harness sweep [NAME] [overrides]``: run ``sweeps/NAME.yaml`` (default: gates)."""
    from harness.app import hydra_entry

    name = "gates"
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    available = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    if name not in available:
        print(f"harness sweep: unknown sweep {name!r}; available in {SWEEPS_DIR}: {', '.join(available)}")
        return 2
    return hydra_entry(SWEEPS_DIR, name, cell_task, ["-m", *argv], f"harness sweep {name}")
