"""One run's logging: :class:`RunLogger` (training steps queued and sent by a background thread, evaluations, a
cell's files), :func:`cell_run` (a cell's run from start to end state) and the pending-upload marker a logger that
lost its store leaves in the cell's output directory (:data:`harness.keys.PENDING_UPLOAD_FILE`).

Training is never hostage to tracking: the logger goes offline when the store stops answering (the cell trains on
and keeps its own files) and catches up if it answers again; :func:`harness.cell.upload_cell` later uploads what the
store lacks from the cell's files.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.tracking.runs import PARENT_RUN_TAG, process_tag, with_context_tags
from harness.tracking.store import Store, describe, experiment_id_for, mask_url

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
RETRY_S = 15.0  # an offline logger probes the store this often
FLUSH_S = 30.0  # at the end of a run, how long the steps still queued may take to reach a store that answers


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
                                                 tags=with_context_tags(spec.tags)).info.run_id
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
