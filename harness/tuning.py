"""Optuna temperature tuning: ``harness tune [overrides]`` searches τ_pos / τ_neg of one gate per study.

``harness tune`` composes ``sweeps/tune.yaml`` (``conf/run.yaml`` plus a ``tune:`` node) and selects
:class:`TuneSweeperImpl` (registered in ``hydra_plugins.harness_sweepers`` as ``harness_tune``) as the Hydra
sweeper, so trials run through whatever Hydra launcher is configured (basic, joblib, submitit). The driver is an
Optuna ask/tell loop:

1. Everything is validated before any compute: the ``tune`` node, the command-line overrides, and the composed
   cell config of every gate at the corners of its τ search range (``harness.app.validate_cell``).
2. One study per gate (``tune.gates``, or the gate chosen with ``gate=``), in an RDB storage (``tune.storage``;
   default ``sqlite:///optuna.db`` in the working directory, a Postgres URL for many workers), named
   ``tune.study_name`` (default ``<tracking.experiment>-<gate>``).
3. Resume: ``tune.n_trials`` is the TOTAL number of trials of the study. RUNNING trials whose heartbeat is older
   than ``tune.stale_after_s`` (a killed driver) are marked FAIL first; COMPLETE, PRUNED and FAIL trials (and
   RUNNING trials another live driver owns) count towards the total, and only the missing ones are asked. The
   sampler is seeded with ``seed + number of existing trials``, so a resumed study does not re-propose the points
   it already tried.
4. Trials are asked ``tune.n_jobs`` at a time and handed to the launcher as one batch; each job
   (:func:`trial_task`) reopens the study from the storage, builds ``optuna.trial.Trial(study, trial_id)``, trains
   the cell in an MLflow child run (tags ``study`` and ``trial``), reports a moving average of an intermediate
   training metric after every optimizer step and raises ``optuna.TrialPruned`` out of ``on_step`` when the
   pruner says so (the backend then stops). The driver tells Optuna the outcome: COMPLETE with the objective,
   PRUNED, or FAIL with the reason in the trial's user attrs.
5. At the end: best τ per gate and the trials table on stdout, ``<sweep dir>/tune_summary.json``, and the report.

The objective is a metric of the cell summary: ``eval/mean_accuracy`` (default), ``eval/<benchmark>/<metric>``,
or ``train/<key>`` (the final step's value; ``train/reward`` is the cheap proxy when ``eval.enabled=false``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness import tracking
from harness.app import REPO_ROOT, run_cell, validate_cell

log = logging.getLogger(__name__)
SWEEPS_DIR = REPO_ROOT / "sweeps"

TAU_MODES = ("tied", "separate")
PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")
HEARTBEAT_ATTR = "harness:heartbeat"  # trial system attr: unix time of the owning driver's last heartbeat
SUMMARY_FILE = "tune_summary.json"


# ----------------------------------------------------------------------------------------------------- settings


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
    objective: str = "eval/mean_accuracy"
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


def parse_objective(objective: str) -> tuple[str, ...]:
    """``eval/mean_accuracy`` -> ("eval", "mean_accuracy"); ``eval/arith/acc`` -> ("eval", "arith", "acc");
    ``train/reward`` -> ("train", "reward")."""
    parts = tuple(objective.split("/"))
    ok = (parts[:1] == ("train",) and len(parts) == 2) or (
        parts[:1] == ("eval",) and (parts[1:] == ("mean_accuracy",) or len(parts) == 3))
    if not ok or not all(parts):
        raise ValueError(f"tune.objective={objective!r}: use eval/mean_accuracy, eval/<benchmark>/<metric> or "
                         "train/<metric> (the final training step's value)")
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
    """The objective's value in a :func:`harness.app.run_cell` summary (``KeyError`` naming what is missing)."""
    parts = parse_objective(objective)
    if parts[0] == "train":
        train = summary.get("train") or {}
        if parts[1] not in train:
            raise KeyError(f"objective {objective}: the final training metrics have no {parts[1]!r} "
                           f"(available: {', '.join(sorted(train))})")
        return float(train[parts[1]])
    ev = summary.get("eval")
    if ev is None:
        raise KeyError(f"objective {objective}: the cell has no evaluation (eval.enabled=false?)")
    if parts[1] == "mean_accuracy":
        return float(ev["mean_accuracy"])
    bench = (ev.get("benchmarks") or {}).get(parts[1])
    if bench is None or parts[2] not in bench:
        raise KeyError(f"objective {objective}: no metric {parts[2]!r} for benchmark {parts[1]!r}")
    return float(bench[parts[2]])


# ------------------------------------------------------------------------------------------ optuna construction


def resolve_storage(storage: str | None, cwd: Path | None = None) -> str:
    """The storage URL jobs can open from anywhere: default ``sqlite:///<cwd>/optuna.db``; a relative SQLite path
    is made absolute (jobs of some launchers start elsewhere)."""
    cwd = Path.cwd() if cwd is None else cwd
    if not storage:
        return f"sqlite:///{cwd / 'optuna.db'}"
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        rel = storage[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return f"sqlite:///{(cwd / rel).resolve()}"
    return storage


def mask_url(url: str) -> str:
    """``url`` without its password (for tags and logs)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def make_storage(url: str) -> Any:
    """An Optuna RDB storage. SQLite gets a 60 s lock timeout: the driver (heartbeats, ask/tell) and jobs
    (intermediate values) write to one file from several processes, and SQLite's default 5 s can be too short."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_sampler(s: TuneConf, n_existing: int) -> Any:
    """A seeded sampler. The seed moves with the number of existing trials so that a resumed study draws new
    points instead of replaying the first run's sequence."""
    import optuna

    seed = s.seed + n_existing
    if s.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials asked in one batch (n_jobs > 1) see each other as pending and spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.sampler.n_startup_trials,
                                      constant_liar=s.n_jobs > 1)


def make_pruner(s: TuneConf, max_steps: int) -> Any:
    import optuna

    p = s.pruning
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                           interval_steps=p.interval_steps)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=max(max_steps, p.min_resource),
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def distributions(s: TuneConf) -> dict[str, Any]:
    """Optuna distributions of the search space (one parameter when τ is tied)."""
    from optuna.distributions import FloatDistribution

    out = {"tau_pos": FloatDistribution(s.tau_pos.low, s.tau_pos.high, log=s.tau_pos.log)}
    if s.tau_mode == "separate":
        out["tau_neg"] = FloatDistribution(s.tau_neg.low, s.tau_neg.high, log=s.tau_neg.log)
    return out


def taus_of(params: Mapping[str, float], s: TuneConf) -> tuple[float, float]:
    """(τ_pos, τ_neg) of a trial's parameters."""
    tau_pos = float(params["tau_pos"])
    tau_neg = float(params["tau_neg"]) if s.tau_mode == "separate" else tau_pos * s.tau_neg_scale
    return tau_pos, tau_neg


def range_corners(s: TuneConf) -> list[tuple[float, float]]:
    """The (τ_pos, τ_neg) pairs at the ends of the search range: validating these validates the whole box."""
    if s.tau_mode == "tied":
        return [taus_of({"tau_pos": t}, s) for t in (s.tau_pos.low, s.tau_pos.high)]
    return [(a, b) for a in (s.tau_pos.low, s.tau_pos.high) for b in (s.tau_neg.low, s.tau_neg.high)]


# ----------------------------------------------------------------------------------------- resume bookkeeping


def trial_id_of(storage: Any, study_name: str, number: int) -> int:
    """Storage-wide trial id of trial ``number`` of a study (public storage API only)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def last_heartbeat(trial: Any) -> float:
    """Unix time the trial was last known alive: its driver's heartbeat, else its start."""
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start is not None else 0.0


def fail_stale_trials(study: Any, storage: Any, stale_after_s: float, now: float | None = None) -> list[int]:
    """Mark FAIL every RUNNING trial without a heartbeat for ``stale_after_s`` seconds (its driver was killed);
    returns their numbers. Trials of a live driver elsewhere keep their heartbeat fresh and are left alone."""
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        idle = now - last_heartbeat(t)
        if idle >= stale_after_s:
            storage.set_trial_user_attr(trial_id_of(storage, study.study_name, t.number), "fail_reason",
                                        f"stale: RUNNING without a heartbeat for {idle:.0f} s (killed run)")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


def count_states(trials: Sequence[Any]) -> dict[str, int]:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def trials_to_ask(n_trials: int, counts: Mapping[str, int]) -> int:
    """How many trials to ask so the study reaches ``n_trials`` in total: finished trials (COMPLETE, PRUNED,
    FAIL) and RUNNING ones (a live driver's, after stale ones were failed) count; WAITING (enqueued) ones do not,
    since ``ask`` hands them out first."""
    done = sum(counts.get(k, 0) for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))
    return max(0, n_trials - done)


class Heartbeat:
    """A daemon thread that stamps :data:`HEARTBEAT_ATTR` on the driver's in-flight trials every ``interval``
    seconds, so that another driver (or a resume) can tell a live trial from one whose driver was killed."""

    def __init__(self, storage: Any, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._ids.add(trial_id)
        self._beat([trial_id])

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _beat(self, ids: Sequence[int]) -> None:
        now = time.time()
        for tid in ids:
            try:
                self.storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, now)
            except Exception:  # finished meanwhile, or a transient lock: the next beat retries
                log.debug("heartbeat for trial id %s failed", tid, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._ids)
            self._beat(ids)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's kill, ``kill PID``) runs the driver's cleanup (in-flight trials -> FAIL) like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------------ driver


def gate_overrides(gate: str) -> list[str]:
    """Overrides that select a gate (a custom ``pkg.module:F`` spec goes through ``gate=custom``)."""
    if ":" in gate:
        return ["gate=custom", f"gate.name={_quote(gate)}"]
    return [f"gate={gate}"]


def _quote(value: str) -> str:
    """A Hydra override value: bare when it only has safe characters, else single-quoted."""
    if re.fullmatch(r"[\w./:@+-]+", value) and "//" not in value:
        return value
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot pass {value!r} as a Hydra override value (quote or backslash in it)")
    return f"'{value}'"


# Keys the driver sets per trial; the user must not set them on the command line.
_RESERVED = ("gate.tau_pos", "gate.tau_neg", "tune.trial_number", "output_dir")


def user_overrides(arguments: Sequence[str]) -> list[str]:
    """The command-line overrides every trial gets. A study tunes one config, so sweep syntax (``a=1,2``) and
    the keys the driver sets per trial are errors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    out = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            raise ValueError(f"harness tune: {ov.input_line!r} is a sweep; a study tunes one config (run "
                             "harness sweep for grids, or one harness tune per value)")
        if key.lstrip("+~") in _RESERVED:
            raise ValueError(f"harness tune: {key} is set by the tuner for every trial; set the search range with "
                             "tune.tau_pos.low/high (and tune.tau_neg.* with tune.tau_mode=separate)")
        out.append(ov.input_line)
    return out


def default_study_name(experiment: str, gate: str, given: str | None, n_gates: int) -> str:
    """``<experiment>-<gate>``; a given name gets ``-<gate>`` appended when several gates are tuned (one study
    per gate)."""
    label = gate.split(":")[-1] if ":" in gate else gate
    if given:
        return f"{given}-{label}" if n_gates > 1 else given
    return f"{experiment}-{label}"


@dataclass
class StudyPlan:
    gate: str
    study_name: str
    gate_overrides: list[str]
    base: DictConfig  # composed config of the study at the low corner (validated)


class TuneSweeperImpl:
    """Hydra Sweeper (registered as ``hydra_plugins.harness_sweepers.TuneSweeper``); see the module docstring."""

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

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        assert self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def plan(self, arguments: Sequence[str], storage_url: str) -> tuple[TuneConf, list[str], list[StudyPlan]]:
        """Validate everything and return (settings, user overrides, one plan per gate). No compute."""
        assert self.config is not None
        s = tune_settings(self.config)
        user = user_overrides(arguments)
        gates = list(s.gates) or [str(self.config.gate.name)]
        if len(set(gates)) != len(gates):
            raise ValueError(f"tune.gates lists a gate twice: {gates}")
        plans = []
        for gate in gates:
            if gate == "clip":
                raise ValueError("harness tune: clip has no temperature to tune (pick a smooth gate)")
            gate_ov = gate_overrides(gate) if s.gates else []
            name = default_study_name(str(self.config.tracking.experiment), gate, s.study_name, len(gates))
            composed = []
            for tau_pos, tau_neg in range_corners(s):
                cfg = self.compose(self._trial_overrides(user, gate_ov, tau_pos, tau_neg, name, storage_url, 0,
                                                         Path(self.config.hydra.sweep.dir)))
                validate_cell(cfg)
                check_objective(s.objective, cfg)
                composed.append(cfg)
            plans.append(StudyPlan(gate, name, gate_ov, composed[0]))
        return s, user, plans

    @staticmethod
    def _trial_overrides(user: Sequence[str], gate_ov: Sequence[str], tau_pos: float, tau_neg: float,
                         study_name: str, storage_url: str, number: int, sweep_dir: Path) -> list[str]:
        # Output per study and trial number: unique even when a resumed run reuses a fixed hydra.sweep.dir.
        out_dir = sweep_dir.resolve() / _slug(study_name) / f"trial-{number:04d}"
        return [*user, *gate_ov, f"gate.tau_pos={tau_pos!r}", f"gate.tau_neg={tau_neg!r}",
                f"tune.study_name={_quote(study_name)}", f"tune.storage={_quote(storage_url)}",
                f"tune.trial_number={number}", f"output_dir={_quote(str(out_dir))}"]

    def sweep(self, arguments: list[str]) -> list[Any]:
        """Run every study to its total number of trials; returns the launcher's job returns."""
        assert self.config is not None
        t0 = time.perf_counter()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        storage_url = resolve_storage(tune_settings(self.config).storage)
        s, user, plans = self.plan(arguments, storage_url)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        first = plans[0].base
        log.info("tuning %s on %s -> storage %s, MLflow experiment %r", ", ".join(p.study_name for p in plans),
                 s.objective, mask_url(storage_url), first.tracking.experiment)

        experiment_id = tracking.prepare(first.tracking)
        _prebuild_models([p.base for p in plans])
        storage = make_storage(storage_url)
        parent = tracking.start_parent(experiment_id, name=f"tune-{sweep_dir.name}", tags={
            "sweep": "tune", "studies": ",".join(p.study_name for p in plans),
            "optuna_storage": mask_url(storage_url), "objective": s.objective})
        (sweep_dir / tracking.PARENT_FILE).write_text(parent)

        returns: list[Any] = []
        results: list[dict[str, Any]] = []
        studies: dict[str, dict[str, Any]] = {}
        interrupted = True
        try:
            with Heartbeat(storage, s.heartbeat_s) as heartbeat, _sigterm_as_exit():
                for plan in plans:
                    studies[plan.gate] = self._run_study(plan, s, user, storage, storage_url, sweep_dir, heartbeat,
                                                         returns, results)
            interrupted = False
        finally:
            summary = _sweep_summary(results, time.perf_counter() - t0)
            _log_parent(parent, summary, studies, interrupted=interrupted)
            (sweep_dir / SUMMARY_FILE).write_text(json.dumps(
                {"storage": mask_url(storage_url), "objective": s.objective, "direction": s.direction,
                 "summary": summary, "studies": studies, "trials": results}, indent=2, default=str))
        print(format_summary(summary, studies, storage, plans))
        if s.report:
            _write_report(first)
        return returns

    def _run_study(self, plan: StudyPlan, s: TuneConf, user: list[str], storage: Any, storage_url: str,
                   sweep_dir: Path, heartbeat: Heartbeat, returns: list[Any],
                   results: list[dict[str, Any]]) -> dict[str, Any]:
        import optuna

        study = optuna.create_study(study_name=plan.study_name, storage=storage, direction=s.direction,
                                    load_if_exists=True)
        if study.direction.name.lower() != s.direction:
            raise ValueError(f"study {plan.study_name!r} exists with direction {study.direction.name.lower()}; "
                             f"tune.direction={s.direction} (use another tune.study_name)")
        space = {k: repr(v) for k, v in distributions(s).items()}
        old_space = study.user_attrs.get("search_space")
        if old_space is None:
            for key, value in (("search_space", space), ("objective", s.objective), ("gate", plan.gate),
                               ("tau_mode", s.tau_mode), ("tau_neg_scale", s.tau_neg_scale)):
                study.set_user_attr(key, value)
        elif old_space != space or study.user_attrs.get("objective") != s.objective:
            log.warning("study %s was created with search space %s and objective %s; now %s and %s: the sampler "
                        "mixes both", plan.study_name, old_space, study.user_attrs.get("objective"), space,
                        s.objective)
        stale = fail_stale_trials(study, storage, s.stale_after_s)
        if stale:
            log.warning("study %s: marked stale RUNNING trial(s) %s FAIL", plan.study_name, stale)
        counts = count_states(study.get_trials(deepcopy=False))
        missing = trials_to_ask(s.n_trials, counts)
        log.info("study %s: %s existing (%s); asking %d more to reach %d", plan.study_name,
                 sum(counts.values()), counts, missing, s.n_trials)
        study.sampler = make_sampler(s, n_existing=len(study.get_trials(deepcopy=False)))
        study.pruner = make_pruner(s, int(plan.base.train.steps))
        dists = distributions(s)

        while missing > 0:
            batch = [study.ask(dists) for _ in range(min(s.n_jobs, missing))]
            missing -= len(batch)
            jobs = []
            for trial in batch:
                heartbeat.add(trial_id_of(storage, plan.study_name, trial.number))
                tau_pos, tau_neg = taus_of(trial.params, s)
                trial.set_user_attr("tau_pos", tau_pos)
                trial.set_user_attr("tau_neg", tau_neg)
                trial.set_user_attr("gate", plan.gate)
                jobs.append(self._trial_overrides(user, plan.gate_overrides, tau_pos, tau_neg, plan.study_name,
                                                  storage_url, trial.number, sweep_dir))
            try:
                for job in jobs:  # cheap; catches anything the corner checks could not
                    validate_cell(self.compose(job))
                launched = list(self.launcher.launch(jobs, initial_job_idx=self.job_idx))
            except BaseException as exc:
                # Ctrl-C, SIGTERM, a launcher error: these trials will never report, so they must not stay RUNNING.
                for trial in batch:
                    _tell(study, storage, trial, {"status": "failed", "reason": f"driver: {type(exc).__name__}: {exc}"})
                raise
            finally:
                for trial in batch:
                    heartbeat.discard(trial_id_of(storage, plan.study_name, trial.number))
            self.job_idx += len(jobs)
            returns += launched
            for trial, ret, job in zip(batch, launched, jobs, strict=True):
                result = _job_result(ret, job)
                state = _tell(study, storage, trial, result)
                results.append({"study": plan.study_name, "gate": plan.gate, "trial": trial.number,
                                "state": state, "tau_pos": trial.user_attrs.get("tau_pos"),
                                "tau_neg": trial.user_attrs.get("tau_neg"), **result})
        return study_summary(study, s)


def _tell(study: Any, storage: Any, trial: Any, result: Mapping[str, Any]) -> str:
    """Tell Optuna a job's outcome; returns the state name (that of the stored trial when another driver already
    finished it, e.g. failed it as stale)."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        return _tell_unchecked(study, trial, result)
    except UpdateFinishedTrialError:
        state = study.get_trials(deepcopy=False)[trial.number].state.name
        log.warning("trial %d of %s was already %s; its result is dropped", trial.number, study.study_name, state)
        return state


def _tell_unchecked(study: Any, trial: Any, result: Mapping[str, Any]) -> str:
    from optuna.trial import TrialState

    for key in ("run_id", "seconds", "last_step"):
        if result.get(key) is not None:
            trial.set_user_attr(key, result[key])
    status = result.get("status")
    value = result.get("value")
    if status == "complete" and value is not None and math.isfinite(value):
        study.tell(trial, float(value))
        return "COMPLETE"
    if status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED"
    reason = result.get("reason") or (f"non-finite objective {value}" if status == "complete" else "unknown")
    trial.set_user_attr("fail_reason", str(reason)[:2000])
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    return "FAIL"


def _job_result(ret: Any, job: list[str]) -> dict[str, Any]:
    try:
        value = ret.return_value  # re-raises when the job crashed outside trial_task's own handling
    except Exception as exc:  # recorded as a FAIL trial; the study goes on
        value = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return dict(value or {"status": "failed", "reason": "no return value"})


def study_summary(study: Any, s: TuneConf) -> dict[str, Any]:
    """Counts and the best trial of a study (all of its trials, not only this run's)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    out: dict[str, Any] = {"study": study.study_name, "n_trials": len(trials), "states": count_states(trials)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        out.update({"best_value": best.value, "best_trial": best.number, "best_params": dict(best.params),
                    "best_tau_pos": best.user_attrs.get("tau_pos"), "best_tau_neg": best.user_attrs.get("tau_neg"),
                    "best_run_id": best.user_attrs.get("run_id")})
    return out


def _sweep_summary(results: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    states = [r["state"] for r in results]
    return {"cells": len(results), "finished": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "skipped": 0, "failed": states.count("FAIL"), "seconds": round(seconds, 1)}


def _log_parent(parent: str, summary: Mapping[str, Any], studies: Mapping[str, Mapping[str, Any]], *,
                interrupted: bool = False) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.log_metric(parent, "tune/pruned", float(summary["pruned"]))
    for gate, st in studies.items():
        label = gate.split(":")[-1]
        if st.get("best_value") is not None:
            client.log_metric(parent, f"tune/{label}/best_value", float(st["best_value"]))
            for key in ("best_tau_pos", "best_tau_neg"):
                client.log_metric(parent, f"tune/{label}/{key}", float(st[key]))
    tracking.end_parent(parent, summary)
    if interrupted:
        client.set_terminated(parent, "KILLED")


def _prebuild_models(composed: Sequence[DictConfig]) -> None:
    """Build the embedded model once in the driver, so trials (maybe in parallel processes) only load it."""
    from harness.models import resolve_model_path

    seen = set()
    for cfg in composed:
        key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))


def format_summary(summary: Mapping[str, Any], studies: Mapping[str, Mapping[str, Any]], storage: Any,
                   plans: Sequence[StudyPlan]) -> str:
    """Best τ per gate and every study's trials table."""
    import optuna

    lines = [f"tune: {summary['cells']} trials this run — {summary['finished']} complete, {summary['pruned']} "
             f"pruned, {summary['failed']} failed ({summary['seconds']} s)"]
    for plan in plans:
        st = studies.get(plan.gate, {})
        head = f"{plan.gate}: study {plan.study_name!r}, {st.get('n_trials', 0)} trials {st.get('states', {})}"
        if st.get("best_value") is not None:
            head += (f"; best τ_pos={st['best_tau_pos']:.4g} τ_neg={st['best_tau_neg']:.4g} -> "
                     f"{st['best_value']:.4f} (trial {st['best_trial']})")
        else:
            head += "; no COMPLETE trial yet"
        lines.append(head)
        try:
            df = optuna.load_study(study_name=plan.study_name, storage=storage).trials_dataframe(
                attrs=("number", "value", "state", "duration", "params", "user_attrs"))
        except Exception as exc:  # the table is a convenience; the summary above already has the numbers
            lines.append(f"  (trials table unavailable: {exc})")
            continue
        keep = [c for c in ("number", "state", "value", "params_tau_pos", "params_tau_neg", "user_attrs_tau_neg",
                            "user_attrs_last_step", "duration") if c in df.columns]
        lines.append(df[keep].to_string(index=False))
    return "\n".join(lines)


def _write_report(cfg: DictConfig) -> None:
    try:
        from harness.reporting import write_report

        print(f"report: {write_report(cfg.tracking.experiment, tracking_uri=tracking.tracking_uri(cfg.tracking))}")
    except Exception as exc:  # the study is already stored; a report failure must not hide that
        log.exception("report failed: %s", exc)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


# --------------------------------------------------------------------------------------------------------- job


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
    import mlflow
    import optuna
    from hydra.core.hydra_config import HydraConfig

    from harness.sweep import cell_name

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

    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracking.log_step(step, metrics)  # first: a pruned trial keeps its curves up to the pruning step
        reporter(step, metrics)

    experiment_id = tracking.prepare(cfg.tracking)
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.initialized() else None
    parent = tracking.read_parent(sweep_dir) if sweep_dir else None
    with open_dict(cfg):
        cfg.resume = False  # a trial is one fresh training run; its output_dir is unique per study and trial
    name = f"trial{s.trial_number}-{cell_name(cfg)}"
    run_id = None
    base = {"config_hash": tracking.config_hash(cfg)}
    try:
        with tracking.cell_run(cfg, experiment_id=experiment_id, parent_run_id=parent, run_name=name,
                               extra_tags={"study": s.study_name, "trial": str(s.trial_number)}) as run:
            run_id = run.info.run_id
            try:
                summary = run_cell(cfg, on_step=on_step)
            except optuna.TrialPruned as exc:
                # KILLED, not FINISHED: a sweep must not take a pruned run as the finished cell of its config.
                mlflow.set_tags({"optuna_state": "PRUNED", "pruned_at_step": str(reporter.last_step)})
                mlflow.end_run("KILLED")
                return {**base, "status": "pruned", "run_id": run_id, "reason": str(exc),
                        "last_step": reporter.last_step, "seconds": time.perf_counter() - t0}
            tracking.log_cell(summary, Path(cfg.output_dir))
            value = objective_value(summary, s.objective)
            mlflow.log_metric("tune/objective", value)
            mlflow.set_tag("optuna_state", "COMPLETE")
    except Exception as exc:  # recorded FAILED in MLflow (cell_run) and FAIL in Optuna (driver); the study goes on
        log.exception("trial %s of %s failed", s.trial_number, s.study_name)
        return {**base, "status": "failed", "run_id": run_id, "reason": f"{type(exc).__name__}: {exc}",
                "last_step": reporter.last_step, "seconds": time.perf_counter() - t0}
    return {**base, "status": "complete", "value": value, "run_id": run_id, "last_step": reporter.last_step,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    """``harness tune [overrides]``: tune τ of the gate(s) with Optuna on ``sweeps/tune.yaml``."""
    from harness.app import hydra_entry

    # Hydra refuses -m next to --cfg/--info/--help; those only inspect the config, so they run without it.
    inspect = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}
    mode = [] if inspect & set(argv) else ["-m"]
    return hydra_entry(SWEEPS_DIR, "tune", trial_task, [*mode, *argv], "harness tune")


