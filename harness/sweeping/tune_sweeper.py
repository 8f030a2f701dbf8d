"""The ``harness tune`` driver: Optuna temperature tuning; ``harness tune [overrides]`` searches τ_pos / τ_neg of
one gate per study.

``harness tune`` composes ``sweeps/tune.yaml`` (``conf/run.yaml`` plus a ``tune:`` node) and selects
:class:`TuneSweeperImpl` (registered in ``hydra_plugins.harness_sweepers`` as ``harness_tune``) as the Hydra
sweeper, so trials run through whatever Hydra launcher is configured (basic, joblib, submitit). The driver is an
Optuna ask/tell loop:

1. Everything is validated before any compute: the ``tune`` node, the command-line overrides, and the composed
   cell config of every gate at the corners of its τ search range (``harness.cell.validate_cell``).
2. One study per gate (``tune.gates``, or the gate chosen with ``gate=``), in an RDB storage (``tune.storage``;
   default ``sqlite:///optuna.db`` in the working directory, a Postgres URL for many workers), named
   ``tune.study_name`` (default ``<tracking.experiment>-<gate>``).
3. Resume: ``tune.n_trials`` is the TOTAL number of trials of the study. RUNNING trials whose heartbeat is older
   than ``tune.stale_after_s`` (a killed driver) are marked FAIL first; COMPLETE, PRUNED and FAIL trials (and
   RUNNING trials another live driver owns) count towards the total, and only the missing ones are asked. The
   sampler is seeded with ``seed + number of existing trials``, so a resumed study does not re-propose the points
   it already tried.
4. Trials are asked ``tune.n_jobs`` at a time and handed to the launcher as one batch; each job
   (:func:`harness.sweeping.trial.trial_task`) reopens the study from the storage, builds
   ``optuna.trial.Trial(study, trial_id)``, trains the cell in an MLflow child run (tags ``study`` and
   ``trial``), reports a moving average of an intermediate training metric after every optimizer step and raises
   ``optuna.TrialPruned`` out of ``on_step`` when the pruner says so (the backend then stops). The driver tells
   Optuna the outcome: COMPLETE with the objective, PRUNED, or FAIL with the reason in the trial's user attrs.
5. At the end: best τ per gate and the trials table on stdout, ``<sweep dir>/tune_summary.json``, and the report.

The objective is a metric of the cell summary: ``eval/mean_selection_accuracy`` (default: strict accuracy on
the selection half of each benchmark, so the report's test half stays unseen), ``eval/mean_accuracy``,
``eval/<benchmark>/<metric>`` or ``train/<key>`` (the final step's value; ``train/reward`` is the cheap proxy
when ``eval.enabled=false``).
"""


from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness import keys as K
from harness import tracking
from harness.backends.common import num_processes
from harness.cell import validate_cell
from harness.config import config_errors, sigterm_as_exit, slug
from harness.gates import has_temperature
from harness.sweeping.base import SweeperBase, job_result
from harness.sweeping.grid import gate_overrides, override_value
from harness.sweeping.study import (
    Heartbeat,
    count_states,
    distributions,
    fail_stale_trials,
    make_pruner,
    make_sampler,
    make_storage,
    range_corners,
    resolve_storage,
    study_summary,
    taus_of,
    tell,
    trial_id_of,
    trials_to_ask,
)
from harness.sweeping.tune_settings import TuneConf, check_objective, tune_settings
from harness.tracking import mask_url

log = logging.getLogger(__name__)
SUMMARY_FILE = "tune_summary.json"


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


class TuneSweeperImpl(SweeperBase):
    """Hydra Sweeper (registered as ``hydra_plugins.harness_sweepers.TuneSweeper``); see the module docstring."""

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
            if not has_temperature(gate):
                raise ValueError(f"harness tune: {gate} has no temperature to tune (pick a smooth gate)")
            gate_ov = gate_overrides(gate) if s.gates else []
            name = default_study_name(str(self.config.tracking.experiment), gate, s.study_name, len(gates))
            composed = []
            for tau_pos, tau_neg in range_corners(s):
                cfg = self.compose(self._trial_overrides(user, gate_ov, tau_pos, tau_neg, name, storage_url, 0,
                                                         Path(self.config.hydra.sweep.dir)))
                validate_cell(cfg, machine=self.cells_run_here)
                check_objective(s.objective, cfg)
                if num_processes(cfg) > 1:
                    raise ValueError(f"harness tune: backend.num_processes={cfg.backend.num_processes}: a trial's "
                                     "pruner reads every training step in this process; tune with one process per "
                                     "trial (backend.num_processes=1), and sweep the chosen τ on several")
                composed.append(cfg)
            plans.append(StudyPlan(gate, name, gate_ov, composed[0]))
        return s, user, plans

    @staticmethod
    def _trial_overrides(user: Sequence[str], gate_ov: Sequence[str], tau_pos: float, tau_neg: float,
                         study_name: str, storage_url: str, number: int, sweep_dir: Path) -> list[str]:
        # Output per study and trial number: unique even when a resumed run reuses a fixed hydra.sweep.dir.
        out_dir = sweep_dir.resolve() / slug(study_name) / f"trial-{number:04d}"
        return [*user, *gate_ov, f"gate.tau_pos={tau_pos!r}", f"gate.tau_neg={tau_neg!r}",
                f"tune.study_name={override_value(study_name)}", f"tune.storage={override_value(storage_url)}",
                f"tune.trial_number={number}", f"output_dir={override_value(str(out_dir))}"]

    def sweep(self, arguments: list[str]) -> list[Any]:
        """Run every study to its total number of trials; returns the launcher's job returns."""
        assert self.config is not None
        t0 = time.perf_counter()
        sweep_dir = self.sweep_dir
        with config_errors():  # every check before any compute: a bad value exits 2 with one line
            storage_url = resolve_storage(tune_settings(self.config).storage)
            s, user, plans = self.plan(arguments, storage_url)
        first = plans[0].base
        log.info("tuning %s on %s -> storage %s, MLflow experiment %r", ", ".join(p.study_name for p in plans),
                 s.objective, mask_url(storage_url), first.tracking.experiment)
        storage = make_storage(storage_url)
        store, parent = self.open([p.base for p in plans], name=f"tune-{sweep_dir.name}", tags={
            K.TAG_SWEEP: "tune", "studies": ",".join(p.study_name for p in plans),
            K.TAG_OPTUNA_STORAGE: mask_url(storage_url), "objective": s.objective})

        returns: list[Any] = []
        results: list[dict[str, Any]] = []
        studies: dict[str, dict[str, Any]] = {}
        interrupted = True
        try:
            with Heartbeat(storage, s.heartbeat_s) as heartbeat, sigterm_as_exit():
                for plan in plans:
                    studies[plan.gate] = self._run_study(plan, s, user, storage, storage_url, sweep_dir, heartbeat,
                                                         returns, results)
            interrupted = False
        finally:
            summary = _sweep_summary(results, time.perf_counter() - t0)
            _log_parent(store, parent, summary, studies, interrupted=interrupted)
            (sweep_dir / SUMMARY_FILE).write_text(json.dumps(
                {"storage": mask_url(storage_url), "objective": s.objective, "direction": s.direction,
                 "summary": summary, "studies": studies, "trials": results}, indent=2, default=str))
        print(format_summary(summary, studies, storage, plans))
        if s.report:
            self.write_report(first, store)
        self.raise_if_incomplete(summary, "trials")  # after the summary: failed trials exit 1
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
                trial.set_user_attr(K.TRIAL_TAU_POS, tau_pos)
                trial.set_user_attr(K.TRIAL_TAU_NEG, tau_neg)
                trial.set_user_attr("gate", plan.gate)
                jobs.append(self._trial_overrides(user, plan.gate_overrides, tau_pos, tau_neg, plan.study_name,
                                                  storage_url, trial.number, sweep_dir))
            try:
                for job in jobs:  # cheap; catches anything the corner checks could not
                    validate_cell(self.compose(job), machine=self.cells_run_here)
                launched = self.launch(jobs)
            except BaseException as exc:
                # Ctrl-C, SIGTERM, a launcher error: these trials will never report, so they must not stay RUNNING.
                for trial in batch:
                    tell(study, storage, trial, {"status": "failed", "reason": f"driver: {type(exc).__name__}: {exc}"})
                raise
            finally:
                for trial in batch:
                    heartbeat.discard(trial_id_of(storage, plan.study_name, trial.number))
            returns += launched
            for trial, ret, job in zip(batch, launched, jobs, strict=True):
                result = job_result(ret, job)
                state = tell(study, storage, trial, result)
                results.append({"study": plan.study_name, "gate": plan.gate, "trial": trial.number,
                                "state": state, "tau_pos": trial.user_attrs.get(K.TRIAL_TAU_POS),
                                "tau_neg": trial.user_attrs.get(K.TRIAL_TAU_NEG), **result})
        return study_summary(study, s)


def _sweep_summary(results: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    states = [r["state"] for r in results]
    return {"cells": len(results), "finished": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "skipped": 0, "failed": states.count("FAIL"), "seconds": round(seconds, 1)}


def _log_parent(store: tracking.Store, parent: str, summary: Mapping[str, Any],
                studies: Mapping[str, Mapping[str, Any]], *, interrupted: bool = False) -> None:
    client = store.client
    client.log_metric(parent, "tune/pruned", float(summary["pruned"]))
    for gate, st in studies.items():
        label = gate.split(":")[-1]
        if st.get("best_value") is not None:
            client.log_metric(parent, K.tune_key(label, "best_value"), float(st["best_value"]))
            for key in ("best_tau_pos", "best_tau_neg"):
                client.log_metric(parent, K.tune_key(label, key), float(st[key]))
    if interrupted:  # the trials in flight die with the driver: their runs must not stay RUNNING
        try:
            tracking.kill_children(store, parent)
        except Exception as exc:  # the store may be what is gone; a re-run supersedes them
            log.warning("could not close the running trials of %s: %s", parent, exc)
    tracking.end_parent(store, parent, summary, status="KILLED" if interrupted else None)


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
        columns = ("number", "state", "value", f"params_{K.TRIAL_TAU_POS}", f"params_{K.TRIAL_TAU_NEG}",
                   f"user_attrs_{K.TRIAL_TAU_NEG}", "user_attrs_last_step", "duration")
        keep = [c for c in columns if c in df.columns]
        lines.append(df[keep].to_string(index=False))
    return "\n".join(lines)
