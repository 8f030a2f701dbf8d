"""MLflow tracking: the store, one parent run per sweep, one child run per cell, all through an explicit
``MlflowClient`` (no global tracking URI, no active-run state shared between cells of one process).

A local SQLite store needs no server (``tracking.uri`` default ``sqlite:///mlflow.db`` in the working
directory); point ``tracking.uri`` at ``http://host:5000`` or a Postgres URL for many nodes (never SQLite on
NFS). The store and the experiment are created by the driver before any parallel job starts: two processes
migrating a fresh SQLite store at once crash.

What gets logged under which name is :mod:`harness.keys`; what a cell is (its tags, params and config hash) is
:mod:`harness.cell`.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import keys as K

PARENT_FILE = ".mlflow_parent_run"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100


def tracking_uri(tracking_cfg: Any) -> str:
    """``tracking.uri``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = tracking_cfg.get("uri") if tracking_cfg is not None else None
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mask_url(url: str) -> str:
    """``url`` without its password (for tags, logs and reports)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@dataclass
class Store:
    """One MLflow store and experiment, opened by :func:`open_store`."""

    uri: str
    experiment: str
    experiment_id: str
    client: Any  # mlflow.tracking.MlflowClient


def open_store(tracking_cfg: Any) -> Store:
    """Open the store of ``tracking_cfg`` (creating it runs the SQLite migrations) and its experiment
    ``tracking.experiment`` (created if missing). Call once in the driver before launching parallel jobs."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking_cfg)
    client = MlflowClient(tracking_uri=uri)
    name = str(tracking_cfg.experiment)
    exp = client.get_experiment_by_name(name)
    experiment_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    return Store(uri, name, experiment_id, client)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are strings of <= 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` as floats (booleans, strings, NaN and inf are left out: a NaN
    point breaks every curve drawn from it)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _runs(store: Store, filter_string: str, max_results: int = 1000) -> list[Any]:
    return list(store.client.search_runs([store.experiment_id], filter_string=filter_string, max_results=max_results))


def finished_run(store: Store, chash: str) -> str | None:
    """Id of a FINISHED run with this config hash, if any."""
    runs = _runs(store, f"tags.{K.TAG_CONFIG_HASH} = '{chash}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def supersede_stale_runs(store: Store, chash: str, run_id: str) -> list[str]:
    """Mark runs of this config hash left RUNNING (a killed sweep) as KILLED, tagged with the run that continues
    them; returns their ids. Called by the run that resumes the cell from its checkpoint (two sweeps must never run
    one cell at once anyway: they would share its output directory)."""
    stale = [r.info.run_id for r in _runs(store, f"tags.{K.TAG_CONFIG_HASH} = '{chash}' and "
                                                 "attributes.status = 'RUNNING'") if r.info.run_id != run_id]
    for rid in stale:
        store.client.set_tag(rid, K.TAG_SUPERSEDED_BY, run_id)
        store.client.set_terminated(rid, "KILLED")
    return stale


def start_parent(store: Store, *, name: str, tags: Mapping[str, str]) -> str:
    """Create the sweep's parent run (its jobs may live in other processes: they name it as their parent)."""
    run = store.client.create_run(store.experiment_id, run_name=name,
                                  tags=_resolve_tags({**tags, K.TAG_GIT_COMMIT: git_commit()}))
    return run.info.run_id


def end_parent(store: Store, run_id: str, summary: Mapping[str, Any], *, status: str | None = None) -> None:
    """Log a sweep's counts to its parent run and close it (FAILED when a cell failed, unless ``status`` says)."""
    for key in ("cells", "finished", "skipped", "failed", "seconds"):
        if key in summary:
            store.client.log_metric(run_id, K.sweep_key(key), float(summary[key]))
    store.client.set_terminated(run_id, status or ("FINISHED" if not summary.get("failed") else "FAILED"))


def write_parent(sweep_dir: str | Path, run_id: str) -> None:
    """Remember the parent run for the sweep's jobs (which may run in other processes or on other nodes)."""
    (Path(sweep_dir) / PARENT_FILE).write_text(run_id)


def read_parent(sweep_dir: str | Path | None) -> str | None:
    path = Path(sweep_dir) / PARENT_FILE if sweep_dir else None
    return path.read_text().strip() if path is not None and path.exists() else os.environ.get("HARNESS_PARENT_RUN_ID")


def _resolve_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus MLflow's context tags (user, source), as the fluent API adds them."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(dict(tags))


class RunLogger:
    """Logging verbs of one open run: training steps, evaluations, a cell's files."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id

    @property
    def client(self) -> Any:
        return self.store.client

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in finite(metrics).items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One training step's history entry as ``train/<key>`` at MLflow step ``step`` (the backends' callback)."""
        self.log_metrics({K.train_key(k): v for k, v in metrics.items() if k != K.STEP}, step=step)

    def log_eval(self, summary: Mapping[str, Any], prefix: str = K.EVAL) -> None:
        """An evaluation summary as ``eval/<benchmark>/<metric>`` (and ``eval/mean_accuracy``), the evaluator's
        files (per-sample JSONL, summary.json) as artifacts under ``<prefix>/``."""
        flat: dict[str, Any] = {}
        for bench, metrics in (summary.get("benchmarks") or {}).items():
            for key, value in metrics.items():
                flat[K.eval_key(bench, key, prefix)] = value
        if K.MEAN_ACCURACY in summary:
            flat[K.mean_accuracy_key(prefix)] = summary[K.MEAN_ACCURACY]
        self.log_metrics(flat)
        out_dir = summary.get("out_dir")
        if out_dir and Path(out_dir).is_dir():
            self.client.log_artifacts(self.run_id, str(out_dir), artifact_path=prefix)

    def logged_steps(self, key: str = K.train_key(K.REWARD)) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def backfill_steps(self, history: Sequence[Mapping[str, Any]]) -> int:
        """Log the steps of ``history`` this run has not seen; returns how many.

        A cell resumed from a checkpoint only streams the steps after it through :meth:`log_step`; the earlier ones
        (restored with the checkpoint, identical to what was logged before the kill) are logged here, so the
        FINISHED run carries the whole training curve."""
        logged = self.logged_steps()
        missing = [h for h in history if K.STEP in h and int(h[K.STEP]) not in logged]
        for h in missing:
            self.log_step(int(h[K.STEP]), h)
        return len(missing)

    def log_cell(self, summary: Mapping[str, Any], out_dir: Path) -> None:
        """A finished cell's evaluation metrics and files, and any training step not streamed (a resumed cell)."""
        history_file = out_dir / K.HISTORY_FILE
        if history_file.exists():
            self.backfill_steps(json.loads(history_file.read_text()))
        for prefix in (K.EVAL, K.EVAL_INITIAL):
            if prefix in summary:
                self.log_eval(summary[prefix], prefix)
        for name in (K.HISTORY_FILE, K.SUMMARY_FILE):
            if (out_dir / name).exists():
                self.client.log_artifact(self.run_id, str(out_dir / name))
        self.log_metrics({k: summary[k] for k in (K.TRAIN_TIME_S, K.EVAL_TIME_S) if k in summary})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


@contextmanager
def cell_run(store: Store, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, str],
             config_yaml: str, parent_run_id: str | None = None,
             stop_exceptions: tuple[type[BaseException], ...] = ()) -> Iterator[RunLogger]:
    """``with cell_run(store, ...) as run:`` — a (child) run with the cell's tags, params and resolved config.

    On leaving normally the run is FINISHED. An exception in ``stop_exceptions`` (a pruned tuning trial) ends it
    KILLED; any other marks it FAILED with the tag ``failure_reason``. Both propagate."""
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = store.client.create_run(store.experiment_id, run_name=run_name, tags=_resolve_tags(all_tags))
    logger = RunLogger(store, run.info.run_id)
    status = "FINISHED"
    try:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            store.client.log_batch(logger.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        store.client.log_text(logger.run_id, config_yaml, K.CONFIG_ARTIFACT)
        yield logger
    except stop_exceptions:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "FAILED"
        store.client.set_tag(logger.run_id, K.TAG_FAILURE_REASON, f"{type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        store.client.set_terminated(logger.run_id, status)
