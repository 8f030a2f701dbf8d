"""MLflow tracking: the store, one parent run per sweep, one child run per cell, all through an explicit
``MlflowClient`` (no global tracking URI, no active-run state shared between cells of one process).

A local SQLite store needs no server (``tracking.uri`` default ``sqlite:///mlflow.db`` in the working
directory); point ``tracking.uri`` at ``http://host:5000`` or a Postgres URL for many nodes (never SQLite on
NFS). Creating a fresh SQLite store runs MLflow's schema migrations, which crash when two processes run them at
once, so :func:`open_store` holds a file lock next to the database while it opens it.

Training is never hostage to tracking: :func:`check_store` fails in seconds, naming ``tracking.uri``, before any
compute; :class:`RunLogger` sends training steps from a background thread, goes offline when the store stops
answering (the cell trains on and keeps its own files; :data:`harness.keys.PENDING_UPLOAD_FILE` marks its run as
awaiting upload) and catches up if it answers again; :func:`harness.cell.upload_cell` later uploads what the store
lacks from the cell's files. HTTP stores get short retries (:data:`HTTP_DEFAULTS`, MLflow's own settings).

What gets logged under which name is :mod:`harness.keys`; what a cell is (its tags, params and config hash) is
:mod:`harness.cell`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.config import ConfigError
from harness.provenance import git_commit

log = logging.getLogger(__name__)

PARENT_FILE = ".mlflow_parent_run"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
# MLflow's defaults (7 retries, exponential backoff, 120 s timeout) hold one request to a lost server for minutes;
# these give up in seconds (the logger retries on its own schedule, off the training thread). The environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
CHECK_TIMEOUT_S = 10.0  # check_store's budget for a store that does not answer
OPEN_TIMEOUT_S = 120.0  # ... and for opening one that answered its probe (a fresh server migrates its database)
PROBE_TIMEOUT_S = 3.0  # one reachability probe of an HTTP store
RETRY_S = 15.0  # an offline logger probes the store this often
FLUSH_S = 30.0  # at the end of a run, how long the steps still queued may take to reach a store that answers
MIGRATION_LOCK_S = 300.0  # how long to wait for another process migrating the same fresh SQLite store
KNOWN_SCHEMES = r"^(sqlite|https?|postgresql|mysql|mssql|file|databricks)[:+]"


class TrackingUnavailable(ConfigError):
    """The tracking store cannot be reached or written (a one-line message naming ``tracking.uri``)."""


def tracking_uri(tracking_cfg: Any) -> str:
    """``tracking.uri``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = tracking_cfg.get("uri") if tracking_cfg is not None else None
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mask_url(url: str) -> str:
    """``url`` without its password (for tags, logs and reports)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def describe(exc: BaseException) -> str:
    """An exception as one short line: MLflow's span many lines and repeat the URL; a failed connection is said as
    the operating system said it."""
    text = " ".join(str(exc).split())
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        return f"connection failed ({errno.group(0).strip()})"
    if "Read timed out" in text or "ReadTimeout" in text:
        return "no answer (read timed out)"
    return f"{type(exc).__name__}: {text}"[:300]


def use_short_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` in this process's environment (and so its workers') where the user set nothing."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass
class Store:
    """One MLflow store and experiment, opened by :func:`open_store`."""

    uri: str
    experiment: str
    experiment_id: str | None
    client: Any  # mlflow.tracking.MlflowClient
    error: str | None = None  # why the store does not answer (set by whoever saw it fail); None: it did answer

    @property
    def online(self) -> bool:
        return self.error is None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def migration_lock(uri: str) -> Iterator[None]:
    """Serialise opening (so creating and migrating) one SQLite store across processes: MLflow runs its schema
    migrations on the first open, and two at once fail ("duplicate column name")."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(path) + ".lock", timeout=MIGRATION_LOCK_S):
        yield


def open_store(tracking_cfg: Any) -> Store:
    """Open the store of ``tracking_cfg`` (creating it runs the SQLite migrations, one process at a time) and its
    experiment ``tracking.experiment`` (created if missing)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    use_short_http_retries()
    uri = tracking_uri(tracking_cfg)
    name = str(tracking_cfg.experiment)
    with migration_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = experiment_id_for(client, name)
        except MlflowException:  # another driver (on another store process) created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    return Store(uri, name, experiment_id, client)


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing, marked as a model-training experiment
    (:data:`harness.keys.EXPERIMENT_KIND`): without that tag MLflow 3's UI opens it on the GenAI overview (traces,
    latency, tokens: all empty) instead of the runs table with its parent/child tree."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={K.TAG_EXPERIMENT_KIND: K.EXPERIMENT_KIND})
    if exp.tags.get(K.TAG_EXPERIMENT_KIND) is None:  # a store written before experiments carried their kind
        client.set_experiment_tag(exp.experiment_id, K.TAG_EXPERIMENT_KIND, K.EXPERIMENT_KIND)
    return exp.experiment_id


def open_store_or_offline(tracking_cfg: Any) -> Store:
    """:func:`open_store`, or an offline :class:`Store` (``store.error`` says why) when it does not answer: a sweep
    cell trains either way."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking_cfg)
    reason = reachable(uri)
    if reason is None:
        try:
            return open_store(tracking_cfg)
        except Exception as exc:
            reason = describe(exc)
    log.warning("tracking.uri=%s is unusable (%s): training without it; the run awaits upload", mask_url(uri), reason)
    return Store(uri, str(tracking_cfg.experiment), None, MlflowClient(tracking_uri=uri), error=reason)


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the store at ``uri`` cannot be used right now, or None. HTTP: one GET of the server's ``/health`` (any
    answer counts); SQLite: the database's directory exists and a file can be created in it (the database too, when
    it exists). Other stores are only found out by opening them."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                return f"no answer within {timeout:g} s"
            return f"cannot connect ({reason})"
    path = sqlite_path(uri)
    if path is None:
        return None
    folder = path.parent  # MLflow creates missing folders: the nearest existing one must take them
    while not folder.is_dir() and folder != folder.parent:
        if folder.exists():
            return f"{folder} is not a directory"
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".harness-write-check-"):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        return f"not writable ({exc.strerror or exc}: {exc.filename or path})"
    return None


def validate_tracking_config(tracking_cfg: Any) -> None:
    """The ``tracking`` node's keys, without touching the store (``ConfigError`` naming the key)."""
    experiment = tracking_cfg.get("experiment")
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"tracking.experiment must be a non-empty string, got {experiment!r}")
    enabled = tracking_cfg.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"tracking.enabled must be true or false, got {enabled!r}")
    uri = tracking_cfg.get("uri")
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise ConfigError(f"tracking.uri must be null (./mlflow.db) or a store URI, got {uri!r}")
    if isinstance(uri, str) and "://" in uri and not re.match(KNOWN_SCHEMES, uri):
        raise ConfigError(f"tracking.uri={mask_url(uri)} has an unknown scheme (use sqlite:///PATH, "
                          "http(s)://HOST:PORT, postgresql://..., mysql://...)")


def check_store(tracking_cfg: Any, timeout: float = CHECK_TIMEOUT_S) -> Store:
    """The store, opened, or :class:`TrackingUnavailable` naming ``tracking.uri``: run it before any compute, so a
    typo, a read-only path or a server that is down costs seconds (``timeout``), not a training run. A store that
    answered its probe may take up to :data:`OPEN_TIMEOUT_S` to open (a fresh one creates its tables)."""
    validate_tracking_config(tracking_cfg)
    uri = tracking_uri(tracking_cfg)
    t0 = time.monotonic()
    reason = reachable(uri, timeout=min(PROBE_TIMEOUT_S, timeout))
    if reason is not None:
        raise TrackingUnavailable(f"tracking.uri={mask_url(uri)} is unusable: {reason}")
    if sqlite_path(uri) is not None:  # a local file, checked above: creating (migrating) a fresh one takes its time
        try:
            return open_store(tracking_cfg)
        except Exception as exc:
            raise TrackingUnavailable(f"tracking.uri={mask_url(uri)} is unusable: {describe(exc)}") from exc
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["store"] = open_store(tracking_cfg)
        except BaseException as exc:  # reported to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, name="tracking-check", daemon=True)
    thread.start()
    probed = uri.startswith(("http://", "https://"))
    limit = OPEN_TIMEOUT_S if probed else timeout
    thread.join(max(0.5, limit - (time.monotonic() - t0)))
    if thread.is_alive():
        raise TrackingUnavailable(f"tracking.uri={mask_url(uri)} did not answer within {limit:g} s")
    if "error" in result:
        raise TrackingUnavailable(f"tracking.uri={mask_url(uri)} is unusable: {describe(result['error'])}")
    return result["store"]


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


# ------------------------------------------------------------------------------------------ who owns a run


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


def kill_children(store: Store, parent_run_id: str) -> list[str]:
    """Mark the parent's child runs still RUNNING as KILLED (a driver stopped by a signal: its jobs die with it)."""
    children = [r.info.run_id for r in _runs(store, f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and "
                                                    "attributes.status = 'RUNNING'")]
    for rid in children:
        store.client.set_terminated(rid, "KILLED")
    return children


def start_parent(store: Store, *, name: str, tags: Mapping[str, str]) -> str:
    """Create the sweep's parent run (its jobs may live in other processes: they name it as their parent)."""
    run = store.client.create_run(store.experiment_id, run_name=name, tags=_resolve_tags(
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


def _resolve_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus MLflow's context tags (user, source), as the fluent API adds them."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(dict(tags))


# ------------------------------------------------------------------------------------------ pending uploads


def read_pending(out_dir: str | Path | None) -> dict[str, Any] | None:
    """The pending-upload marker of a cell's output directory (:data:`harness.keys.PENDING_UPLOAD_FILE`), if any."""
    path = Path(out_dir) / K.PENDING_UPLOAD_FILE if out_dir else None
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": f"unreadable marker {path}"}


def clear_pending(out_dir: str | Path | None) -> None:
    if out_dir:
        (Path(out_dir) / K.PENDING_UPLOAD_FILE).unlink(missing_ok=True)


@dataclass
class RunSpec:
    """What creates a cell's run (kept, so a run the store could not create at the start is created later)."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    config_yaml: str


class RunLogger:
    """Logging verbs of one run: training steps (queued, sent by a background thread), evaluations, a cell's files.

    Training only ever queues a step (:meth:`log_step`); the thread sends the queued steps in batches. When the store
    fails, the logger goes offline: it skips further calls (their data is in the cell's files), probes the store every
    :data:`RETRY_S` seconds, and once it answers resends what the store lacks. :meth:`close` ends the run, or writes
    the pending-upload marker when the store did not take everything."""

    def __init__(self, store: Store, run_id: str | None = None, *, spec: RunSpec | None = None,
                 out_dir: str | Path | None = None) -> None:
        self.store, self.run_id, self.spec = store, run_id, spec
        self.out_dir = Path(out_dir) if out_dir else None
        self.error: str | None = store.error
        self._spec_done: set[str] = set()
        self._steps: dict[int, dict[str, float]] = {}
        self._sent: set[int] = set()
        self._resync = False  # ask the store which steps it holds before sending (resumed runs, reconnects)
        self._skipped: dict[str, Any] = {"metrics": {}, "tags": {}}  # sync calls made while offline
        self._cv = threading.Condition()
        self._busy = False
        self._closing = False
        self._retry_at = time.monotonic() + RETRY_S if self.error else 0.0
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> Any:
        return self.store.client

    @property
    def online(self) -> bool:
        return self.error is None

    # ------------------------------------------------------------------ connection
    def connect(self) -> bool:
        """Create the run (and log its params and config) if that has not happened yet; False when offline."""
        if self.error is not None and self.store.experiment_id is None:
            return False
        try:
            self._connect()
        except Exception as exc:
            self._offline(exc)
            return False
        return True

    def _connect(self) -> None:
        if self.store.experiment_id is None:  # the store was down when the cell started
            name = self.store.experiment
            self.store.experiment_id = experiment_id_for(self.client, name)
        spec = self.spec
        if spec is None:
            return
        if self.run_id is None:
            self.run_id = self.client.create_run(self.store.experiment_id, run_name=spec.name,
                                                 tags=_resolve_tags(spec.tags)).info.run_id
            self._spec_done.add("tags")  # set by create_run
            self._log_params(spec.params)
            self._spec_done.add("params")
        if "tags" not in self._spec_done:  # a run opened again (an upload): tags are idempotent
            for key, value in spec.tags.items():
                self.client.set_tag(self.run_id, key, value)
            self._spec_done.add("tags")
        if "params" not in self._spec_done:  # params are immutable: log only the missing ones
            have = self.client.get_run(self.run_id).data.params
            self._log_params({k: v for k, v in spec.params.items() if k not in have})
            self._spec_done.add("params")
        if "config" not in self._spec_done:
            self.client.log_text(self.run_id, spec.config_yaml, K.CONFIG_ARTIFACT)
            self._spec_done.add("config")

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def _offline(self, exc: BaseException) -> None:
        with self._cv:
            first = self.error is None
            self.error = describe(exc)
            self.store.error = self.error
            self._retry_at = time.monotonic() + RETRY_S
        if first:
            log.warning("tracking.uri=%s stopped answering (%s): training goes on, run %s awaits upload",
                        mask_url(self.store.uri), self.error, self.run_id)
        self._mark_pending()

    def _mark_pending(self, status: str | None = None, reason: str | None = None) -> None:
        if self.out_dir is None:
            return
        record = {"run_id": self.run_id, "tracking_uri": mask_url(self.store.uri), "error": self.error,
                  "status": status, "failure_reason": reason, "time": time.time(), **self._skipped}
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / K.PENDING_UPLOAD_FILE).write_text(json.dumps(record, indent=2, default=str))
        except OSError as exc:
            log.warning("could not write %s: %s", self.out_dir / K.PENDING_UPLOAD_FILE, exc)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A synchronous store call, unless offline; a failure takes the logger offline instead of raising."""
        if self.error is not None or (self.run_id is None and not self.connect()):
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._offline(exc)
            return None

    # ------------------------------------------------------------------ the queue
    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One training step's history entry as ``train/<key>`` at MLflow step ``step`` (the backends' callback).
        Queued: never blocks training."""
        item = finite({K.train_key(k): v for k, v in metrics.items() if k != K.STEP})
        with self._cv:
            self._steps[int(step)] = item
            self._cv.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"mlflow-{self.run_id}", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    todo = sorted(s for s in self._steps if s not in self._sent)
                    if self._closing and not todo:
                        return
                    wait = self._retry_at - time.monotonic() if self.error is not None else 0.0
                    if todo and wait <= 0:
                        break
                    if self._closing and self.error is not None:
                        return  # close() decides what happens to the rest
                    self._cv.wait(wait if todo else None)
                self._busy = True
            try:
                self._send(todo)
            except Exception as exc:
                self._offline(exc)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _send(self, todo: list[int]) -> None:
        from mlflow.entities import Metric

        if self.error is not None or self.run_id is None:
            self._connect()
            with self._cv:
                if self.error is not None:
                    log.warning("tracking.uri=%s answers again: uploading run %s", mask_url(self.store.uri),
                                self.run_id)
                self.error = self.store.error = None
            self._resync = True  # a batch whose answer was lost may have been stored
        if self._resync:
            held = self.logged_steps()
            with self._cv:
                self._sent |= held
                self._resync = False
        now = int(time.time() * 1000)
        batch: list[Any] = []
        steps: list[int] = []
        for s in [s for s in todo if s not in self._sent]:
            items = [Metric(k, v, now, s) for k, v in self._steps[s].items()]
            if batch and len(batch) + len(items) > MAX_METRICS_PER_BATCH:  # a step never straddles two requests
                self._send_batch(batch, steps)
                batch, steps = [], []
            batch += items
            steps.append(s)
        if batch:
            self._send_batch(batch, steps)

    def _send_batch(self, metrics: list[Any], steps: list[int]) -> None:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        with self._cv:
            self._sent.update(steps)

    def flush(self, timeout: float = FLUSH_S) -> bool:
        """Wait until every queued step is stored (True), the logger is offline, or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.error is None and (self._busy or any(s not in self._sent for s in self._steps)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return self.error is None

    # ------------------------------------------------------------------ synchronous verbs
    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Metrics at one step, sent now (offline: kept in the pending-upload marker)."""
        from mlflow.entities import Metric

        values = finite(metrics)
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.call(self.client.log_batch, self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
        if self.error is not None:  # offline, or failed on the way: kept all (an upload skips what the run holds)
            self._keep("metrics", {f"{k}@{step}": v for k, v in values.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.call(self.client.set_tag, self.run_id, key, str(value))
        if self.error is not None:
            self._keep("tags", {k: str(v) for k, v in tags.items()})

    def _keep(self, kind: str, values: Mapping[str, Any]) -> None:
        """What a synchronous call could not send, kept in the marker for the upload."""
        self._skipped[kind].update(values)
        self._mark_pending()

    def _held_metrics(self) -> set[str]:
        run = self.call(self.client.get_run, self.run_id)
        return set(run.data.metrics) if run is not None else set()

    def log_eval(self, summary: Mapping[str, Any], prefix: str = K.EVAL, *, held: set[str] | None = None) -> None:
        """An evaluation summary as ``eval/<benchmark>/<metric>`` (and ``eval/mean_accuracy``), the evaluator's
        files (per-sample JSONL, summary.json) as artifacts under ``<prefix>/``; metrics in ``held`` (already in the
        run) are not logged twice."""
        flat: dict[str, Any] = {}
        for bench, metrics in (summary.get("benchmarks") or {}).items():
            for key, value in metrics.items():
                flat[K.eval_key(bench, key, prefix)] = value
        for key in (K.MEAN_ACCURACY, K.MEAN_SELECTION_ACCURACY):
            if key in summary:
                flat[f"{prefix}/{key}"] = summary[key]
        self.log_metrics({k: v for k, v in flat.items() if k not in (held or set())})
        out_dir = summary.get("out_dir")
        if out_dir and Path(out_dir).is_dir():
            self.call(self.client.log_artifacts, self.run_id, str(out_dir), artifact_path=prefix)

    def logged_steps(self, key: str = K.train_key(K.REWARD)) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def backfill_steps(self, history: Sequence[Mapping[str, Any]]) -> int:
        """Queue the steps of ``history`` this logger has not seen and send what the run lacks; returns how many
        steps were queued.

        A cell resumed from a checkpoint only streams the steps after it through :meth:`log_step`; the earlier ones
        (restored with the checkpoint, identical to what was logged before the kill) come from here, so the
        FINISHED run carries the whole training curve. An upload after an outage sends every step the store lacks."""
        missing = [h for h in history if K.STEP in h and int(h[K.STEP]) not in self._steps]
        if not missing:
            return 0
        with self._cv:
            self._resync = True
        for h in missing:
            self.log_step(int(h[K.STEP]), h)
        self.flush()
        return len(missing)

    def log_cell(self, summary: Mapping[str, Any], out_dir: Path) -> None:
        """A finished cell's evaluation metrics and files, and any training step not streamed (a resumed cell, an
        upload); what the run already holds is not logged twice."""
        history_file = out_dir / K.HISTORY_FILE
        if history_file.exists():
            self.backfill_steps(json.loads(history_file.read_text()))
        self.flush()
        if self.error is not None:
            return  # the marker says it: everything here is in the cell's files
        held = self._held_metrics()
        for prefix in (K.EVAL, K.EVAL_INITIAL):
            if prefix in summary:
                self.log_eval(summary[prefix], prefix, held=held)
        for name in (K.HISTORY_FILE, K.SUMMARY_FILE):
            if (out_dir / name).exists():
                self.call(self.client.log_artifact, self.run_id, str(out_dir / name))
        self.log_metrics({k: summary[k] for k in (K.TRAIN_TIME_S, K.EVAL_TIME_S) if k in summary and k not in held})

    def replay(self, pending: Mapping[str, Any] | None) -> None:
        """The metrics and tags an earlier offline logger of this cell could not send (its marker)."""
        if not pending:
            return
        held = self._held_metrics()
        by_step: dict[int, dict[str, float]] = {}
        for key, value in (pending.get("metrics") or {}).items():
            name, _, step = key.rpartition("@")
            if name not in held:
                by_step.setdefault(int(step or 0), {})[name] = value
        for step, metrics in by_step.items():
            self.log_metrics(metrics, step=step)
        self.set_tags(pending.get("tags") or {})

    def close(self, status: str, reason: str | None = None) -> bool:
        """End the run with ``status`` once the queue is sent; offline, write the pending-upload marker instead.
        Returns True when the store holds everything."""
        if self.error is None and self.run_id is None:
            self.connect()
        sent = self.flush(FLUSH_S) if self.error is None else False
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if sent and reason is not None:
            self.call(self.client.set_tag, self.run_id, K.TAG_FAILURE_REASON, reason[:5000])
        if sent:
            self.call(self.client.set_terminated, self.run_id, status)
        if self.error is None and sent:
            clear_pending(self.out_dir)
            return True
        if self.error is None:  # the store is slow rather than gone: the thread still holds unsent steps
            self.error = f"steps still unsent after {FLUSH_S:g} s"
        self._mark_pending(status, reason)
        log.warning("run %s of %s awaits upload (%s); its results are in %s", self.run_id, mask_url(self.store.uri),
                    self.error, self.out_dir)
        return False


@contextmanager
def cell_run(store: Store, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, str],
             config_yaml: str, parent_run_id: str | None = None,
             stop_exceptions: tuple[type[BaseException], ...] = (), out_dir: str | Path | None = None,
             run_id: str | None = None) -> Iterator[RunLogger]:
    """``with cell_run(store, ...) as run:`` — a (child) run with the cell's tags, params and resolved config;
    ``run_id`` opens an existing run again (an upload) and logs only what it lacks.

    On leaving normally the run is FINISHED. An exception in ``stop_exceptions`` (a pruned tuning trial), Ctrl-C or a
    SIGTERM turned into ``SystemExit`` end it KILLED; any other marks it FAILED with the tag ``failure_reason``. All
    propagate. A store that does not answer never fails the cell: ``run.online`` is then False and ``out_dir`` holds
    the pending-upload marker."""
    all_tags = {**tags, K.TAG_PROCESS: process_tag()}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    spec = RunSpec(run_name, all_tags, dict(params), config_yaml)
    logger = RunLogger(store, run_id, spec=spec, out_dir=out_dir)
    logger.connect()
    status, reason = "FINISHED", None
    try:
        yield logger
    except stop_exceptions:
        status = "KILLED"
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        status = "KILLED"
        reason = "stopped by SIGINT" if isinstance(exc, KeyboardInterrupt) else f"stopped (exit code {exc.code})"
        raise
    except BaseException as exc:
        status, reason = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        logger.close(status, reason)
