"""The tracking store: ``tracking.uri`` checked, probed and opened, with its experiment.

A local SQLite store needs no server (``tracking.uri`` default ``sqlite:///mlflow.db`` in the working
directory); point ``tracking.uri`` at ``http://host:5000`` or a Postgres URL for many nodes (never SQLite on
NFS). Creating a fresh SQLite store runs MLflow's schema migrations, which crash when two processes run them at
once, so :func:`open_store` holds a file lock next to the database while it opens it.

:func:`check_store` fails in seconds, naming ``tracking.uri``, before any compute; :func:`open_store_or_offline`
gives a sweep cell an offline :class:`Store` instead of failing it. HTTP stores get short retries
(:data:`HTTP_DEFAULTS`, MLflow's own settings).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.config import ConfigError

log = logging.getLogger(__name__)

# MLflow's defaults (7 retries, exponential backoff, 120 s timeout) hold one request to a lost server for minutes;
# these give up in seconds (the logger retries on its own schedule, off the training thread). The environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
CHECK_TIMEOUT_S = 10.0  # check_store's budget for a store that does not answer
OPEN_TIMEOUT_S = 120.0  # ... and for opening one that answered its probe (a fresh server migrates its database)
PROBE_TIMEOUT_S = 3.0  # one reachability probe of an HTTP store
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


def ui_hint(store: Store) -> str:
    """How to browse ``store``'s experiment in MLflow's UI. MLflow 3's UI opens an experiment on its GenAI overview
    (traces, latency: all empty here) unless the page is asked for model training with ``workflowType`` in the URL;
    the experiment's kind tag alone decides only where the UI has no GenAI / Model training switch."""
    local = store.uri if sqlite_path(store.uri) is not None or store.uri.startswith("file:") else None
    server = f"mlflow ui --backend-store-uri {local}, then " if local else ""
    base = "http://127.0.0.1:5000" if local else re.sub(r"//[^/@]*@", "//", store.uri).rstrip("/")  # no credentials
    return (f"MLflow UI: {server}open {base}/#/experiments/{store.experiment_id}?workflowType={K.UI_WORKFLOW_TYPE} "
            "(the runs table)")


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing, marked as a model-training experiment
    (:data:`harness.keys.EXPERIMENT_KIND`), the kind MLflow 3's UI reads where it has no GenAI / Model training
    switch; where it has one (3.17), the link of :func:`ui_hint` opens the runs table."""
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
