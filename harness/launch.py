"""Multi-process cells: a cell with ``backend.num_processes`` = N > 1 (``backend=trl``) runs as N processes under
``accelerate launch`` (or ``torchrun``), one per GPU, or N gloo processes on a CPU.

The process that owns the cell (``harness run``, or the sweep's job: a local launcher's or a SLURM array task's) is
its *launcher*, :func:`run_launched`. With the config already checked (:func:`harness.cell.validate_cell`), it

1. builds the starting model once (the embedded one) and verifies the checkpoint a resumed cell continues from,
   setting broken ones aside; every rank is handed that one (``harness.backends.trl.LAUNCH_RESUME_ENV``);
2. writes the resolved config and a spec to ``<output_dir>/launch/`` and runs :func:`launch_command`, e.g.
   ``accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 8 --main_process_port P
   -m harness.launch <output_dir>/launch/spec.json``, its output shown and kept in ``launch/launch.log``.

Every rank (:func:`rank_main`) loads that config. Rank 0 runs the cell as a one-process cell runs
(:func:`harness.cell.run_tracked`: train, evaluate, log to MLflow, the cell's files); the others train. A rank that
dies makes torch's elastic agent stop the others at once; a rank that hangs makes the others fail in their next
collective after ``backend.collective_timeout_s``. Either way :func:`run_launched` raises :class:`LaunchFailed` naming
the rank that failed first with its exit code or signal (rank 0's own error where it had one) and marks the cell's
MLflow run FAILED with that reason; run again, the cell resumes from its last verified checkpoint.

No rank outlives its cell. torch's agent starts each rank in a session of its own, so the launcher stops any rank
still running once the agent is gone (:func:`stop_ranks`), and each rank ends itself when the launcher is gone
(:func:`stop_with_owner`). Cells side by side on one machine each hold their own share of its GPUs (:func:`gpu_slot`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.backends.common import num_processes
from harness.cell import run_cell, run_tracked

LAUNCH_DIR = "launch"  # under the cell's output directory
SPEC_FILE, CONFIG_FILE, LOG_FILE = "spec.json", "cell.yaml", "launch.log"
RUN_FILE, RESULT_FILE = "run.json", "result.json"  # written by rank 0
ERROR_FILE = "error-{rank}.json"  # a rank's own error, by every rank that raised one
LOG_TAIL_LINES = 20  # lines of the launch log a failure reason quotes when no rank said why
STOP_GRACE_S = 30  # seconds a rank told to stop (SIGTERM) has to end before it is killed
OWNER_POLL_S = 1.0  # how often a rank checks that the process that started the launch is alive


class LaunchFailed(RuntimeError):
    """A multi-process cell that did not finish: which rank failed first, and how; ``run_id``: the cell's MLflow run
    (marked FAILED), None when rank 0 had not started one."""

    def __init__(self, reason: str, run_id: str | None = None) -> None:
        super().__init__(reason)
        self.run_id = run_id


def launches(cfg: Any) -> bool:
    """Whether this process must start the cell's ranks: a training cell (a baseline only evaluates) that asks for
    several and is not one of a launch already."""
    return (num_processes(cfg) > 1 and cfg.get("role", "cell") != "baseline"
            and int(os.environ.get("WORLD_SIZE", "1")) <= 1)


def rank() -> int:
    """This process's rank in a launch (``RANK``, set by accelerate / torchrun), else 0."""
    return int(os.environ.get("RANK", "0") or 0)


def free_port() -> int:
    """A TCP port nothing listens on now: the rendezvous port of one cell's ranks (two cells on one machine, or a
    cell beside another job, must not share one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(cfg: Any, spec: str | Path, *, port: int | None = None) -> list[str]:
    """The command that starts the cell's ranks, each running ``python -m harness.launch <spec>``."""
    from harness.backends.trl_config import accelerate_config_file

    n = num_processes(cfg)
    port = free_port() if port is None else port
    if str(cfg.backend.get("launcher", "accelerate")) == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--nnodes=1",
                f"--master_port={port}", "-m", "harness.launch", str(spec)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_file(cfg)),
            "--num_processes", str(n), "--num_machines", "1", "--main_process_port", str(port),
            "-m", "harness.launch", str(spec)]


@contextmanager
def gpu_slot(lock_dir: Path, slots: int, processes: int, visible: Sequence[str]) -> Iterator[str]:
    """The GPUs of one of ``slots`` cells that run side by side on one machine (``hydra.launcher.n_jobs``): the
    visible GPUs split into ``slots`` equal shares of w = len(visible) // slots, slot k holding
    ``visible[k·w : k·w + processes]``. A slot is held by an exclusive lock on ``lock_dir/gpu-slot-<k>.lock`` for as
    long as its cell runs (a free one is waited for), so two cells never share a GPU; yields the slot's devices as
    ``CUDA_VISIBLE_DEVICES`` lists them."""
    import fcntl
    import time

    width = len(visible) // slots
    if processes > width:
        raise ValueError(f"{slots} cells side by side on {len(visible)} GPUs leave {width} GPU(s) per cell, not the "
                         f"{processes} of backend.num_processes: lower hydra.launcher.n_jobs")
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for k in range(slots):
            handle = open(lock_dir / f"gpu-slot-{k}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield ",".join(visible[k * width:k * width + processes])
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(1.0)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (all of them when it is unset)."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def rank_threads(processes: int) -> int:
    """CPU threads per rank: this process's share (``OMP_NUM_THREADS`` where set, as a SLURM task's setup sets it to
    its cores, else the cores it may run on) divided over the ranks, so N ranks do not each start a thread per core."""
    own = os.environ.get("OMP_NUM_THREADS", "")
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core
    cores = int(own) if own.isdigit() and int(own) > 0 else len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, cores // processes)


def prepare(cfg: DictConfig) -> Path | None:
    """What the launcher does once for all ranks: build the embedded starting model, and verify the checkpoint a
    resumed cell continues from (broken ones are set aside here, not by N ranks at once). Returns that checkpoint."""
    from harness.backends.trl import resume_point
    from harness.models import resolve_model_path

    resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
    return resume_point(cfg)


def run_launched(cfg: DictConfig, store: Any | None, *, run_name: str | None = None,
                 parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None,
                 supersede_stale: bool = False, supersede_dead: bool = False,
                 devices: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """Run the cell as ``backend.num_processes`` processes and wait for them: what :func:`harness.cell.run_tracked`
    returns, ``(run id, summary)``, from rank 0 (``store`` None: ``tracking.enabled=false``, run id None).
    ``devices``: the ranks' ``CUDA_VISIBLE_DEVICES`` (a cell beside others: :func:`gpu_slot`), else this process's.
    :class:`LaunchFailed` when a rank fails, after the cell's MLflow run is marked FAILED with the reason."""
    out = Path(cfg.output_dir)
    work = out / LAUNCH_DIR
    work.mkdir(parents=True, exist_ok=True)
    stop_ranks(work)  # ranks of this cell's last launch still ending (their owner killed moments ago)
    for stale in [work / RUN_FILE, work / RESULT_FILE, *work.glob("error-*.json"), *work.glob("rank-*.pid")]:
        stale.unlink(missing_ok=True)
    resume_from = prepare(cfg)
    (work / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    spec = {"config": str(work / CONFIG_FILE), "tracking": store is not None, "run_name": run_name,
            "parent_run_id": parent_run_id, "extra_tags": dict(extra_tags or {}), "supersede_stale": supersede_stale,
            "supersede_dead": supersede_dead, "resume_from": None if resume_from is None else str(resume_from),
            "owner_pid": os.getpid()}
    (work / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    command = launch_command(cfg, work / SPEC_FILE)
    print(f"{run_name or out.name}: {num_processes(cfg)} processes: {' '.join(command)}", file=sys.stderr, flush=True)
    log_path = work / LOG_FILE
    since = log_path.stat().st_size if log_path.exists() else 0  # the log keeps every launch of the cell
    env = {"OMP_NUM_THREADS": str(rank_threads(num_processes(cfg))),
           **({} if devices is None else {"CUDA_VISIBLE_DEVICES": devices})}
    code = _run_teed(command, log_path, work, env)
    result = _read_json(work / RESULT_FILE)
    if code == 0 and result is not None:
        return result.get("run_id"), result["summary"]
    reason = failure_reason(work, code, since=since)
    run_id = (_read_json(work / RUN_FILE) or {}).get("run_id")
    if store is not None and run_id:
        from harness import tracking

        tracking.mark_failed(store, run_id, reason)
    raise LaunchFailed(reason, run_id)


def _run_teed(command: list[str], log_path: Path, work: Path, env: Mapping[str, str]) -> int:
    """Run ``command`` in its own process group, its output copied line by line to stderr and ``log_path``; a
    signal that ends this process (SIGTERM: a sweep stopped, a SLURM job preempted) ends the ranks too. torch's
    agent starts each rank in a session of its own, so the ranks (their pids in ``work/rank-<r>.pid``) are stopped
    one by one as well: an agent killed before it stopped them would leave them running (and holding GPUs)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
            return proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            stop_ranks(work)


def rank_pids(work: Path) -> list[int]:
    """The pids of this launch's ranks that are still running (``rank-<r>.pid``, checked against the process's
    command line, which names this launch's spec: a pid the system gave to another process since is left alone)."""
    alive = []
    for path in work.glob("rank-*.pid"):
        try:
            pid = int(path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(work / SPEC_FILE).encode() in cmdline and _running(pid):
            alive.append(pid)
    return alive


def stop_ranks(work: Path) -> None:
    """SIGTERM every rank of the launch in ``work`` still running, SIGKILL those left after ``STOP_GRACE_S``."""
    import time

    pids = rank_pids(work)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (STOP_GRACE_S if sig == signal.SIGTERM else 5)
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [pid for pid in pids if _running(pid)]
        if not pids:
            return


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie awaiting its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def failure_reason(work: Path, code: int, *, since: int = 0) -> str:
    """Why a launch failed, in one line: the first failure torch's elastic agent reports (its rank and exit code, or
    the signal that killed it, with that rank's own error where it wrote one), unless that was rank 0 and rank 0 said
    why (the other ranks' errors are then echoes: a collective that lost its peer); else rank 0's error; else the
    launcher's exit code and the launch log's last lines. The log is read from byte ``since`` (where this launch
    began)."""
    def error_of(r: int) -> str | None:
        return (_read_json(work / ERROR_FILE.format(rank=r)) or {}).get("reason")

    log = ""
    if (work / LOG_FILE).exists():
        with open(work / LOG_FILE, "rb") as f:
            f.seek(since)
            log = f.read().decode(errors="replace")
    root = root_cause(log)
    error = error_of(0)
    if root is not None and (root[0] != 0 or not error):
        own = error_of(root[0])
        return f"{root[1]}: {own}" if own and own not in root[1] else root[1]
    if error:
        hint = ""
        if "timed out" in error.lower() or "timeout" in error.lower():
            hint = " (a collective waited longer than backend.collective_timeout_s: another rank hung or is gone)"
        return f"rank 0 failed: {error}{hint}"
    tail = " | ".join(line.strip() for line in log.splitlines()[-LOG_TAIL_LINES:] if line.strip())
    return f"the launch exited with code {code}: {tail}"[:2000]


def root_cause(log: str) -> tuple[int, str] | None:
    """The failure that ended a launch, from torch's elastic agent's last report: its rank and e.g. ``rank 1
    (local_rank: 1) exited with code -9 (SIGKILL): Signal 9 (SIGKILL) received by PID 1234``; None when the log has
    no report. The earliest failure (the report's ``time``, to the second) wins; within one second a rank killed by
    a signal other than the SIGTERM the agent stops the others with comes first (a rank that failed in the same
    instant only because its peer was gone is an echo), then the agent's own "Root Cause"."""
    head, _, report = log.rpartition("Failures:")
    if not head:
        return None
    failures = []
    for block in re.split(r"^\s*\[\d+\]:\s*$", report, flags=re.M)[1:]:
        found = {key: re.search(rf"^\s*{key}\s*:\s*(.+)$", block, re.M)
                 for key in ("time", "rank", "exitcode", "traceback")}
        if found["rank"] is None or found["exitcode"] is None:
            continue
        rank_text, code = found["rank"][1].strip(), found["exitcode"][1].split("(")[0].strip()
        why = found["traceback"][1].strip() if found["traceback"] else ""
        text = f"rank {rank_text} exited with code {code}"
        number = -int(code) if code.lstrip("-").isdigit() and int(code) < 0 else None
        if number in {s.value for s in signal.Signals}:
            text += f" ({signal.Signals(number).name})"
        if why and not why.startswith(("<N/A>", "To enable traceback")):
            text = f"{text}: {why}"
        killed = number is not None and number != signal.SIGTERM
        is_root = "Root Cause" in report[:report.find(block)]
        when = found["time"][1].strip() if found["time"] else "~"  # no time: after every timed one
        failures.append(((when, not killed, not is_root), int(rank_text.split()[0]), text))
    if not failures:
        return None
    _, rank_number, text = min(failures, key=lambda f: f[0])
    return rank_number, text


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ one rank


def rank_main(spec_path: str) -> int:
    """One rank of a launched cell: rank 0 trains, evaluates and logs (its run id, result or error land next to the
    spec for the launcher); the others train."""
    from harness.backends import get_backend
    from harness.backends.trl import LAUNCH_RESUME_ENV
    from harness.cell import validate_cell
    from harness.config import sigterm_as_exit

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent
    cfg = OmegaConf.load(spec["config"])
    assert isinstance(cfg, DictConfig)
    (work / f"rank-{rank()}.pid").write_text(str(os.getpid()))
    if spec.get("owner_pid"):
        stop_with_owner(int(spec["owner_pid"]))
    # the checkpoint the launcher verified: every rank continues from it without verifying it again
    os.environ[LAUNCH_RESUME_ENV] = spec["resume_from"] or str(Path(cfg.output_dir) / "checkpoints")
    with sigterm_as_exit():
        try:
            validate_cell(cfg)
            if rank() != 0:
                get_backend(cfg.backend.name)(cfg, None)
                return 0
            if spec["tracking"]:
                result = _tracked(cfg, spec, work)
            else:
                result = {"run_id": None, "summary": run_cell(cfg)}
        except Exception as exc:  # not SIGTERM's SystemExit: the agent stopping a rank after another one failed
            _write_json(work / ERROR_FILE.format(rank=rank()), {"reason": f"{type(exc).__name__}: {exc}"})
            raise
        _write_json(work / RESULT_FILE, result)
    return 0


def stop_with_owner(owner: int) -> None:
    """A thread that ends this rank when the process that started the launch is gone (SIGKILLed, say: nothing of it
    is left to stop the ranks), or torch's agent, its parent, is (the owner then waits on the ranks' output, which
    they hold open): SIGTERM to itself, which ends a rank as a stopped sweep does, then after ``STOP_GRACE_S`` an
    immediate exit, for a rank stuck in a collective."""
    import threading
    import time

    agent = os.getppid()

    def watch() -> None:
        while _running(owner) and os.getppid() == agent:
            time.sleep(OWNER_POLL_S)
        gone = f"the launch's owner (pid {owner})" if not _running(owner) else f"its agent (pid {agent})"
        try:  # the owner read this rank's output: its pipe may be gone with it
            print(f"rank {rank()}: {gone} is gone; stopping", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def _tracked(cfg: DictConfig, spec: Mapping[str, Any], work: Path) -> dict[str, Any]:
    from harness import tracking

    store = tracking.open_store_or_offline(cfg.tracking)
    run_id, summary = run_tracked(cfg, store, run_name=spec["run_name"], parent_run_id=spec["parent_run_id"],
                                  extra_tags=spec["extra_tags"], supersede_stale=spec["supersede_stale"],
                                  supersede_dead=spec["supersede_dead"],
                                  on_start=lambda run: _write_json(work / RUN_FILE, {"run_id": run.run_id}))
    return {"run_id": run_id, "summary": summary}


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))
