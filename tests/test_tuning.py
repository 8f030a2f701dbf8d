"""`harness tune`: config logic (Hydra compose of sweeps/tune.yaml), resume arithmetic, stale trials, pruning
reporter, and one real tiny tuning run in a subprocess (eval disabled, 3 steps) resumed to a larger total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from harness.cell import validate_cell
from harness.config import CONF_DIR, SWEEPS_DIR
from harness.sweeping.grid import gate_overrides
from harness.sweeping.study import (
    HEARTBEAT_ATTR,
    Heartbeat,
    count_states,
    distributions,
    fail_stale_trials,
    make_pruner,
    make_sampler,
    make_storage,
    range_corners,
    resolve_storage,
    taus_of,
    trial_id_of,
    trials_to_ask,
)
from harness.sweeping.trial import PruningReporter
from harness.sweeping.tune_settings import check_objective, objective_value, tune_settings
from harness.sweeping.tune_sweeper import SUMMARY_FILE, TuneSweeperImpl, default_study_name, user_overrides
from harness.tracking import mask_url

REPO = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def compose_tune(overrides: list[str] | None = None):
    """sweeps/tune.yaml composed as `harness tune` would (conf/ on the search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        return compose(config_name="tune", overrides=[*(overrides or []), f"hydra.searchpath=[file://{CONF_DIR}]"],
                       return_hydra_config=True)


# ------------------------------------------------------------------------------------------------ config


def test_tune_config_composes_with_defaults():
    cfg = compose_tune()
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.harness_sweepers.TuneSweeper"
    s = tune_settings(cfg)
    assert (s.n_trials, s.n_jobs, s.pruner, s.direction) == (8, 1, "median", "maximize")
    assert s.objective == "eval/mean_selection_accuracy" and s.storage is None and s.study_name is None
    assert (s.tau_pos.low, s.tau_pos.high, s.tau_pos.log) == (0.25, 8.0, True)
    assert list(distributions(s)) == ["tau_pos"]  # tied: one parameter
    assert cfg.gate.name == "sigmoid" and cfg.tracking.experiment == "tune"
    for tau_pos, tau_neg in range_corners(s):  # the box the search covers is valid
        c = compose_tune([f"gate.tau_pos={tau_pos}", f"gate.tau_neg={tau_neg}", "output_dir=/tmp/x"])
        validate_cell(c)
        check_objective(s.objective, c)


def test_tau_modes():
    s = tune_settings(compose_tune(["tune.tau_mode=separate", "tune.tau_neg.low=0.5", "tune.tau_neg.high=4"]))
    assert sorted(distributions(s)) == ["tau_neg", "tau_pos"]
    assert taus_of({"tau_pos": 2.0, "tau_neg": 3.0}, s) == (2.0, 3.0)
    assert range_corners(s) == [(0.25, 0.5), (0.25, 4.0), (8.0, 0.5), (8.0, 4.0)]
    tied = tune_settings(compose_tune(["tune.tau_neg_scale=1.1"]))
    assert taus_of({"tau_pos": 2.0}, tied) == (2.0, pytest.approx(2.2))


@pytest.mark.parametrize("override, message", [
    ("tune.tau_mode=wide", "tau_mode"),
    ("tune.tau_pos.low=10", "low <= high"),
    ("tune.pruner=asha", "tune.pruner"),
    ("tune.n_trials=0", "n_trials"),
    ("tune.objective=accuracy", "tune.objective"),
    ("tune.direction=up", "direction"),
    ("tune.sampler.name=grid", "sampler"),
    ("tune.stale_after_s=10", "heartbeat_s"),
    ("+tune.nope=1", "nope"),
])
def test_bad_settings_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        tune_settings(compose_tune([override]))


def test_objective_checks_and_values():
    no_eval = compose_tune(["eval.enabled=false", "output_dir=/tmp/x"])
    with pytest.raises(ValueError, match=r"eval\.enabled=false"):
        check_objective("eval/mean_accuracy", no_eval)
    check_objective("train/reward", no_eval)
    with pytest.raises(ValueError, match="gsm8k"):
        check_objective("eval/gsm8k/acc", compose_tune(["output_dir=/tmp/x"]))
    summary = {"train": {"reward": 1.25}, "eval": {"mean_accuracy": 0.5, "benchmarks": {"arith": {"acc": 0.5}}}}
    assert objective_value(summary, "train/reward") == 1.25
    assert objective_value(summary, "eval/mean_accuracy") == 0.5
    summary["eval"]["mean_selection_accuracy"] = 0.25
    assert objective_value(summary, "eval/mean_selection_accuracy") == 0.25
    assert objective_value(summary, "eval/arith/acc") == 0.5
    with pytest.raises(KeyError, match="no evaluation"):
        objective_value({"train": {}}, "eval/mean_accuracy")


def test_overrides_storage_and_names(tmp_path):
    assert user_overrides(["train.steps=3", "eval.enabled=false"]) == ["train.steps=3", "eval.enabled=false"]
    with pytest.raises(ValueError, match="sweep"):
        user_overrides(["train.lr=1e-4,1e-5"])
    with pytest.raises(ValueError, match="set by the tuner"):
        user_overrides(["gate.tau_pos=2"])
    assert resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage("sqlite:///sub/o.db", tmp_path) == f"sqlite:///{tmp_path / 'sub' / 'o.db'}"
    assert resolve_storage("postgresql://u:pw@h/db") == "postgresql://u:pw@h/db"
    assert mask_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert default_study_name("exp", "erf", None, 1) == "exp-erf"
    assert default_study_name("exp", "erf", "mine", 1) == "mine"
    assert default_study_name("exp", "erf", "mine", 2) == "mine-erf"  # one study per gate
    assert default_study_name("exp", "pkg.mod:F", None, 1) == "exp-F"
    assert gate_overrides("pkg.mod:F") == ["gate=custom", "gate.name=pkg.mod:F"]


# ------------------------------------------------------------------------------------------------ resume


def _dist():
    return {"tau_pos": optuna.distributions.FloatDistribution(0.25, 8.0, log=True)}


def test_resume_arithmetic_counts_finished_and_live_trials():
    assert trials_to_ask(8, {}) == 8
    assert trials_to_ask(8, {"COMPLETE": 3, "PRUNED": 2, "FAIL": 1}) == 2
    assert trials_to_ask(8, {"COMPLETE": 3, "RUNNING": 2, "WAITING": 4}) == 3  # WAITING is asked, not counted
    assert trials_to_ask(4, {"COMPLETE": 6}) == 0  # never negative


def test_stale_running_trials_are_failed_and_live_ones_kept(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    done = study.ask(_dist())
    study.tell(done, 1.0)
    pruned = study.ask(_dist())
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask(_dist())
    study.tell(failed, state=TrialState.FAIL)
    dead = study.ask(_dist())  # its driver was killed: no heartbeat since the start
    live = study.ask(_dist())  # another driver keeps this one alive
    study.enqueue_trial({"tau_pos": 2.0})  # WAITING
    storage.set_trial_system_attr(trial_id_of(storage, "s", live.number), HEARTBEAT_ATTR, time.time())
    storage.set_trial_system_attr(trial_id_of(storage, "s", dead.number), HEARTBEAT_ATTR,
                                  time.time() - 1000)

    assert fail_stale_trials(study, storage, stale_after_s=90) == [dead.number]
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert "stale" in trials[dead.number].user_attrs["fail_reason"]
    assert trials[live.number].state == TrialState.RUNNING
    counts = count_states(trials)
    assert counts == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 2, "RUNNING": 1, "WAITING": 1}
    assert trials_to_ask(8, counts) == 3
    # stale_after_s=0 fails every RUNNING trial (single-driver use after a crash)
    assert fail_stale_trials(study, storage, stale_after_s=0) == [live.number]


def test_heartbeat_stamps_in_flight_trials(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask(_dist())
    tid = trial_id_of(storage, "s", trial.number)
    with Heartbeat(storage, interval=0.05) as hb:
        hb.add(tid)
        first = storage.get_trial(tid).system_attrs[HEARTBEAT_ATTR]
        time.sleep(0.3)
        later = storage.get_trial(tid).system_attrs[HEARTBEAT_ATTR]
        hb.discard(tid)
    assert later > first
    assert fail_stale_trials(study, storage, stale_after_s=60) == []


def test_resumed_sampler_does_not_replay_the_first_points():
    s = tune_settings(compose_tune())

    def run(study, n, sampler):
        study.sampler = sampler
        out = []
        for _ in range(n):
            t = study.ask(_dist())
            study.tell(t, -abs(t.params["tau_pos"] - 2))
            out.append(t.params["tau_pos"])
        return out

    study = optuna.create_study(direction="maximize")
    first = run(study, 3, make_sampler(s, n_existing=0))
    resumed = run(study, 3, make_sampler(s, n_existing=3))
    assert not set(resumed) & set(first)
    # why the seed moves: a fresh sampler with the same seed replays the same startup points
    replay = run(optuna.create_study(direction="maximize"), 3, make_sampler(s, n_existing=0))
    assert replay == first


def test_pruners():
    s = tune_settings(compose_tune(["tune.pruning.n_warmup_steps=7"]))
    assert isinstance(make_pruner(s, 80), optuna.pruners.MedianPruner)
    assert make_pruner(s, 80)._n_warmup_steps == 7
    s = tune_settings(compose_tune(["tune.pruner=hyperband"]))
    assert isinstance(make_pruner(s, 80), optuna.pruners.HyperbandPruner)
    s = tune_settings(compose_tune(["tune.pruner=none"]))
    assert isinstance(make_pruner(s, 80), optuna.pruners.NopPruner)


def test_pruning_reporter_reports_a_moving_average_and_prunes():
    class FakeTrial:
        def __init__(self, prune_at: int) -> None:
            self.reports: list[tuple[float, int]] = []
            self.prune_at = prune_at

        def report(self, value: float, step: int) -> None:
            self.reports.append((value, step))

        def should_prune(self) -> bool:
            return self.reports[-1][1] >= self.prune_at

    trial = FakeTrial(prune_at=4)
    rep = PruningReporter(trial, "reward", window=2)
    rep(1, {"reward": 1.0})
    rep(2, {"reward": 3.0})
    rep(3, {"reward": 5.0})
    assert trial.reports == [(1.0, 1), (2.0, 2), (4.0, 3)]
    with pytest.raises(optuna.TrialPruned, match="step 4"):
        rep(4, {"reward": 0.0})
    assert rep.last_step == 4
    with pytest.raises(ValueError, match="available: loss"):
        PruningReporter(trial, "reward", 2)(1, {"loss": 0.1})


def test_bad_config_fails_before_any_compute(tmp_path):
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "no-cache")}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "tune", "gate=clip"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "clip has no temperature" in out.stderr
    out = subprocess.run([sys.executable, "-m", "harness.cli", "tune", "eval.enabled=false"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "tune.objective=train/reward" in out.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "no-cache").exists()


# ------------------------------------------------------------------------------------------------ real run


@pytest.mark.slow
def test_real_tiny_tune_and_resume(tmp_path, cache_dir):
    """3 trials, then a killed driver's RUNNING trial is injected and the study resumed to a total of 5."""
    import mlflow

    base = [sys.executable, "-m", "harness.cli", "tune", "train.steps=3", "train.rollout_batch_size=8",
            "train.num_generations=4", "train.micro_batch_size=8", "train.max_new_tokens=8", "eval.enabled=false",
            "tune.objective=train/reward", "tune.report=false", "backend.progress=false", f"cache_dir={cache_dir}",
            "tune.pruning.n_startup_trials=1", "tune.pruning.n_warmup_steps=1", "hydra.sweep.dir=multirun/tune"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = subprocess.run([*base, "tune.n_trials=3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "best τ_pos=" in first.stdout
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(study_name="tune-sigmoid", storage=storage)
    assert len(study.trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].intermediate_values
    points = {t.params["tau_pos"] for t in study.trials}

    orphan = study.ask(distributions(tune_settings(compose_tune())))  # a killed driver's trial
    second = subprocess.run([*base, "tune.n_trials=5", "tune.stale_after_s=0", "tune.report=true"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="tune-sigmoid", storage=storage).trials
    assert len(trials) == 5  # 3 + the orphan (FAIL) + 1 asked to reach the total
    assert trials[orphan.number].state == TrialState.FAIL
    assert "stale" in trials[orphan.number].user_attrs["fail_reason"]
    assert trials[4].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert trials[4].params["tau_pos"] not in points  # the resumed sampler drew a new point

    summary = json.loads((tmp_path / "multirun" / "tune" / SUMMARY_FILE).read_text())
    st = summary["studies"]["sigmoid"]
    assert st["n_trials"] == 5 and st["best_params"] == {"tau_pos": st["best_tau_pos"]}
    assert summary["summary"]["cells"] == 1

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["tune"], output_format="list")
    children = [r for r in runs if r.data.tags.get("study") == "tune-sigmoid"]
    parents = [r for r in runs if r.data.tags.get("sweep") == "tune"]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert sorted(r.data.tags["trial"] for r in children) == ["0", "1", "2", "4"]  # the orphan never ran
    by_trial = {int(r.data.tags["trial"]): r for r in children}
    for t in trials:
        if t.number not in by_trial:
            continue
        run = by_trial[t.number]
        assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
        assert float(run.data.params["gate.tau_pos"]) == pytest.approx(t.params["tau_pos"])
        assert t.user_attrs["run_id"] == run.info.run_id
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics["tune/objective"] == t.value
            assert run.data.metrics["train/reward"] == t.value  # objective = the final train reward
        else:
            assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "PRUNED"
    # the resumed run wrote the report (eval disabled: notes instead of tables; the study is in it)
    html = (tmp_path / "reports" / "tune" / "report.html").read_text()
    assert "Study <b>tune-sigmoid</b>" in html and "No evaluation metrics" in html


def test_shim_is_registered():
    from hydra.core.config_store import ConfigStore

    import hydra_plugins.harness_sweepers as shims

    assert issubclass(shims.TuneSweeper, TuneSweeperImpl)
    node = ConfigStore.instance().load("hydra/sweeper/harness_tune.yaml").node
    assert OmegaConf.to_container(node)["_target_"] == "hydra_plugins.harness_sweepers.TuneSweeper"
