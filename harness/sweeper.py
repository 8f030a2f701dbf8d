"""What every harness sweeper does around its cells: compose and check them before any compute, open the store and
the parent run, build the embedded model once, hand jobs to the Hydra launcher, read the jobs' results back, and
write the report. The gate sweeper (:mod:`harness.sweep`) and the Optuna sweeper (:mod:`harness.tuning`) differ
only in which cells they launch.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import tracking
from harness.cell import validate_cell

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

    def compose_checked(self, jobs: Sequence[Sequence[str]]) -> list[DictConfig]:
        """Compose and validate every job before any compute: a typo fails in seconds, not hours."""
        composed = [self.compose(job) for job in jobs]
        for cfg in composed:
            validate_cell(cfg)
        return composed

    def open(self, composed: Sequence[DictConfig], *, name: str, tags: dict[str, str]) -> tuple[tracking.Store, str]:
        """Open the store and experiment (in the driver, before any worker: a fresh SQLite store migrated by
        several processes at once crashes), build the embedded model once, and start the parent run; returns
        ``(store, parent run id)``."""
        first = composed[0]
        store = tracking.open_store(first.tracking)
        prebuild_models(composed)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = tracking.start_parent(store, name=name, tags=tags)
        tracking.write_parent(self.sweep_dir, parent)
        return store, parent

    def launch(self, jobs: Sequence[Sequence[str]]) -> list[Any]:
        """Hand ``jobs`` to the launcher as one batch; returns the launcher's job returns."""
        returns = list(self.launcher.launch([list(j) for j in jobs], initial_job_idx=self.job_idx))
        self.job_idx += len(jobs)
        return returns

    @staticmethod
    def write_report(cfg: DictConfig) -> None:
        """The experiment's report; a report failure must not lose the sweep's results, so it is only logged."""
        from harness.reporting import write_report

        try:
            print(f"report: {write_report(cfg.tracking.experiment, tracking_uri=tracking.tracking_uri(cfg.tracking))}")
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
