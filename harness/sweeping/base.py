"""What every harness sweeper does around its cells: compose and check them before any compute, open the store and
the parent run, build the embedded model once, hand jobs to the Hydra launcher, read the jobs' results back, and
write the report. The gate sweeper (:mod:`harness.sweeping.gate_sweeper`) and the Optuna sweeper
(:mod:`harness.sweeping.tune_sweeper`) differ only in which cells they launch.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import tracking
from harness.cell import validate_cell
from harness.config import RunIncomplete

log = logging.getLogger(__name__)


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


def job_result(ret: Any, job: Sequence[str]) -> dict[str, Any]:
    """A launched job's return value (the dict its task returned), or a ``failed`` record when the job crashed
    outside its task's own error handling; ``overrides`` names the job."""
    try:
        value = ret.return_value  # re-raises when the job itself crashed
    except Exception as exc:  # the sweep records every failure and goes on
        value = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {"overrides": " ".join(job), **(value or {"status": "failed", "reason": "no return value"})}


class SweeperBase:
    """Hydra ``Sweeper`` mechanics shared by the harness sweepers (the ``hydra_plugins`` shims add Hydra's base)."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: DictConfig | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    @property
    def sweep_dir(self) -> Path:
        assert self.config is not None
        return Path(self.config.hydra.sweep.dir)

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The run config of one job, as the launcher will compose it."""
        assert self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    @property
    def cells_run_here(self) -> bool:
        """Whether the launcher runs the cells on this machine (local, parallel) rather than submitting them to
        others (SLURM), where what the machine has (GPUs, DeepSpeed, memory) is the job's to check."""
        assert self.config is not None
        target = str((self.config.get("hydra") or {}).get("launcher", {}).get("_target_", ""))
        return not target.endswith("SlurmLauncher")

    def compose_checked(self, jobs: Sequence[Sequence[str]]) -> list[DictConfig]:
        """Compose and validate every job before any compute: a typo fails in seconds, not hours. What the machine
        must have is checked here only when the cells run here; a submitted cell's job checks it before it trains."""
        composed = [self.compose(job) for job in jobs]
        for cfg in composed:
            validate_cell(cfg, machine=self.cells_run_here)
        return composed

    def open(self, composed: Sequence[DictConfig], *, name: str, tags: dict[str, str]) -> tuple[tracking.Store, str]:
        """Check and open the store and experiment (in seconds, before any compute: an unreachable or read-only
        store fails here with one line naming ``tracking.uri``), build the embedded model once, and start the parent
        run, superseding the RUNNING parents of killed drivers; returns ``(store, parent run id)``."""
        first = composed[0]
        store = tracking.check_store(first.tracking)
        prebuild_models(composed)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = tracking.start_parent(store, name=name, tags=tags)
        tracking.write_parent(self.sweep_dir, parent)
        stale = tracking.supersede_stale_parents(store, parent)
        if stale:
            log.info("marked the parent run(s) %s of killed drivers KILLED (superseded by %s)", stale, parent)
        return store, parent

    @staticmethod
    @contextmanager
    def killed_closes_parent(store: tracking.Store, parent: str) -> Iterator[None]:
        """A driver stopped by SIGTERM (turned into ``SystemExit`` by the ``harness`` command) or Ctrl-C closes its
        parent run and the child runs still RUNNING as KILLED before it exits: no orphan RUNNING runs."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            try:
                tracking.kill_children(store, parent)
            except Exception as exc:  # the store may be what is gone; a re-run supersedes them
                log.warning("could not close the running cells of %s: %s", parent, exc)
            tracking.end_parent(store, parent, {}, status="KILLED")
            raise

    @staticmethod
    def raise_if_incomplete(summary: Mapping[str, Any], what: str = "cells") -> None:
        """After the summary is printed: :class:`harness.config.RunIncomplete` (exit 1) when something failed,
        (exit 3) when results await upload to the tracking store."""
        if summary.get("failed"):
            raise RunIncomplete(f"{summary['failed']} of {summary['cells']} {what} failed (see the summary above)")
        if summary.get("awaiting_upload"):
            raise RunIncomplete(f"{summary['awaiting_upload']} of {summary['cells']} {what} await upload to the "
                                "tracking store: run the same command again once it answers", exit_code=3)

    def launch(self, jobs: Sequence[Sequence[str]]) -> list[Any]:
        """Hand ``jobs`` to the launcher as one batch; returns the launcher's job returns."""
        returns = list(self.launcher.launch([list(j) for j in jobs], initial_job_idx=self.job_idx))
        self.job_idx += len(jobs)
        return returns

    @staticmethod
    def write_report(cfg: DictConfig, store: tracking.Store | None = None) -> None:
        """The experiment's report; a report failure must not lose the sweep's results, so it is only logged. The
        report reads MLflow: with a ``store`` that stopped answering it is left for the re-run that uploads."""
        from harness.reporting import write_report

        if store is not None and not store.online:
            print(f"report: not written: tracking.uri={tracking.mask_url(store.uri)} does not answer ({store.error}); "
                  "the sweep summary is in the sweep directory, and the same command run again uploads the cells "
                  "and writes the report")
            return
        try:
            print(f"report: {write_report(cfg.tracking.experiment, tracking_uri=tracking.tracking_uri(cfg.tracking))}")
            if store is not None and store.experiment_id is not None:
                print(tracking.ui_hint(store))
        except Exception as exc:
            log.exception("report failed: %s", exc)


def prebuild_models(composed: Sequence[DictConfig]) -> None:
    """Build the embedded model once in the driver, so parallel cells only load it."""
    from harness.models import resolve_model_path

    seen = set()
    for cfg in composed:
        key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
