"""MLflow tracking: the store, one parent run per sweep, one child run per cell.

A local SQLite store needs no server (``tracking.uri`` default ``sqlite:///mlflow.db`` in the working
directory); point ``tracking.uri`` at ``http://host:5000`` or a Postgres URL for many nodes (never
SQLite on NFS). The store and the experiment are created by the driver before any parallel job
starts: two processes migrating a fresh SQLite store at once crash (NOTES.md).

Every cell run carries the tag ``config_hash`` (a hash of the resolved config, minus keys that do not
change the result such as paths); a sweep skips a cell whose hash already has a FINISHED run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that say where things are or how they are shown, not what is computed.
HASH_IGNORED = ("output_dir", "cells_dir", "resume", "cache_dir", "data_dir", "tracking", "backend.progress",
                "backend.threads", "sweep_name", "sweep", "tune")
PARENT_FILE = ".mlflow_parent_run"


def _mlflow():
    import mlflow

    return mlflow


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of the resolved config without :data:`HASH_IGNORED` keys."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data = {k: v for k, v in data.items() if k != "hydra"}
    for key in HASH_IGNORED:
        node, *rest = key.split(".")
        if not rest:
            data.pop(node, None)
        elif isinstance(data.get(node), dict):
            data[node] = {k: v for k, v in data[node].items() if k != rest[0]}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def tracking_uri(tracking_cfg: Any) -> str:
    uri = tracking_cfg.get("uri") if tracking_cfg is not None else None
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def prepare(tracking_cfg: Any) -> str:
    """Create the store (runs the SQLite migrations) and the experiment; return the experiment id.
    Call once in the driver before launching parallel jobs."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri(tracking_cfg))
    name = tracking_cfg.experiment
    exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else mlflow.create_experiment(name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finished_run(experiment_id: str, chash: str) -> str | None:
    """Id of a FINISHED run with this config hash, if any."""
    mlflow = _mlflow()
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.config_hash = '{chash}' and attributes.status = 'FINISHED'",
        max_results=1, output_format="list",
    )
    return runs[0].info.run_id if runs else None


def cell_tags(cfg: DictConfig, chash: str) -> dict[str, str]:
    smooth = cfg.gate.name != "clip"
    return {
        "gate": str(cfg.gate.name),
        "tau_pos": str(cfg.gate.tau_pos) if smooth else "",
        "tau_neg": str(cfg.gate.tau_neg) if smooth else "",
        "eps_low": "" if smooth else str(cfg.gate.eps_low),
        "eps_high": "" if smooth else str(cfg.gate.eps_high),
        "width": str(cfg.gate.width),
        "seed": str(cfg.seed),
        "backend": str(cfg.backend.name),
        "model": str(cfg.model.get("path") or cfg.model.name),
        "task": str(cfg.task.name),
        "git_commit": git_commit(),
        "config_hash": chash,
    }


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@contextmanager
def cell_run(cfg: DictConfig, *, experiment_id: str, parent_run_id: str | None = None,
             run_name: str | None = None, extra_tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """``with cell_run(cfg, ...) as run:`` — a child run with params, tags and the resolved config.
    An exception inside marks the run FAILED with the tag ``failure_reason`` and propagates."""
    mlflow = _mlflow()
    chash = config_hash(cfg)
    tags = {**cell_tags(cfg, chash), **(extra_tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                          tags=tags) as run:
        container = OmegaConf.to_container(cfg, resolve=True)
        params = flatten({k: v for k, v in container.items() if k != "hydra"})
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i:i + 100]))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        try:
            yield run
        except BaseException as exc:
            mlflow.set_tag("failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
            raise


def log_step(step: int, metrics: Mapping[str, float]) -> None:
    """Per-step training metrics under ``train/`` (the callback backends call)."""
    _mlflow().log_metrics({f"train/{k}": v for k, v in _finite(metrics).items() if k != "step"}, step=step)


def log_eval(summary: Mapping[str, Any], prefix: str = "eval") -> None:
    """Benchmark metrics as ``eval/<benchmark>/<metric>`` and the evaluator's files as artifacts."""
    mlflow = _mlflow()
    flat: dict[str, float] = {}
    for bench, metrics in (summary.get("benchmarks") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{prefix}/{bench}/{key}"] = value
    if "mean_accuracy" in summary:
        flat[f"{prefix}/mean_accuracy"] = summary["mean_accuracy"]
    mlflow.log_metrics(_finite(flat))
    out_dir = summary.get("out_dir")
    if out_dir and Path(out_dir).is_dir():
        mlflow.log_artifacts(str(out_dir), artifact_path=prefix)


def start_parent(experiment_id: str, *, name: str, tags: Mapping[str, str]) -> str:
    """Create the sweep's parent run (not made active: jobs may live in other processes)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().create_run(experiment_id, run_name=name, tags={**tags, "git_commit": git_commit()})
    return run.info.run_id


def end_parent(run_id: str, summary: Mapping[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key in ("cells", "finished", "skipped", "failed", "seconds"):
        if key in summary:
            client.log_metric(run_id, f"sweep/{key}", float(summary[key]))
    client.set_terminated(run_id, "FINISHED" if not summary.get("failed") else "FAILED")


def backfill_steps(history: list[Mapping[str, float]]) -> int:
    """Log the steps of ``history`` that the active run has not seen; returns how many.

    A cell resumed from a checkpoint only streams the steps after it through :func:`log_step`; the
    earlier ones (restored with the checkpoint, identical to what was logged before the kill) are
    logged here, so the FINISHED run carries the whole training curve."""
    from mlflow.tracking import MlflowClient

    mlflow = _mlflow()
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "train/reward")}
    missing = [h for h in history if "step" in h and int(h["step"]) not in logged]
    for h in missing:
        log_step(int(h["step"]), h)
    return len(missing)


def supersede_stale_runs(experiment_id: str, chash: str, run_id: str) -> list[str]:
    """Mark runs of this config hash left RUNNING (a killed sweep) as KILLED, tagged with the run that
    continues them; returns their ids. Called by the run that resumes the cell from its checkpoint (two sweeps
    must never run one cell at once anyway: they would share its output directory)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stale = [r.info.run_id for r in _mlflow().search_runs(
        experiment_ids=[experiment_id], output_format="list",
        filter_string=f"tags.config_hash = '{chash}' and attributes.status = 'RUNNING'") if r.info.run_id != run_id]
    for rid in stale:
        client.set_tag(rid, "superseded_by", run_id)
        client.set_terminated(rid, "KILLED")
    return stale


def log_cell(summary: Mapping[str, Any], out_dir: Path) -> None:
    """A finished cell's evaluation metrics and files, and any training step not streamed (a resumed cell)."""
    mlflow = _mlflow()
    history_file = out_dir / "train_history.json"
    if history_file.exists():
        backfill_steps(json.loads(history_file.read_text()))
    for key, prefix in (("eval", "eval"), ("eval_initial", "eval_initial")):
        if key in summary:
            log_eval(summary[key], prefix)
    for name in ("train_history.json", "cell_summary.json"):
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name))
    mlflow.log_metrics({k: float(summary[k]) for k in ("train_time_s", "eval_time_s") if k in summary})


def read_parent(sweep_dir: str | Path) -> str | None:
    path = Path(sweep_dir) / PARENT_FILE
    return path.read_text().strip() if path.exists() else os.environ.get("HARNESS_PARENT_RUN_ID")
