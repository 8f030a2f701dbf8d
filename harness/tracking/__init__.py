"""MLflow tracking: the store, one parent run per sweep, one child run per cell, all through an explicit
``MlflowClient`` (no global tracking URI, no active-run state shared between cells of one process).

:mod:`~harness.tracking.store` checks and opens the store (``tracking.uri``) and its experiment,
:mod:`~harness.tracking.runs` knows who owns a run, supersedes the runs a killed sweep left RUNNING and opens and
closes a sweep's parent run, :mod:`~harness.tracking.run_logger` logs one run (:class:`RunLogger`, :func:`cell_run`)
and keeps the pending-upload marker. The names below are the public API.

Training is never hostage to tracking: :func:`check_store` fails in seconds, naming ``tracking.uri``, before any
compute; :class:`RunLogger` sends training steps from a background thread, goes offline when the store stops
answering (the cell trains on and keeps its own files; :data:`harness.keys.PENDING_UPLOAD_FILE` marks its run as
awaiting upload) and catches up if it answers again; :func:`harness.cell.upload_cell` later uploads what the store
lacks from the cell's files. HTTP stores get short retries (:data:`~harness.tracking.store.HTTP_DEFAULTS`, MLflow's own
settings).

What gets logged under which name is :mod:`harness.keys`; what a cell is (its tags, params and config hash) is
:mod:`harness.cell`.
"""

from harness.tracking.run_logger import (
    RunLogger,
    RunSpec,
    cell_run,
    clear_pending,
    finite,
    flatten,
    read_pending,
)
from harness.tracking.runs import (
    end_parent,
    finished_run,
    kill_children,
    mark_failed,
    process_alive,
    process_tag,
    read_parent,
    run_status,
    start_parent,
    supersede_stale_parents,
    supersede_stale_runs,
    with_context_tags,
    write_parent,
)
from harness.tracking.store import (
    Store,
    TrackingUnavailable,
    check_store,
    describe,
    experiment_id_for,
    mask_url,
    migration_lock,
    open_store,
    open_store_or_offline,
    reachable,
    sqlite_path,
    tracking_uri,
    ui_hint,
    use_short_http_retries,
    validate_tracking_config,
)

__all__ = [
    "RunLogger",
    "RunSpec",
    "Store",
    "TrackingUnavailable",
    "cell_run",
    "check_store",
    "clear_pending",
    "describe",
    "end_parent",
    "experiment_id_for",
    "finished_run",
    "finite",
    "flatten",
    "kill_children",
    "mark_failed",
    "mask_url",
    "migration_lock",
    "open_store",
    "open_store_or_offline",
    "process_alive",
    "process_tag",
    "reachable",
    "read_parent",
    "read_pending",
    "run_status",
    "sqlite_path",
    "start_parent",
    "supersede_stale_parents",
    "supersede_stale_runs",
    "tracking_uri",
    "ui_hint",
    "use_short_http_retries",
    "validate_tracking_config",
    "with_context_tags",
    "write_parent",
]
