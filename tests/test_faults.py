"""Faults and bad input, each drill for real: a `mlflow server` killed mid-sweep (and what a re-run uploads), truncated
and empty checkpoints, drivers racing on a fresh SQLite store, an inadmissible custom gate, cells that all fail,
unreachable stores (timed), SIGTERM / SIGKILL during `harness run`, and one-line config errors.

The slow drills run `harness` in subprocesses on tiny cells; the rest run in process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from harness import keys as K
from harness import tracking
from harness.backends.checkpoints import resume_checkpoint, verify_checkpoint, write_manifest
from tests.conftest import REPO, compose

# 4 steps (a checkpoint each) of 16 rollouts, 8 problems x 2 samples evaluated: seconds per cell on a CPU.
TINY = ["train.steps=4", "train.rollout_batch_size=16", "train.micro_batch_size=16", "train.save_every=1",
        "eval.bench.arith.limit=8", "eval.bench.arith.k=2", "backend.progress=false", "backend.threads=1"]
# Two cells one after the other (the second starts after the outage), no baseline and no report: the drill only.
GRID = ["hydra.sweeper.taus=[1.0]", "hydra.sweeper.tau_pairs=[]", "hydra.sweeper.seeds=[0]", "hydra/launcher=local",
        "hydra.sweeper.baseline=false", "hydra.sweeper.report=false"]  # pinned: the sweep's own grid may change
SWEEP = ["hydra.sweeper.gates=[sigmoid,erf]", *GRID, *TINY]
TIMING = re.compile(r"(_time_s|_seconds|_per_s)$")  # wall-clock metrics: never equal between two runs


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return {**env, **extra}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def _harness(args: list[str], cwd: Path, cache_dir: Path, timeout: int = 600,
             **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_cmd(*args), cwd=cwd, env=_env(cache_dir, **env), capture_output=True, text=True,
                          timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _count(db: Path, sql: str) -> int:
    """A count from an SQLite store that another process writes (0 while it does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return int(con.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (its own process group, so a kill takes its workers too)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 180) -> MlflowServer:
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # kept open for the server's life
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=_env(self.root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            try:  # an API call, not only /health: the first one creates the server's tables
                with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5):
                    return True
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
                return False

        _wait_for(answers, timeout, "mlflow server", every=0.5)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _files(root: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob(pattern))}


def _cell_runs(client, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
    return {r.data.tags[K.TAG_CONFIG_HASH]: r for r in runs if K.TAG_CONFIG_HASH in r.data.tags}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


# ------------------------------------------------------------------------------- 1. the store lost mid-sweep


@pytest.mark.slow
def test_lost_tracking_server_mid_sweep_then_rerun_uploads_every_metric(tmp_path, cache_dir):
    """`kill -9` of a real `mlflow server` while the first of two cells trains: both cells still train and keep
    their files, the sweep prints its summary and exits (3: awaiting upload) within 60 s of its last cell; after the
    server is back, the same command uploads every missing metric without retraining, and MLflow then holds exactly
    what an undisturbed sweep of the same cells logs (every metric at every step, params, artifacts)."""
    from mlflow.tracking import MlflowClient

    ref = _harness(["sweep", *SWEEP, f"tracking.uri=sqlite:///{tmp_path / 'ref' / 'mlflow.db'}"], tmp_path / "ref",
                   cache_dir)
    assert ref.returncode == 0, ref.stderr[-3000:]

    server = MlflowServer(tmp_path / "server", _free_port()).start()
    work = tmp_path / "outage"
    work.mkdir()
    args = ["sweep", *SWEEP, f"tracking.uri={server.uri}"]
    try:
        with open(work / "first.out", "w") as out, open(work / "first.err", "w") as err:
            proc = subprocess.Popen(_cmd(*args), cwd=work, env=_env(cache_dir), stdout=out, stderr=err)
            db = server.root / "server.db"
            _wait_for(lambda: _count(db, "select count(*) from metrics where key = 'train/reward'") > 0, 300,
                      "the first training step in the server's store")
            assert proc.poll() is None, "the sweep ended before the server could be killed"
            server.kill()  # the store is gone while the first cell trains and before the second starts
            rc = proc.wait(timeout=600)
            exited = time.time()
        stdout, stderr = (work / "first.out").read_text(), (work / "first.err").read_text()
        assert rc == 3, stderr[-3000:]
        assert "2 cells — 2 finished, 0 skipped, 0 failed, 2 awaiting upload" in stdout, stdout[-3000:]
        assert "await upload" in stderr.splitlines()[-1]
        cells = sorted((work / "outputs" / "cells").iterdir())
        assert len(cells) == 2 and all((c / K.PENDING_UPLOAD_FILE).exists() for c in cells)
        last_cell = max((c / K.SUMMARY_FILE).stat().st_mtime for c in cells)
        print(f"outage drill: the sweep exited {exited - last_cell:.1f} s after its last cell")
        assert exited - last_cell < 60
        checkpoints = _files(work / "outputs", "*.safetensors")

        server.start()
        again = _harness(args, work, cache_dir)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "2 cells — 0 finished, 0 skipped, 0 failed, 2 uploaded" in again.stdout, again.stdout[-3000:]
        assert _files(work / "outputs", "*.safetensors") == checkpoints  # uploaded from the files: nothing retrained
        assert not list((work / "outputs").rglob(K.PENDING_UPLOAD_FILE))

        ref_client, client = MlflowClient(f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}"), MlflowClient(server.uri)
        expected, got = _cell_runs(ref_client, "gates"), _cell_runs(client, "gates")
        assert got.keys() == expected.keys() and len(got) == 2
        for chash, want in expected.items():
            have = got[chash]
            assert have.data.metrics.keys() == want.data.metrics.keys()
            for key in want.data.metrics:
                if TIMING.search(key):
                    continue
                a = sorted((m.step, m.value) for m in ref_client.get_metric_history(want.info.run_id, key))
                b = sorted((m.step, m.value) for m in client.get_metric_history(have.info.run_id, key))
                assert a == b, key  # every step once, the same values
            params = {k: v for k, v in want.data.params.items() if not k.startswith("tracking.")}
            assert {k: v for k, v in have.data.params.items() if not k.startswith("tracking.")} == params
            assert _artifacts(client, have.info.run_id) == _artifacts(ref_client, want.info.run_id)
        # the first driver's parent run, left RUNNING by the outage, is closed by the re-run's driver
        parents = client.search_runs([client.get_experiment_by_name("gates").experiment_id],
                                     filter_string=f"tags.{K.TAG_SWEEP} = 'gates'", order_by=["attributes.start_time"])
        assert len(parents) == 2
        assert parents[0].info.status == "KILLED"
        assert parents[0].data.tags[K.TAG_SUPERSEDED_BY] == parents[1].info.run_id
        assert parents[1].info.status == "FINISHED"
    finally:
        server.kill()


# ------------------------------------------------------------------------------- 2. checkpoints you can trust


def _native_cfg(out: Path, cache_dir: Path, *extra: str):
    cfg = compose(["train.steps=2", "train.rollout_batch_size=16", "train.micro_batch_size=16", "train.save_every=1",
                   "train.keep_checkpoints=null", "backend.progress=false", "backend.threads=1", "eval.enabled=false",
                   f"cache_dir={cache_dir}",
                   *extra])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k != K.STEP_TIME_S} == {k: v for k, v in y.items() if k != K.STEP_TIME_S}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    from harness.backends.native import train

    out = tmp_path_factory.mktemp("straight")
    return out, train(_native_cfg(out, cache_dir))


def _corrupt(path: Path, how: str) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(0 if how == "empty" else size // 2)


@pytest.mark.parametrize(("victim", "how"), [("model.safetensors", "truncated"), ("trainer_state.pt", "truncated"),
                                             ("model.safetensors", "empty")])
def test_resume_skips_a_corrupt_newest_checkpoint(straight_run, tmp_path, cache_dir, caplog, victim, how):
    """The newest checkpoint's weights or trainer state truncated or emptied: resume names the file and why, sets
    the checkpoint aside, continues from the older valid one, and ends exactly where the uninterrupted run ended."""
    from harness.backends.native import train

    src, straight = straight_run
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step-000002"
    _corrupt(newest / victim, how)
    with caplog.at_level("WARNING"):
        resumed = train(_native_cfg(tmp_path, cache_dir, "resume=true"))
    assert f"skipping checkpoint {newest}: {newest / victim}" in caplog.text
    assert "continuing from the older checkpoint" in caplog.text and "step-000001" in caplog.text
    _same_history(straight.history, resumed.history)
    assert (tmp_path / "checkpoints" / "step-000002.invalid").is_dir()
    assert verify_checkpoint(newest) is None  # step 2 trained again, with a manifest that matches


def test_resume_starts_over_when_no_checkpoint_is_valid(straight_run, tmp_path, cache_dir, caplog):
    from harness.backends.native import train

    src, straight = straight_run
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    for step in ("step-000001", "step-000002"):
        _corrupt(tmp_path / "checkpoints" / step / "model.safetensors", "truncated")
    with caplog.at_level("WARNING"):
        resumed = train(_native_cfg(tmp_path, cache_dir, "resume=true"))
    assert "no valid checkpoint in" in caplog.text and "starting over" in caplog.text
    _same_history(straight.history, resumed.history)


def test_trl_resume_path_takes_the_newest_valid_checkpoint(tmp_path, caplog):
    """TRL's checkpoints (transformers writes them; the harness callback adds the history and then the manifest):
    a truncated optimizer state is caught by the manifest, an empty file in a checkpoint written before manifests by
    parsing it."""
    import torch
    from safetensors.torch import save_file

    from harness.backends.trl import CHECKPOINT_PATTERN, CHECKPOINT_REQUIRED

    def checkpoint(step: int, manifest: bool) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        save_file({"w": torch.randn(64, 64)}, str(path / "model.safetensors"))
        torch.save({"state": torch.randn(64, 64)}, path / "optimizer.pt")
        torch.save({"last_epoch": step}, path / "scheduler.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / "harness_history.json").write_text("[]")
        if manifest:
            write_manifest(path)
        return path

    older, legacy, newest = checkpoint(2, True), checkpoint(4, False), checkpoint(6, True)
    _corrupt(newest / "optimizer.pt", "truncated")
    (legacy / "model.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path, CHECKPOINT_PATTERN, CHECKPOINT_REQUIRED) == older
    assert f"skipping checkpoint {newest}: {newest / 'optimizer.pt'} has" in caplog.text
    assert f"skipping checkpoint {legacy}: {legacy / 'model.safetensors'} is empty" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4.invalid",
                                                          "checkpoint-6.invalid"]


# ------------------------------------------------------------------------------- 3. one migration at a time

DRIVER = """
import sys, time
import mlflow.tracking  # imported before the start line, so both drivers reach the store together
from omegaconf import OmegaConf
from harness import tracking
uri, experiment, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
tracking.check_store(OmegaConf.create({"uri": uri, "experiment": experiment}))
print("ok")
"""


@pytest.mark.slow
def test_drivers_started_together_on_a_fresh_store_all_succeed(tmp_path, cache_dir):
    """Three drivers open one fresh SQLite store at the same instant: its creation and schema migration is
    serialised by a file lock, so none of them crashes (without it, two of three crashed in each of three tries:
    "duplicate column name: step", "table _alembic_tmp_metrics already exists")."""
    for attempt in range(1):
        uri = f"sqlite:///{tmp_path / f'try{attempt}' / 'mlflow.db'}"
        (tmp_path / f"try{attempt}").mkdir()
        start = time.time() + 8
        procs = [subprocess.Popen([sys.executable, "-c", DRIVER, uri, f"exp{i}", str(start)], cwd=tmp_path,
                                  env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(3)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0 and out.strip() == "ok", err[-3000:]


# ------------------------------------------------------------------------------- 4. inadmissible gates

BAD_GATES = "import torch\n\n\ndef cube(x):\n    return x ** 3\n"


@pytest.mark.slow
def test_inadmissible_custom_gate_is_refused_before_compute(tmp_path, cache_dir):
    (tmp_path / "badgates.py").write_text(BAD_GATES)
    out = _harness(["run", "gate=custom", "gate.name=badgates:cube", "eval.enabled=false", "tracking.enabled=false"],
                   tmp_path, cache_dir, timeout=300, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = out.stderr.strip().splitlines()
    assert "gate.name=badgates:cube is not admissible" in line and "(ii) max F' = 1 at x=0" in line
    assert "gate.allow_inadmissible=true" in line and "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("step-*"))  # nothing trained


def test_inadmissible_gate_trains_when_allowed_warned_and_tagged(tmp_path, cache_dir, caplog, monkeypatch):
    from harness.cli import run_task

    (tmp_path / "badgates.py").write_text(BAD_GATES)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose(["gate=custom", "gate.name=badgates:cube", "gate.allow_inadmissible=true", "train.steps=1",
                   "train.rollout_batch_size=16", "train.micro_batch_size=16", "backend.progress=false",
                   "backend.threads=1", "eval.enabled=false", f"cache_dir={cache_dir}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output_dir={tmp_path / 'out'}"])
    with caplog.at_level("WARNING"):
        run_task(cfg)
    assert "gate.name=badgates:cube is not admissible" in caplog.text and "training it anyway" in caplog.text
    store = tracking.open_store(cfg.tracking)
    (run,) = store.client.search_runs([store.experiment_id])
    assert run.info.status == "FINISHED" and "(ii) max F' = 1 at x=0" in run.data.tags[K.TAG_INADMISSIBLE]


# ------------------------------------------------------------------------------- 5. a sweep whose cells all fail


def _unwritable(tmp_path: Path) -> Path:
    """A directory nothing can be created in: a read-only place for root (which chmod does not stop), else a
    folder without write permission."""
    if os.geteuid() == 0:
        target = Path("/sys/harness-test-cells")
        try:
            target.mkdir()
        except OSError:
            return target
        target.rmdir()
        pytest.skip("no read-only place for root on this machine")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "cells"


@pytest.mark.slow
def test_sweep_whose_cells_all_fail_exits_nonzero_after_its_summary(tmp_path, cache_dir):
    out = _harness(["sweep", "hydra.sweeper.gates=[sigmoid,clip]", *GRID, *TINY,
                    f"cells_dir={_unwritable(tmp_path)}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                   tmp_path / "work", cache_dir)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "2 cells — 0 finished, 0 skipped, 2 failed" in out.stdout, out.stdout[-3000:]
    assert out.stderr.strip().splitlines()[-1].endswith("2 of 2 cells failed (see the summary above)")


# ------------------------------------------------------------------------------- 6, 9. one-line config errors


@pytest.fixture
def in_process_cli(tmp_path, monkeypatch, cache_dir):
    """`harness` called in this process: in tmp_path, and with the logging Hydra set up (onto pytest's captured
    streams) taken down afterwards."""
    import logging

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize(("overrides", "message"), [
    ("train.save_every=0", "train.save_every must be an integer >= 1, got 0"),
    ("train.save_every=-1", "train.save_every must be an integer >= 1, got -1"),
    ("train.steps=abc", "Value 'abc' of type 'str' could not be converted to Integer full_key: train.steps"),
    ("gate.tau_pos=-1", "gate.tau_pos must be a finite number > 0, got -1"),
    ("gate=clip gate.eps_low=1.5", "gate.eps_low must be < 1"),
    # each gate node has only the keys its gate uses; the error lists them
    ("gate.eps_low=0.3", "Key 'eps_low' not in 'SmoothGateConfig' full_key: gate.eps_low"),
    ("gate=clip gate.tau_pos=2", "full_key: gate.tau_pos, object_type=ClipGateConfig); ClipGateConfig has: name, "
                                 "eps_low, eps_high"),
    ("backend.bf16=maybe", "full_key: backend.bf16"),
    ("train.loss.agg=mean", "train.loss.agg must be one of seq-mean-token-mean, token-mean, seq-mean-token-sum-norm"),
    ("gate=nope", "Could not find 'gate/nope' Available options in 'gate': arctan, cispo, cispo_two_sided, clip,"),
])
def test_bad_config_exits_2_with_one_line_and_no_traceback(overrides, message, tmp_path, capsys, in_process_cli):
    from harness.cli import main

    assert main(["run", *overrides.split(), "eval.enabled=false", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("harness run: error: ") and message in line, err
    assert not list(tmp_path.rglob("step-*"))


def test_a_gate_node_has_only_the_keys_its_gate_uses():
    from hydra.errors import ConfigCompositionException

    for overrides, missing in ((["gate=erf", "gate.eps_high=0.28"], "eps_high"), (["gate=clip", "gate.width=hwhm"],
                                                                                    "width")):
        with pytest.raises(ConfigCompositionException, match=f"Could not override 'gate.{missing}'"):
            compose(overrides)
    assert set(compose(["gate=clip"]).gate) == {"name", "eps_low", "eps_high"}
    smooth = set(compose(["gate=erf"]).gate)
    assert {"tau_pos", "tau_neg", "width", "tau_schedule", "controller"} <= smooth and not smooth & {"eps_low", "nu"}
    assert set(compose(["gate=student"]).gate) == smooth | {"nu"}
    assert set(compose(["gate=custom", "gate.name=harness.gates:sigmoid_F"]).gate) == smooth | {"allow_inadmissible"}


def test_bad_sweep_value_exits_2_and_leaves_no_multirun_dir(tmp_path, capsys, in_process_cli):
    from harness.cli import main

    assert main(["sweep", "gate.tau_pos=-1", "hydra.sweeper.report=false"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "harness sweep gates: error: gate.tau_pos must be a finite number > 0, got -1.0"
    assert not (tmp_path / "multirun").exists()


def test_full_error_shows_the_traceback(tmp_path, cache_dir):
    out = _harness(["run", "train.save_every=0"], tmp_path, cache_dir, timeout=300, HYDRA_FULL_ERROR="1")
    assert out.returncode == 1 and "Traceback" in out.stderr and "train.save_every" in out.stderr


# ------------------------------------------------------------------------------- 7. unreachable stores, timed


def test_unreachable_stores_fail_within_seconds_naming_tracking_uri(tmp_path):
    """A closed port, a server that accepts and never answers, and SQLite on a path nothing can be written to."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nobody ever answers them
    closed = _free_port()
    readonly = _unwritable(tmp_path)
    cases = {f"http://127.0.0.1:{closed}/": "Connection refused",
             f"http://127.0.0.1:{silent.getsockname()[1]}": "no answer within",
             f"sqlite:///{readonly / 'mlflow.db'}": "not writable"}
    try:
        for uri, why in cases.items():
            t0 = time.monotonic()
            with pytest.raises(tracking.TrackingUnavailable) as info:
                tracking.check_store(OmegaConf.create({"uri": uri, "experiment": "x"}))
            took = time.monotonic() - t0
            print(f"unreachable store {uri}: failed in {took:.2f} s: {info.value}")
            assert took < 10 and str(info.value).startswith(f"tracking.uri={uri}") and why in str(info.value)
    finally:
        silent.close()


@pytest.mark.slow
def test_unreachable_store_fails_the_command_with_one_line(tmp_path, cache_dir):
    t0 = time.monotonic()
    out = _harness(["run", f"tracking.uri=http://127.0.0.1:{_free_port()}/", *TINY], tmp_path, cache_dir, timeout=300)
    took = time.monotonic() - t0
    print(f"harness run with an unreachable tracking.uri: exit {out.returncode} after {took:.1f} s (process included)")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("harness run: error: tracking.uri=http://127.0.0.1:") and "Connection refused" in line
    assert not list(tmp_path.rglob("step-*"))


# ------------------------------------------------------------------------------- 8. no orphan RUNNING runs


@pytest.mark.slow
def test_killed_runs_never_stay_running(tmp_path, cache_dir):
    """`harness run` SIGKILLed after its first checkpoint (its run left RUNNING), continued with `resume=true` (which
    marks it KILLED, superseded), SIGTERMed (its run ends KILLED at once), and continued to the end."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    out_dir = tmp_path / "run"
    args = ["run", *TINY, "train.steps=6", "eval.enabled=false", f"tracking.uri=sqlite:///{db}",
            f"output_dir={out_dir}"]

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(_cmd(*args, *extra), cwd=tmp_path, env=_env(cache_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def metric_rows() -> int:
        return _count(db, "select count(*) from metrics where key = 'train/reward'")

    first = start()
    _wait_for(lambda: (out_dir / "checkpoints" / "step-000002" / "manifest.json").exists(), 300, "step 2")
    first.kill()  # SIGKILL: nothing runs on the way out
    first.communicate(timeout=60)
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("harness").experiment_id
    (killed,) = client.search_runs([exp])
    assert killed.info.status == "RUNNING"

    second = start("resume=true")
    logged = metric_rows()
    _wait_for(lambda: metric_rows() > logged, 300, "a step of the resumed run")
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM
    runs = {r.info.run_id: r for r in client.search_runs([exp])}
    resumed = next(r for rid, r in runs.items() if rid != killed.info.run_id)
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert runs[killed.info.run_id].data.tags[K.TAG_SUPERSEDED_BY] == resumed.info.run_id
    assert resumed.info.status == "KILLED" and "stopped" in resumed.data.tags[K.TAG_FAILURE_REASON]

    third = _harness([*args, "resume=true"], tmp_path, cache_dir)
    assert third.returncode == 0, third.stderr[-3000:]
    final = [r for r in client.search_runs([exp]) if r.info.status == "FINISHED"]
    assert len(final) == 1 and not [r for r in client.search_runs([exp]) if r.info.status == "RUNNING"]
    steps = [m.step for m in client.get_metric_history(final[0].info.run_id, "train/reward")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # the whole curve, restored steps included


# ------------------------------------------------------------------------------- 10. TRL at the default cell


@pytest.mark.slow
def test_trl_fast_path_trains_exactly_as_the_stock_path(tmp_path, cache_dir):
    """What makes `backend=trl` fast on the transformers path changes no update: the cached sampler draws the rollouts
    `model.generate` draws, and leaving zero-advantage rows out of the passes gives the same losses, gradient norms
    and weights (the wall-clock side is benchmarks/bench_trainer.py's default-cell rows)."""
    from safetensors.torch import load_file

    from harness.backends.trl import train

    def run(name: str, *extra: str):
        cfg = compose(["backend=trl", "backend.device=cpu", "backend.threads=1", "backend.progress=false",
                       "train.steps=2", "train.rollout_batch_size=32", "train.num_generations=8",
                       "train.mini_batch_size=16", "train.micro_batch_size=16", "train.max_new_tokens=16",
                       "train.warmup_steps=0", "train.save_every=2", "train.lr=1e-3", "eval.enabled=false",
                       f"cache_dir={cache_dir}", *extra])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / name)
        return train(cfg)

    fast = run("fast")
    rows = run("all-rows", "backend.skip_zero_advantage=false")
    stock = run("stock", "backend.sampler=generate", "backend.skip_zero_advantage=false")
    assert any(h["zero_var_frac"] > 0 for h in fast.history)  # some rows were left out
    for a, b, c in zip(fast.history, rows.history, stock.history, strict=True):
        assert a["reward"] == b["reward"] == c["reward"] and a["response_length"] == c["response_length"]
        for key in ("it1/loss", "it2/loss", "it1/grad_norm", "it2/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7) == pytest.approx(c[key], rel=1e-5, abs=1e-7)
    wa, wb = (load_file(str(r.final_checkpoint / "model.safetensors")) for r in (fast, stock))
    # Adam moves a weight by up to lr = 1e-3 a step; float rounding of near-zero gradients (sums over other row sets)
    # shifts a few of those steps by a fraction of that
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
