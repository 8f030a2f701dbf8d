"""Gate sweeps: config logic through Hydra's compose API, one failing cell in process, and real multiruns in
subprocesses (local parallel launcher, then SLURM through fake sbatch/srun)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from harness import tracking
from harness.cell import cell_dir, cell_name, config_hash, validate_cell
from harness.config import CONF_DIR, SWEEPS_DIR
from harness.sweeping.base import expand_arguments
from harness.sweeping.gate_sweeper import cell_task
from harness.sweeping.grid import TIED_TAU_NEG_SCALE, cell_overrides
from tests.conftest import REPO

# A cell that trains 2 steps and evaluates 8 problems x 2 samples: seconds on a CPU.
TINY = ["train.steps=2", "train.rollout_batch_size=16", "train.micro_batch_size=16", "train.save_every=1",
        "eval.bench.arith.limit=8", "eval.bench.arith.k=2", "backend.progress=false", "backend.threads=1"]
FAKE_SLURM = Path(__file__).parent / "fake_slurm"


def compose_sweep(name: str, overrides: list[str], hydra_config: bool = False):
    """Compose sweeps/NAME.yaml (with conf/ on the search path) exactly as ``harness sweep NAME`` does."""
    import hydra_plugins.harness_sweepers  # noqa: F401  (registers hydra/sweeper=harness_gates)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                       return_hydra_config=hydra_config)


# ----------------------------------------------------------------------------- config logic (compose API)


def test_default_sweep_is_five_gates_at_the_papers_tau_with_three_seeds():
    cfg = compose_sweep("gates", [], hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_ == "hydra_plugins.harness_sweepers.GateSweeper"
    cells = cell_overrides(sw.gates, sw.taus, sw.seeds, tau_mode=sw.tau_mode, tau_neg_scale=sw.tau_neg_scale)
    assert len(cells) == 5 * 3  # four smooth gates at (10, 12) and clip, three seeds each
    gates = {c[0] for c in cells}
    assert gates == {f"gate={g}" for g in ("sigmoid", "erf", "arctan", "softsign", "clip")}
    assert {c[1] for c in cells} == {"seed=0", "seed=1", "seed=2"}
    assert ["gate=clip", "seed=2"] in cells
    assert ["gate=erf", "seed=0", "gate.tau_pos=10.0", "gate.tau_neg=12.0"] in cells
    assert cfg.tracking.experiment == "gates" and cfg.model.name == "tiny" and cfg.task.name == "arith"


def test_every_cell_composes_and_validates():
    sw = compose_sweep("gates", [], hydra_config=True).hydra.sweeper
    cells = cell_overrides(sw.gates, sw.taus, sw.seeds, tau_mode=sw.tau_mode, tau_neg_scale=sw.tau_neg_scale)
    names = set()
    for overrides in cells:
        cfg = compose_sweep("gates", overrides)
        validate_cell(cfg)
        names.add(cell_name(cfg))
    assert len(names) == len(cells)
    assert "softsign-t10-12-s2" in names and "clip-e0.2-0.2-s0" in names


def test_tau_modes_and_seed_axis():
    separate = cell_overrides(["sigmoid", "clip"], [1.0, 2.0], [0, 1], tau_mode="separate", tau_neg=[1.0, 3.0])
    assert len(separate) == 2 * (2 * 2) + 2  # sigmoid: tau_pos x tau_neg x seeds; clip: seeds
    assert ["gate=sigmoid", "seed=1", "gate.tau_pos=2.0", "gate.tau_neg=3.0"] in separate
    custom = cell_overrides(["tests.custom_gate_module:F"], [1.0], [0])
    assert custom == [["gate=custom", "gate.name=tests.custom_gate_module:F", "seed=0", "gate.tau_pos=1.0",
                       "gate.tau_neg=1.2"]]
    with pytest.raises(ValueError, match="tau_mode must be one of tied, separate"):
        cell_overrides(["sigmoid"], [1.0], [0], tau_mode="both")
    with pytest.raises(ValueError, match="tau_neg grid"):
        cell_overrides(["sigmoid"], [1.0], [0], tau_mode="separate")


def test_one_tied_tau_neg_scale_default():
    """The grid, the gate sweeper's node and the tied sweeps in sweeps/ share the paper's τ_neg / τ_pos = 12 / 10."""
    from harness.sweeping.gate_sweeper import gate_sweeper_settings

    assert gate_sweeper_settings({}).tau_neg_scale == TIED_TAU_NEG_SCALE == 1.2
    for name in ("gates", "adaptive"):
        assert compose_sweep(name, [], hydra_config=True).hydra.sweeper.tau_neg_scale == TIED_TAU_NEG_SCALE


def test_command_line_sweeps_multiply_cells():
    assert expand_arguments(["train.lr=1e-4,3e-4", "seed=1"]) == [["train.lr=0.0001", "seed=1"],
                                                                   ["train.lr=0.0003", "seed=1"]]
    assert expand_arguments([]) == [[]]


def test_bad_cell_is_named_before_compute():
    cfg = compose_sweep("gates", ["gate.name=nope"])
    with pytest.raises(ValueError, match=r"nope.*known gates are"):
        validate_cell(cfg)


def test_config_hash_ignores_paths_not_what_is_computed():
    out = "output_dir=/tmp/cell"  # ${hydra:runtime.output_dir} outside a Hydra app
    a = compose_sweep("gates", ["gate=erf", "gate.tau_pos=2", out])
    b = compose_sweep("gates", ["gate=erf", "gate.tau_pos=2", "cells_dir=/elsewhere", "backend.progress=false",
                                "tracking.uri=sqlite:////tmp/other.db", "cache_dir=/tmp/c", "output_dir=/tmp/x"])
    assert config_hash(a) == config_hash(b)
    for change in (["gate=erf", "gate.tau_pos=3"], ["gate=arctan", "gate.tau_pos=2"], ["gate=erf", "gate.tau_pos=2",
                                                                                       "seed=1"]):
        assert config_hash(compose_sweep("gates", [*change, out])) != config_hash(a)


@pytest.mark.parametrize(("launcher", "target"), [
    ("local", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
    ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    cfg = compose_sweep("gates", [f"hydra/launcher={launcher}"], hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.name == "harness-gates"
        assert cfg.hydra.launcher.gpus_per_node == 1


def test_paper_sweep_composes_the_papers_recipe():
    cfg = compose_sweep("paper", [], hydra_config=True)
    assert cfg.model.name == "qwen2.5-7b-instruct" and cfg.model.path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.task.name == "mixture" and [c.name for c in cfg.task.components] == ["gsm8k", "deepmath"]
    assert list(cfg.eval.benchmarks) == ["gsm8k", "math500", "aime24", "aime25"] and cfg.eval.temperature == 0.7
    t = cfg.train  # Table 2
    assert (t.num_generations, t.max_new_tokens, t.max_prompt_tokens, t.num_iterations) == (8, 512, 1536, 2)
    assert (t.rollout_batch_size, t.mini_batch_size, t.micro_batch_size) == (128, None, 1)
    assert t.steps * t.num_iterations == 5000  # optimizer steps
    assert (t.lr, t.warmup_steps, t.lr_schedule, list(t.betas), t.adam_eps) == (1e-6, 0, "linear", [0.9, 0.999], 1e-8)
    assert t.rewards.format == "graded" and t.loss.kl_beta == 0.0
    sw = cfg.hydra.sweeper
    cells = cell_overrides(sw.gates, sw.taus, sw.seeds, tau_mode=sw.tau_mode, tau_neg_scale=sw.tau_neg_scale,
                           tau_pairs=sw.tau_pairs)
    assert len(cells) == 5 * 3 and list(sw.seeds) == [0, 1, 2]  # 3 seeds: one seed ranks nothing
    for c in cells[::3]:
        composed = compose_sweep("paper", c)
        if composed.gate.name == "clip":
            assert composed.gate.eps_low == composed.gate.eps_high == 0.2
        else:
            assert (composed.gate.tau_pos, composed.gate.tau_neg) == (10.0, 12.0)
    assert sw.baseline  # the starting checkpoint is evaluated once


def test_harness_run_train_paper_cfg_job_prints_table_2():
    import yaml

    exe = shutil.which("harness", path=str(Path(sys.executable).parent)) or "harness"
    out = subprocess.run([exe, "run", "train=paper", "--cfg", "job"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    t = yaml.safe_load(out.stdout)["train"]
    assert {k: t[k] for k in ("num_generations", "max_prompt_tokens", "max_new_tokens", "micro_batch_size",
                              "num_iterations", "lr", "warmup_steps", "lr_schedule", "betas", "adam_eps")} == {
        "num_generations": 8, "max_prompt_tokens": 1536, "max_new_tokens": 512, "micro_batch_size": 1,
        "num_iterations": 2, "lr": 1e-6, "warmup_steps": 0, "lr_schedule": "linear", "betas": [0.9, 0.999],
        "adam_eps": 1e-8}
    assert t["steps"] * t["num_iterations"] == 5000 and t["rewards"]["format"] == "graded"


def test_paper_temperature_sweep_composes_the_temperature_study():
    sw = compose_sweep("paper_temperature", [], hydra_config=True).hydra.sweeper
    cells = cell_overrides(sw.gates, sw.taus, sw.seeds, tau_mode=sw.tau_mode, tau_neg_scale=sw.tau_neg_scale,
                           tau_pairs=sw.tau_pairs)
    gates = [compose_sweep("paper_temperature", c).gate for c in cells]
    pairs = sorted({(g.tau_pos, g.tau_neg) for g in gates})
    assert pairs == [(1.0, 1.05), (5.0, 6.0), (10.0, 12.0), (13.0, 15.0)] and len(cells) == 4 * 3
    assert {c[0] for c in cells} == {"gate=erf"}


def test_tau_pairs_accept_ints_from_the_command_line():
    from harness.sweeping.gate_sweeper import gate_sweeper_settings

    assert gate_sweeper_settings({"tau_pairs": [[10, 12]]}).tau_pairs == [[10, 12]]
    sw = compose_sweep("gates", ["hydra.sweeper.tau_pairs=[[10,12]]"], hydra_config=True).hydra.sweeper
    cells = cell_overrides(["erf"], [], [0], tau_pairs=sw.tau_pairs)
    assert cells[0][-2:] == ["gate.tau_pos=10.0", "gate.tau_neg=12.0"]


def test_tau_pairs_replace_the_grid_and_are_checked():
    cells = cell_overrides(["erf", "clip"], [4.0], [0], tau_pairs=[[1, 1.05], [10, 12]])
    assert ["gate=erf", "seed=0", "gate.tau_pos=10.0", "gate.tau_neg=12.0"] in cells and len(cells) == 3
    with pytest.raises(ValueError, match="tau_pairs must be"):
        cell_overrides(["erf"], [1.0], [0], tau_pairs=[[1.0]])
    with pytest.raises(ValueError, match="tau_pairs must be"):
        cell_overrides(["erf"], [1.0], [0], tau_pairs=[[1.0, -2.0]])


def test_one_baseline_job_per_model_and_evaluation():
    from harness.sweeping.grid import baseline_jobs

    jobs = [["gate=erf", "seed=0"], ["gate=clip", "seed=1"], ["gate=erf", "seed=0", "eval.bench.arith.k=2"]]
    composed = [compose_sweep("gates", j) for j in jobs]
    base = baseline_jobs(jobs, composed)
    assert base == [[*jobs[0], "role=baseline"], [*jobs[2], "role=baseline"]]  # k=2 evaluates differently
    a, b = (compose_sweep("gates", j) for j in (base[0], [*jobs[1], "role=baseline"]))
    assert config_hash(a) == config_hash(b)  # gate and seed do not change what the baseline computes
    assert cell_name(a) == "base-tiny"
    with pytest.raises(ValueError, match="role must be one of cell, baseline"):
        validate_cell(compose_sweep("gates", ["role=both"]))


# ----------------------------------------------------------------------------- one cell, in process


def nan_reward(texts, golds, problems):
    """An extra reward that breaks the run (NaN advantages) once rollouts exist."""
    return [float("nan")] * len(texts)


def test_a_nonzero_rank_trains_without_evaluating_or_logging(tmp_path, cache_dir, monkeypatch):
    """Under `accelerate launch` every rank runs `harness run`: rank 0 evaluates and logs, the others only train."""
    from harness.cli import run_task

    monkeypatch.setenv("RANK", "1")
    cfg = compose_sweep("gates", [*TINY, f"cache_dir={cache_dir}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                  f"output_dir={tmp_path / 'out'}"])
    run_task(cfg)
    assert list((tmp_path / "out" / "checkpoints").glob("step-*"))  # it trained
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out" / "eval").exists()


def test_failed_cell_is_recorded_and_returned(tmp_path, cache_dir):
    from mlflow.tracking import MlflowClient

    cfg = compose_sweep("gates", [*TINY, f"cache_dir={cache_dir}", f"cells_dir={tmp_path / 'cells'}",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output_dir={tmp_path}",
                                  "train.rewards.extra=[{path: 'tests.test_sweep:nan_reward', weight: 1.0}]"])
    result = cell_task(cfg)
    assert result["status"] == "failed" and "NaN" in result["reason"]
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"])
    assert run.info.status == "FAILED"
    assert "NaN" in run.data.tags["failure_reason"]
    assert run.data.tags["config_hash"] == result["config_hash"]


def test_killed_cell_resumes_with_its_whole_history(tmp_path, cache_dir):
    """A cell killed after step 1 (its run left RUNNING, a checkpoint on disk) is resumed by the next sweep:
    the new run carries steps 1 and 2, the stale run is marked KILLED and points to it."""
    from harness.backends.native import train

    cfg = compose_sweep("gates", [*TINY, f"cache_dir={cache_dir}", f"cells_dir={tmp_path / 'cells'}",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output_dir={tmp_path}"])
    chash = config_hash(cfg)
    store = tracking.open_store(cfg.tracking)
    client = store.client
    # What a kill after step 1 leaves: a RUNNING run that logged step 1, and the step-1 checkpoint.
    killed = client.create_run(store.experiment_id, tags={"config_hash": chash}).info.run_id
    partial = copy.deepcopy(cfg)
    partial.train.steps = 1
    partial.output_dir = str(cell_dir(cfg, chash))
    assert partial.output_dir == str(tmp_path / "cells" / f"{cell_name(cfg)}-{chash}")
    first = train(partial)
    client.log_metric(killed, "train/reward", first.history[0]["reward"], step=1)

    result = cell_task(cfg)
    assert result["status"] == "finished"
    steps = [m.step for m in client.get_metric_history(result["run_id"], "train/reward")]
    assert sorted(steps) == [1, 2]
    stale = client.get_run(killed)
    assert stale.info.status == "KILLED" and stale.data.tags["superseded_by"] == result["run_id"]


# ----------------------------------------------------------------------------- real multiruns (subprocess)


def _harness(args: list[str], cwd: Path, cache_dir: Path, path_prefix: Path | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
        env["FAKE_SLURM_LOG"] = str(cwd / "fake_slurm")
    exe = shutil.which("harness", path=str(Path(sys.executable).parent)) or "harness"
    return subprocess.run([exe, "sweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _runs(cwd: Path, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.slow
def test_parallel_multirun_logs_every_cell_then_skips_them(tmp_path, cache_dir):
    from mlflow.tracking import MlflowClient

    args = ["hydra.sweeper.gates=[sigmoid,erf,clip]", "hydra.sweeper.taus=[2.0]", "hydra.sweeper.seeds=[0]", *TINY,
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    first = _harness(args, tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    # 3 cells and the starting checkpoint's evaluation (the report's "no RL" row)
    assert "4 cells — 4 finished, 0 skipped, 0 failed" in first.stdout

    runs = _runs(tmp_path, "gates")
    parents = [r for r in runs if r.data.tags.get("sweep") == "gates"]
    cells = [r for r in runs if "config_hash" in r.data.tags]
    assert len(parents) == 1 and len(cells) == 4
    assert parents[0].info.status == "FINISHED"
    client = MlflowClient()
    (base,) = [r for r in cells if r.data.tags["gate"] == "base"]
    assert "eval/arith/acc" in base.data.metrics and not [k for k in base.data.metrics if k.startswith("train/")]
    for run in (r for r in cells if r is not base):
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"gate", "tau_pos", "tau_neg", "seed", "backend", "model", "task", "git_commit"} <= tags.keys()
        assert run.data.params["train.steps"] == "2"
        # no lost metric: every step of every training metric, from workers writing one store at once
        for key in ("train/reward", "train/entropy", "train/it2/abs_ratio_dev"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
        assert 0.0 <= run.data.metrics["eval/arith/acc"] <= 1.0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "train_history.json", "eval"} <= artifacts

    # the report that ends the sweep shows the numbers MLflow holds
    import json

    report = json.loads((tmp_path / "reports" / "gates" / "report.json").read_text())
    by_run = {r.info.run_id: r for r in cells}
    for row in report["accuracy"]:
        (rid,) = row["run_ids"]
        assert row["acc"] == by_run[rid].data.metrics[f"eval/{row['benchmark']}/acc"]
    assert (tmp_path / "reports" / "gates" / "report.html").stat().st_size > 10_000

    again = _harness(args, tmp_path, cache_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "4 cells — 0 finished, 4 skipped, 0 failed" in again.stdout
    assert len(_runs(tmp_path, "gates")) == len(runs) + 1  # one more parent, no new cell run


@pytest.mark.slow
def test_bad_sweep_input_fails_before_any_cell(tmp_path, cache_dir):
    out = _harness(["hydra.sweeper.gates=[sigmoid,nope]", *TINY, "hydra.sweeper.report=false"], tmp_path, cache_dir)
    assert out.returncode != 0
    assert "gate/nope" in out.stderr and "Available options in 'gate'" in out.stderr and "softsign" in out.stderr
    assert not (tmp_path / "outputs" / "cells").exists()


@pytest.mark.slow
def test_slurm_launcher_renders_a_valid_job_script(tmp_path, cache_dir):
    """Two cells of two processes each: one array task per cell asks for the cell's processes as GPUs, and inside
    it the sweep's job starts the cell's ranks under accelerate (gloo on this CPU)."""
    overrides = ["hydra.sweeper.gates=[sigmoid,clip]", "hydra.sweeper.taus=[1.0]", "hydra.sweeper.seeds=[0]", *TINY,
                 "backend=trl", "backend.num_processes=2", "train.micro_batch_size=8", "hydra/launcher=slurm",
                 "hydra.launcher.partition=gpu", "hydra.sweeper.report=false", "hydra.sweeper.baseline=false"]
    out = _harness(overrides, tmp_path, cache_dir, path_prefix=FAKE_SLURM, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:] + str(list((tmp_path / "fake_slurm").glob("*")))
    script = (tmp_path / "fake_slurm" / "job.sh").read_text()
    tasks = "".join(p.read_text() for p in (tmp_path / "fake_slurm").glob("task-*.log"))
    assert tasks.count("2 processes: ") == 2 and "accelerate.commands.launch --config_file" in tasks
    assert "#SBATCH --mem=" not in script
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --gpus-per-node=2", "#SBATCH --mem-per-gpu=64G",
                 "#SBATCH --cpus-per-task=16",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --job-name=harness-gates",
                 "export OMP_NUM_THREADS=16"):
        assert line in script, line
    assert "srun" in script and "submitit.core._submit" in script
    # the array tasks really ran through the script: two FINISHED cells in the local store
    assert "2 cells — 2 finished, 0 skipped, 0 failed" in out.stdout
    runs = [r for r in _runs(tmp_path, "gates") if "config_hash" in r.data.tags]
    assert sorted(r.data.tags["gate"] for r in runs) == ["clip", "sigmoid"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the array task must run on a machine without GPUs")
def test_a_slurm_driver_leaves_the_machine_checks_to_each_cells_task(tmp_path, cache_dir):
    """The driver (a login node: here this CPU) submits an FSDP cell it could not train itself; the array task,
    on a machine without GPUs (this CPU again), refuses it before any compute, naming the key, and the sweep records
    the cell FAILED with that reason."""
    overrides = ["hydra.sweeper.gates=[sigmoid]", "hydra.sweeper.taus=[1.0]", "hydra.sweeper.seeds=[0]", *TINY,
                 "backend=trl", "backend.num_processes=2", "backend.accelerate_config=fsdp", "train.micro_batch_size=8",
                 "hydra/launcher=slurm", "hydra.sweeper.report=false", "hydra.sweeper.baseline=false"]
    out = _harness(overrides, tmp_path, cache_dir, path_prefix=FAKE_SLURM, timeout=300)
    assert out.returncode == 1, out.stderr[-4000:]
    assert "#SBATCH --gpus-per-node=2" in (tmp_path / "fake_slurm" / "job.sh").read_text()
    assert "1 cells — 0 finished, 0 skipped, 1 failed" in out.stdout
    assert "backend.accelerate_config=fsdp shards over GPUs; on a CPU" in out.stdout
    assert not list((tmp_path / "outputs" / "cells").glob("*/launch"))  # no rank was started


def test_tails_sweep_composes_student_over_nu_at_one_half_width():
    cfg = compose_sweep("tails", [], hydra_config=True)
    sw = cfg.hydra.sweeper
    assert list(sw.gates) == ["student"] and [list(p) for p in sw.tau_pairs] == [[10.0, 12.0]]
    assert list(sw.axes["gate.nu"]) == [1.0, 2.0, 4.0, 16.0, 1000.0] and list(sw.seeds) == [0, 1, 2]
    assert cfg.gate.width == "hwhm" and cfg.tracking.experiment == "tails"
    for nu in sw.axes["gate.nu"]:
        validate_cell(compose_sweep("tails", ["gate=student", f"gate.nu={nu}", "gate.tau_pos=10.0",
                                              "gate.tau_neg=12.0"]))


@pytest.mark.slow
def test_tails_sweep_runs_and_reports_each_nu(tmp_path, cache_dir):
    import json

    out = _harness(["tails", "hydra.sweeper.axes={gate.nu:[1.0,16.0]}", "hydra.sweeper.seeds=[0]",
                    "hydra.sweeper.baseline=false", *TINY], tmp_path, cache_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "2 cells — 2 finished, 0 skipped, 0 failed" in out.stdout
    cells = [r for r in _runs(tmp_path, "tails") if "config_hash" in r.data.tags]
    assert sorted(r.data.params["gate.nu"] for r in cells) == ["1.0", "16.0"]
    assert {r.data.params["gate.width"] for r in cells} == {"hwhm"} and {r.data.tags["gate"] for r in cells} == {
        "student"}
    report = json.loads((tmp_path / "reports" / "tails" / "report.json").read_text())
    labels = {row["group"] for row in report["accuracy"]}
    assert labels == {"student ν=1 τ=10/12", "student ν=16 τ=10/12"}, labels


def test_a_sweep_wide_gate_override_reaches_the_gates_that_have_the_key():
    from harness.config import ConfigError
    from harness.sweeping.grid import cell_overrides, check_gate_overrides, for_the_cells_gate
    from tests.conftest import compose as compose_run

    cells = cell_overrides(["sigmoid", "clip", "student"], [2.0], [0])
    routed = {c[0]: for_the_cells_gate(c, ["gate.width=hwhm", "gate.eps_high=0.28", "gate.nu=3", "seed=1"])
              for c in cells}
    assert routed == {"gate=sigmoid": ["gate.width=hwhm", "seed=1"], "gate=clip": ["gate.eps_high=0.28", "seed=1"],
                      "gate=student": ["gate.width=hwhm", "gate.nu=3", "seed=1"]}
    for cell, extra in zip(cells, routed.values(), strict=True):
        compose_run([*cell, *extra])  # every routed override exists on its cell's gate node
    check_gate_overrides(cells, ["gate.eps_low=0.1"])
    with pytest.raises(ConfigError, match=r"gate.eps_low is a key of none of the sweep's gates \(sigmoid\)"):
        check_gate_overrides(cell_overrides(["sigmoid"], [2.0], [0]), ["gate.eps_low=0.1"])


def test_offpolicy_sweep_composes_every_gate_at_two_lags():
    cfg = compose_sweep("offpolicy", [], hydra_config=True)
    sw = cfg.hydra.sweeper
    assert list(sw.gates) == ["sigmoid", "erf", "arctan", "softsign", "clip"] and list(sw.staleness) == [0, 4]
    assert list(sw.seeds) == [0, 1, 2] and cfg.tracking.experiment == "offpolicy"
    cell = ["gate=erf", "seed=1", "gate.tau_pos=10.0", "gate.tau_neg=12.0", "output_dir=/tmp/cell"]  # as the sweeper
    stale = compose_sweep("offpolicy", [*cell, "train.staleness=4"])
    validate_cell(stale)
    assert cell_name(stale) == "erf-t10-12-lag4-s1"
    # a synchronous cell of this sweep is the default sweep's cell: same hash, so a finished one is reused
    sync = config_hash(compose_sweep("offpolicy", cell))
    assert sync == config_hash(compose_sweep("gates", cell)) != config_hash(stale)


def test_bad_staleness_axis_fails_before_any_cell(tmp_path, cache_dir):
    out = _harness(["offpolicy", "hydra.sweeper.staleness=[0,-1]", *TINY], tmp_path, cache_dir)
    assert out.returncode == 2 and "hydra.sweeper.staleness must be a non-empty list of integers >= 0" in out.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_offpolicy_sweep_runs_each_lag_and_reports_the_frontier(tmp_path, cache_dir):
    import json

    out = _harness(["offpolicy", "hydra.sweeper.gates=[sigmoid,clip]", "hydra.sweeper.staleness=[0,2]",
                    "hydra.sweeper.seeds=[0]", "hydra.sweeper.baseline=false", *TINY, "train.steps=3"],
                   tmp_path, cache_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "4 cells — 4 finished, 0 skipped, 0 failed" in out.stdout
    cells = [r for r in _runs(tmp_path, "offpolicy") if "config_hash" in r.data.tags]
    assert sorted((r.data.tags["gate"], r.data.tags["staleness"]) for r in cells) == [
        ("clip", "0"), ("clip", "2"), ("sigmoid", "0"), ("sigmoid", "2")]
    report = json.loads((tmp_path / "reports" / "offpolicy" / "report.json").read_text())["staleness"]
    assert sorted((lv["gate"], lv["staleness"]) for lv in report["levels"]) == [
        ("clip", 0), ("clip", 2), ("sigmoid", 0), ("sigmoid", 2)]
    assert {f["gate"] for f in report["frontiers"]} == {"sigmoid", "clip"}
    html = (tmp_path / "reports" / "offpolicy" / "report.html").read_text()
    assert "(l) Stability under staleness" in html and "the largest tried" in html
