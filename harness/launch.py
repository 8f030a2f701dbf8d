"""Multi-process cells: a cell with ``backend.num_processes`` = N > 1 (``backend=trl``) runs as N processes under
``accelerate launch`` (or ``torchrun``), one per GPU, or N gloo processes on a CPU.

The process that owns the cell (``harness run``, or the sweep's job: a local launcher's or a SLURM array task's) is
its *launcher*, :func:`run_launched`. With the config already checked (:func:`harness.cell.validate_cell`), it

1. builds the starting model once (the embedded one) and verifies the checkpoint a resumed cell continues from,
   setting broken ones aside, so every rank finds the same one;
2. writes the resolved config and a spec to ``<output_dir>/launch/`` and runs :func:`launch_command`, e.g.
   ``accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 8 --main_process_port P
   -m harness.launch <output_dir>/launch/spec.json``, its output shown and kept in ``launch/launch.log``.

Every rank (:func:`rank_main`) loads that config. Rank 0 runs the cell as a one-process cell runs
(:func:`harness.cell.run_tracked`: train, evaluate, log to MLflow, the cell's files); the others train. A rank that
dies makes torch's elastic agent stop the others at once; a rank that hangs makes the others fail in their next
collective after ``backend.collective_timeout_s``. Either way :func:`run_launched` raises :class:`LaunchFailed` naming
the rank that failed first with its exit code or signal (rank 0's own error where it had one) and marks the cell's
MLflow run FAILED with that reason; run again, the cell resumes from its last verified checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.backends.common import num_processes
from harness.cell import run_cell, run_tracked

LAUNCH_DIR = "launch"  # under the cell's output directory
SPEC_FILE, CONFIG_FILE, LOG_FILE = "spec.json", "cell.yaml", "launch.log"
RUN_FILE, RESULT_FILE, ERROR_FILE = "run.json", "result.json", "error.json"  # written by rank 0
LOG_TAIL_LINES = 20  # lines of the launch log a failure reason quotes when no rank said why


class LaunchFailed(RuntimeError):
    """A multi-process cell that did not finish: which rank failed first, and how."""


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


def prepare(cfg: DictConfig) -> Path | None:
    """What the launcher does once for all ranks: build the embedded starting model, and verify the checkpoint a
    resumed cell continues from (broken ones are set aside here, not by N ranks at once). Returns that checkpoint."""
    from harness.backends.trl import resume_point
    from harness.models import resolve_model_path

    resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
    return resume_point(cfg)


def run_launched(cfg: DictConfig, store: Any | None, *, run_name: str | None = None,
                 parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None,
                 supersede_stale: bool = False, supersede_dead: bool = False) -> tuple[str | None, dict[str, Any]]:
    """Run the cell as ``backend.num_processes`` processes and wait for them: what :func:`harness.cell.run_tracked`
    returns, ``(run id, summary)``, from rank 0 (``store`` None: ``tracking.enabled=false``, run id None).
    :class:`LaunchFailed` when a rank fails, after the cell's MLflow run is marked FAILED with the reason."""
    out = Path(cfg.output_dir)
    work = out / LAUNCH_DIR
    work.mkdir(parents=True, exist_ok=True)
    for name in (RUN_FILE, RESULT_FILE, ERROR_FILE):
        (work / name).unlink(missing_ok=True)
    resume_from = prepare(cfg)
    (work / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    spec = {"config": str(work / CONFIG_FILE), "tracking": store is not None, "run_name": run_name,
            "parent_run_id": parent_run_id, "extra_tags": dict(extra_tags or {}), "supersede_stale": supersede_stale,
            "supersede_dead": supersede_dead, "resume_from": None if resume_from is None else str(resume_from)}
    (work / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    command = launch_command(cfg, work / SPEC_FILE)
    print(f"{run_name or out.name}: {num_processes(cfg)} processes: {' '.join(command)}", file=sys.stderr, flush=True)
    log_path = work / LOG_FILE
    since = log_path.stat().st_size if log_path.exists() else 0  # the log keeps every launch of the cell
    code = _run_teed(command, log_path)
    result = _read_json(work / RESULT_FILE)
    if code == 0 and result is not None:
        return result.get("run_id"), result["summary"]
    reason = failure_reason(work, code, since=since)
    run_id = (_read_json(work / RUN_FILE) or {}).get("run_id")
    if store is not None and run_id:
        from harness import tracking

        tracking.mark_failed(store, run_id, reason)
    raise LaunchFailed(reason)


def _run_teed(command: list[str], log_path: Path) -> int:
    """Run ``command`` in its own process group, its output copied line by line to stderr and ``log_path``; a
    signal that ends this process (SIGTERM: a sweep stopped, a SLURM job preempted) ends the ranks too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
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
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def failure_reason(work: Path, code: int, *, since: int = 0) -> str:
    """Why a launch failed, in one line: the first failure torch's elastic agent reports (its rank and exit code, or
    the signal that killed it), with rank 0's own error where that rank was rank 0 (the other ranks' errors are
    then echoes: a collective that lost its peer), else rank 0's error, else the launcher's exit code and the launch
    log's last lines. The log is read from byte ``since`` (where this launch began)."""
    error = (_read_json(work / ERROR_FILE) or {}).get("reason")
    log = ""
    if (work / LOG_FILE).exists():
        with open(work / LOG_FILE, "rb") as f:
            f.seek(since)
            log = f.read().decode(errors="replace")
    root = root_cause(log)
    if root is not None and (root[0] != 0 or not error):
        return root[1]
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
    from harness.backends.trl import resume_point
    from harness.cell import validate_cell
    from harness.config import sigterm_as_exit

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent
    cfg = OmegaConf.load(spec["config"])
    assert isinstance(cfg, DictConfig)
    (work / f"rank-{rank()}.pid").write_text(str(os.getpid()))
    with sigterm_as_exit():
        validate_cell(cfg)
        found = resume_point(cfg)  # the launcher verified it: every rank must continue from that one
        if (None if found is None else str(found)) != spec["resume_from"]:
            raise LaunchFailed(f"rank {rank()} would resume from {found}, the launcher verified "
                               f"{spec['resume_from']}")
        if rank() != 0:
            get_backend(cfg.backend.name)(cfg, None)
            return 0
        try:
            if spec["tracking"]:
                result = _tracked(cfg, spec, work)
            else:
                result = {"run_id": None, "summary": run_cell(cfg)}
        except Exception as exc:  # not SIGTERM's SystemExit: the agent stopping rank 0 after another rank failed
            _write_json(work / ERROR_FILE, {"reason": f"{type(exc).__name__}: {exc}"})
            raise
        _write_json(work / RESULT_FILE, result)
    return 0


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
