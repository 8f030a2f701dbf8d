"""Runs in the store beyond one cell's logging: which process owns a run, the runs a killed sweep or driver left
RUNNING, and a sweep's parent run (created by the driver, named by its jobs, which may run elsewhere).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.provenance import git_commit
from harness.tracking.store import Store, describe, mask_url

log = logging.getLogger(__name__)

PARENT_FILE = ".mlflow_parent_run"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tag() -> str:
    """``host:pid:start``: the process that owns a run (tag :data:`harness.keys.TAG_PROCESS`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def process_alive(tag: str | None) -> bool | None:
    """Whether the process a :func:`process_tag` names still runs: None when that cannot be told from here (another
    host, or a run without the tag)."""
    if not tag or tag.count(":") < 2:
        return None
    host, pid_text, start = tag.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or _start_ticks(pid) in ("", start)


def _runs(store: Store, filter_string: str, max_results: int = 1000) -> list[Any]:
    return list(store.client.search_runs([store.experiment_id], filter_string=filter_string, max_results=max_results))


def run_status(store: Store, run_id: str | None) -> str | None:
    """The status of run ``run_id`` (RUNNING, FINISHED, ...), or None when the store has no such run."""
    try:
        return store.client.get_run(run_id).info.status if run_id else None
    except Exception:  # MLflow's RESOURCE_DOES_NOT_EXIST; a store that is gone fails the next call anyway
        return None


def finished_run(store: Store, chash: str) -> str | None:
    """Id of a FINISHED run with this config hash, if any."""
    runs = _runs(store, f"tags.{K.TAG_CONFIG_HASH} = '{chash}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def _supersede(store: Store, run_ids: Sequence[str], by: str) -> list[str]:
    for rid in run_ids:
        store.client.set_tag(rid, K.TAG_SUPERSEDED_BY, by)
        store.client.set_terminated(rid, "KILLED")
    return list(run_ids)


def supersede_stale_runs(store: Store, chash: str, run_id: str, *, only_dead: bool = False,
                         output_dir: str | None = None) -> list[str]:
    """Mark runs of this config hash left RUNNING (a killed sweep or run) as KILLED, tagged with the run that
    continues them; returns their ids. A sweep cell takes every such run (two sweeps must never run one cell at once:
    they would share its output directory). ``only_dead`` (``harness run``) spares runs whose process may still run:
    it takes those whose process is gone, and, given ``output_dir``, those that wrote there (``resume=true``)."""
    stale = []
    for r in _runs(store, f"tags.{K.TAG_CONFIG_HASH} = '{chash}' and attributes.status = 'RUNNING'"):
        if r.info.run_id == run_id:
            continue
        alive = process_alive(r.data.tags.get(K.TAG_PROCESS))
        same_dir = output_dir is not None and r.data.params.get("output_dir") == str(output_dir)
        if not only_dead or alive is False or (same_dir and alive is not True):
            stale.append(r.info.run_id)
    return _supersede(store, stale, run_id)


def supersede_stale_parents(store: Store, run_id: str) -> list[str]:
    """Mark the parent runs (sweep and tuning drivers) of this experiment that a killed driver left RUNNING as KILLED,
    tagged with the new parent ``run_id``; drivers that may still run (or run elsewhere) are left alone."""
    stale = [r.info.run_id for r in _runs(store, f"tags.{K.TAG_SWEEP} != '' and attributes.status = 'RUNNING'")
             if r.info.run_id != run_id and process_alive(r.data.tags.get(K.TAG_PROCESS)) is False]
    return _supersede(store, stale, run_id)


def mark_failed(store: Store, run_id: str, reason: str) -> None:
    """End run ``run_id`` FAILED with the tag ``failure_reason`` (a multi-process cell whose rank died: its rank 0
    may have closed the run KILLED when the others were stopped). A store that does not answer is left as it is."""
    try:
        store.client.set_tag(run_id, K.TAG_FAILURE_REASON, reason[:5000])
        store.client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the cell failed either way; its launch log says why
        log.warning("could not mark run %s FAILED (%s): %s", run_id, exc, reason)


def kill_children(store: Store, parent_run_id: str) -> list[str]:
    """Mark the parent's child runs still RUNNING as KILLED (a driver stopped by a signal: its jobs die with it)."""
    children = [r.info.run_id for r in _runs(store, f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and "
                                                    "attributes.status = 'RUNNING'")]
    for rid in children:
        store.client.set_terminated(rid, "KILLED")
    return children


def start_parent(store: Store, *, name: str, tags: Mapping[str, str]) -> str:
    """Create the sweep's parent run (its jobs may live in other processes: they name it as their parent)."""
    run = store.client.create_run(store.experiment_id, run_name=name, tags=with_context_tags(
        {**tags, K.TAG_GIT_COMMIT: git_commit(), K.TAG_PROCESS: process_tag()}))
    return run.info.run_id


def end_parent(store: Store, run_id: str, summary: Mapping[str, Any], *, status: str | None = None) -> bool:
    """Log a sweep's counts to its parent run and close it (FAILED when a cell failed, unless ``status`` says).
    Returns False, with a warning, when the store does not answer: the sweep's results are in its cells' files."""
    if not store.online:
        return False
    try:
        for key in ("cells", "finished", "skipped", "failed", "uploaded", "seconds"):
            if key in summary:
                store.client.log_metric(run_id, K.sweep_key(key), float(summary[key]))
        store.client.set_terminated(run_id, status or ("FINISHED" if not summary.get("failed") else "FAILED"))
    except Exception as exc:  # the driver must still print its summary
        store.error = describe(exc)
        log.warning("parent run %s was not closed: tracking.uri=%s does not answer (%s)", run_id,
                    mask_url(store.uri), store.error)
        return False
    return True


def write_parent(sweep_dir: str | Path, run_id: str) -> None:
    """Remember the parent run for the sweep's jobs (which may run in other processes or on other nodes)."""
    (Path(sweep_dir) / PARENT_FILE).write_text(run_id)


def read_parent(sweep_dir: str | Path | None) -> str | None:
    path = Path(sweep_dir) / PARENT_FILE if sweep_dir else None
    return path.read_text().strip() if path is not None and path.exists() else os.environ.get("HARNESS_PARENT_RUN_ID")


def with_context_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus MLflow's context tags (user, source), as the fluent API adds them (every run the harness creates
    gets them: a sweep's parent here, a cell's run in :mod:`harness.tracking.run_logger`)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(dict(tags))

