"""Optuna for ``harness tune``: storage, sampler, pruner and search space from the settings, and the bookkeeping
that makes a study resumable (heartbeats of in-flight trials, stale trials failed, outcomes told)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.sweeping.grid import tied_tau_neg
from harness.sweeping.tune_settings import TuneConf

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "harness:heartbeat"  # trial system attr: unix time of the owning driver's last heartbeat


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

    out = {K.TRIAL_TAU_POS: FloatDistribution(s.tau_pos.low, s.tau_pos.high, log=s.tau_pos.log)}
    if s.tau_mode == "separate":
        out[K.TRIAL_TAU_NEG] = FloatDistribution(s.tau_neg.low, s.tau_neg.high, log=s.tau_neg.log)
    return out


def taus_of(params: Mapping[str, float], s: TuneConf) -> tuple[float, float]:
    """(τ_pos, τ_neg) of a trial's parameters."""
    tau_pos = float(params[K.TRIAL_TAU_POS])
    tau_neg = float(params[K.TRIAL_TAU_NEG]) if s.tau_mode == "separate" else tied_tau_neg(tau_pos, s.tau_neg_scale)
    return tau_pos, tau_neg


def range_corners(s: TuneConf) -> list[tuple[float, float]]:
    """The (τ_pos, τ_neg) pairs at the ends of the search range: validating these validates the whole box."""
    if s.tau_mode == "tied":
        return [taus_of({K.TRIAL_TAU_POS: t}, s) for t in (s.tau_pos.low, s.tau_pos.high)]
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


def tell(study: Any, storage: Any, trial: Any, result: Mapping[str, Any]) -> str:
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


def study_summary(study: Any, s: TuneConf) -> dict[str, Any]:
    """Counts and the best trial of a study (all of its trials, not only this run's)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    out: dict[str, Any] = {"study": study.study_name, "n_trials": len(trials), "states": count_states(trials)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        out.update({"best_value": best.value, "best_trial": best.number, "best_params": dict(best.params),
                    "best_tau_pos": best.user_attrs.get(K.TRIAL_TAU_POS),
                    "best_tau_neg": best.user_attrs.get(K.TRIAL_TAU_NEG),
                    "best_run_id": best.user_attrs.get("run_id")})
    return out
