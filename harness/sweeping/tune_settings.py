"""The settings of ``harness tune``: the ``tune`` node (typed, checked before any compute) and its objective."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import keys as K
from harness.sweeping.grid import TAU_MODES

PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class TauRange:
    """A search range of one temperature."""

    low: float = 0.25
    high: float = 8.0
    log: bool = True  # τ acts multiplicatively on the ratio deviation: search it on a log scale


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random
    n_startup_trials: int = 4  # TPE: random trials before the model takes over (Optuna's default 10 is most budgets)


@dataclass
class PruningConf:
    metric: str = "reward"  # a key of the backend's per-step metrics (reported to Optuna after every step)
    window: int = 5  # report the mean of the last `window` values: per-step rewards of a small batch are noisy
    n_startup_trials: int = 2  # median: no pruning until this many trials have completed
    n_warmup_steps: int = 10  # median: no pruning before this step of a trial
    interval_steps: int = 1  # median: check every this many steps
    min_resource: int = 5  # hyperband: steps of the smallest bracket
    reduction_factor: int = 3  # hyperband


@dataclass
class TuneConf:
    """The ``tune`` node of ``sweeps/tune.yaml`` (merged over these defaults; unknown keys are errors)."""

    gates: list[str] = field(default_factory=list)  # empty: the gate selected with gate=
    tau_mode: str = "tied"  # tied: τ_neg = τ_pos · tau_neg_scale (one parameter) | separate: two parameters
    tau_pos: TauRange = field(default_factory=TauRange)
    tau_neg: TauRange = field(default_factory=TauRange)
    tau_neg_scale: float = 1.05
    # The selection half of each benchmark (strict accuracy): the report tests the tuned τ on the other half.
    objective: str = "eval/mean_selection_accuracy"
    direction: str = "maximize"
    storage: str | None = None  # null: sqlite:///<cwd>/optuna.db
    study_name: str | None = None  # null: <tracking.experiment>-<gate>
    n_trials: int = 8  # TOTAL trials of each study (a resumed study only asks the missing ones)
    n_jobs: int = 1  # trials handed to the launcher at once
    seed: int = 0
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: str = "median"  # none | median | hyperband
    pruning: PruningConf = field(default_factory=PruningConf)
    stale_after_s: float = 90.0  # a RUNNING trial without a heartbeat for this long belongs to a dead driver
    heartbeat_s: float = 20.0
    report: bool = True  # write reports/<experiment>/ at the end
    # Set by the driver on every job's command line; null outside a trial.
    trial_number: int | None = None


@dataclass
class TuneSweeperConf:
    """``hydra.sweeper`` node of ``harness tune``; the settings live in the ``tune`` node of the run config."""

    _target_: str = "hydra_plugins.harness_sweepers.TuneSweeper"


def tune_settings(cfg: DictConfig | Mapping[str, Any]) -> TuneConf:
    """The validated ``tune`` node of a composed config (``ValueError`` naming the bad key)."""
    from omegaconf.errors import OmegaConfBaseException

    node = cfg.get("tune") if cfg is not None else None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TuneConf), node or {})
        s: TuneConf = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad tune node: {exc}") from exc
    if s.tau_mode not in TAU_MODES:
        raise ValueError(f"tune.tau_mode must be one of {', '.join(TAU_MODES)}, got {s.tau_mode!r}")
    for name in ("tau_pos", "tau_neg"):
        r: TauRange = getattr(s, name)
        if not (0 < r.low <= r.high) or not math.isfinite(r.high):
            raise ValueError(f"tune.{name} needs 0 < low <= high, got low={r.low} high={r.high}")
    if not s.tau_neg_scale > 0:
        raise ValueError(f"tune.tau_neg_scale must be > 0, got {s.tau_neg_scale}")
    if s.direction not in DIRECTIONS:
        raise ValueError(f"tune.direction must be one of {', '.join(DIRECTIONS)}, got {s.direction!r}")
    if s.pruner not in PRUNERS:
        raise ValueError(f"tune.pruner must be one of {', '.join(PRUNERS)}, got {s.pruner!r}")
    if s.sampler.name not in SAMPLERS:
        raise ValueError(f"tune.sampler.name must be one of {', '.join(SAMPLERS)}, got {s.sampler.name!r}")
    for key in ("n_trials", "n_jobs"):
        if getattr(s, key) < 1:
            raise ValueError(f"tune.{key} must be >= 1, got {getattr(s, key)}")
    p = s.pruning
    for key in ("window", "interval_steps", "min_resource", "reduction_factor"):
        if getattr(p, key) < 1:
            raise ValueError(f"tune.pruning.{key} must be >= 1, got {getattr(p, key)}")
    if p.reduction_factor < 2:
        raise ValueError(f"tune.pruning.reduction_factor must be >= 2, got {p.reduction_factor}")
    if not s.stale_after_s >= 0 or not s.heartbeat_s > 0:
        raise ValueError("tune.stale_after_s must be >= 0 and tune.heartbeat_s > 0")
    if s.stale_after_s and s.stale_after_s < 2 * s.heartbeat_s:
        # A live driver's trial would look stale between two heartbeats and get failed by a second driver.
        raise ValueError(f"tune.stale_after_s={s.stale_after_s} must be >= 2 x tune.heartbeat_s={s.heartbeat_s}")
    parse_objective(s.objective)
    return s


MEAN_OBJECTIVES = ((K.MEAN_SELECTION_ACCURACY,), (K.MEAN_ACCURACY,))


def parse_objective(objective: str) -> tuple[str, ...]:
    """``eval/mean_selection_accuracy`` -> ("eval", "mean_selection_accuracy"); ``eval/arith/acc`` -> ("eval",
    "arith", "acc"); ``train/reward`` -> ("train", "reward")."""
    parts = tuple(objective.split("/"))
    ok = (parts[:1] == ("train",) and len(parts) == 2) or (
        parts[:1] == ("eval",) and (parts[1:] in MEAN_OBJECTIVES or len(parts) == 3))
    if not ok or not all(parts):
        raise ValueError(f"tune.objective={objective!r}: use eval/{K.MEAN_SELECTION_ACCURACY} (the selection half: "
                         f"the default), eval/{K.MEAN_ACCURACY}, eval/<benchmark>/<metric> or train/<metric> (the "
                         "final training step's value)")
    return parts


def check_objective(objective: str, cfg: DictConfig) -> None:
    """The objective must be something this config produces (an eval metric needs eval enabled, and the benchmark)."""
    parts = parse_objective(objective)
    if parts[0] != "eval":
        return
    if not cfg.eval.get("enabled", True):
        raise ValueError(f"tune.objective={objective} needs evaluation, but eval.enabled=false (use "
                         "tune.objective=train/reward as the cheap proxy, or enable eval)")
    if len(parts) == 3:
        benches = list(cfg.eval.benchmarks) if not isinstance(cfg.eval.benchmarks, str) else [cfg.eval.benchmarks]
        if parts[1] not in benches:
            raise ValueError(f"tune.objective={objective}: benchmark {parts[1]!r} is not in eval.benchmarks={benches}")


def objective_value(summary: Mapping[str, Any], objective: str) -> float:
    """The objective's value in a :func:`harness.cell.run_cell` summary (``KeyError`` naming what is missing)."""
    parts = parse_objective(objective)
    if parts[0] == "train":
        train = summary.get(K.TRAIN) or {}
        if parts[1] not in train:
            raise KeyError(f"objective {objective}: the final training metrics have no {parts[1]!r} "
                           f"(available: {', '.join(sorted(train))})")
        return float(train[parts[1]])
    ev = summary.get(K.EVAL)
    if ev is None:
        raise KeyError(f"objective {objective}: the cell has no evaluation (eval.enabled=false?)")
    if parts[1:] in MEAN_OBJECTIVES:
        return float(ev[parts[1]])
    bench = (ev.get("benchmarks") or {}).get(parts[1])
    if bench is None or parts[2] not in bench:
        raise KeyError(f"objective {objective}: no metric {parts[2]!r} for benchmark {parts[1]!r}")
    return float(bench[parts[2]])
