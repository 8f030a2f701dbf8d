"""One ``harness tune`` trial job: train the cell in an MLflow child run, report the pruning metric to Optuna after
every step, return the outcome to the driver (which tells Optuna)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict

from harness import keys as K
from harness import tracking
from harness.cell import cell_name, check_machine, config_hash, run_tracked
from harness.sweeping.study import make_pruner, make_storage, trial_id_of
from harness.sweeping.tune_settings import objective_value, tune_settings

log = logging.getLogger(__name__)


class PruningReporter:
    """``on_step`` side of pruning: reports the moving average of one training metric to the trial and raises
    ``optuna.TrialPruned`` when the study's pruner says so (the backend then stops training)."""

    def __init__(self, trial: Any, metric: str, window: int) -> None:
        self.trial, self.metric = trial, metric
        self.values: deque[float] = deque(maxlen=window)
        self.last_step = 0

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        import optuna

        if self.metric not in metrics:
            raise ValueError(f"tune.pruning.metric={self.metric!r} is not a training metric of this backend "
                             f"(available: {', '.join(sorted(metrics))})")
        value = float(metrics[self.metric])
        if math.isfinite(value):
            self.values.append(value)
        self.last_step = step
        if not self.values:
            return
        self.trial.report(sum(self.values) / len(self.values), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} (mean of last {len(self.values)}) = "
                                     f"{sum(self.values) / len(self.values):.4g}")


def trial_task(cfg: DictConfig) -> dict[str, Any]:
    """One trial job: train the cell in an MLflow child run, report to Optuna, return the outcome to the driver
    (``{"status": "complete" | "pruned" | "failed", "value", "run_id", "reason", "seconds", "last_step"}``)."""
    import optuna
    from hydra.core.hydra_config import HydraConfig

    t0 = time.perf_counter()
    s = tune_settings(cfg)
    if s.trial_number is None or not s.storage or not s.study_name:
        raise ValueError("this job belongs to an Optuna trial: run it through `harness tune` (its sweeper sets "
                         "tune.trial_number, tune.study_name and tune.storage)")
    storage = make_storage(s.storage)
    # The job's own Study object: Trial.should_prune asks study.pruner, so it must be the configured one.
    study = optuna.load_study(study_name=s.study_name, storage=storage, pruner=make_pruner(s, int(cfg.train.steps)))
    trial = optuna.trial.Trial(study, trial_id_of(storage, s.study_name, s.trial_number))
    reporter = PruningReporter(trial, s.pruning.metric, s.pruning.window)

    store = tracking.open_store(cfg.tracking)
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.initialized() else None
    with open_dict(cfg):
        cfg.resume = False  # a trial is one fresh training run; its output_dir is unique per study and trial
    base = {"config_hash": config_hash(cfg)}
    run: Any = None
    value = math.nan

    def started(opened: Any) -> None:
        nonlocal run
        run = opened

    def finish(opened: Any, summary: dict[str, Any]) -> None:
        nonlocal value
        value = objective_value(summary, s.objective)
        opened.log_metrics({K.TUNE_OBJECTIVE: value})
        opened.set_tags({K.TAG_OPTUNA_STATE: "COMPLETE"})

    try:
        check_machine(cfg)  # a submitted trial's GPUs and memory: its driver could not see them
        # A pruned run ends KILLED, not FINISHED: a sweep must not take it as the finished cell of its config.
        run_tracked(cfg, store, run_name=f"trial{s.trial_number}-{cell_name(cfg)}",
                    parent_run_id=tracking.read_parent(sweep_dir),
                    extra_tags={K.TAG_STUDY: s.study_name, K.TAG_TRIAL: str(s.trial_number)}, on_step=reporter,
                    stop_exceptions=(optuna.TrialPruned,), on_start=started, after=finish)
    except optuna.TrialPruned as exc:
        run.set_tags({K.TAG_OPTUNA_STATE: "PRUNED", K.TAG_PRUNED_AT_STEP: str(reporter.last_step)})
        return {**base, "status": "pruned", "run_id": run.run_id, "reason": str(exc),
                "last_step": reporter.last_step, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # recorded FAILED in MLflow (cell_run) and FAIL in Optuna (driver); the study goes on
        log.exception("trial %s of %s failed", s.trial_number, s.study_name)
        return {**base, "status": "failed", "run_id": run.run_id if run is not None else None,
                "reason": f"{type(exc).__name__}: {exc}", "last_step": reporter.last_step,
                "seconds": time.perf_counter() - t0}
    return {**base, "status": "complete", "value": value, "run_id": run.run_id, "last_step": reporter.last_step,
            "seconds": time.perf_counter() - t0}
