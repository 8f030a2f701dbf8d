"""A sweep cell: one composed run config, trained with one backend, evaluated, logged as one MLflow run.

A cell's identity lives here: its name, config hash, output directory, MLflow tags and params. So do the checks
before any compute (:func:`validate_cell`), the work itself (:func:`run_cell`: train → evaluate, the cell's own
files) and the one tracked form of it that ``harness run``, the gate sweeper and the tuner all use
(:func:`run_tracked`), with its later upload (:func:`upload_cell`). The grid that makes cells is
:mod:`harness.sweeping.grid`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import keys as K
from harness.backends import StepCallback, get_backend
from harness.config import config_errors, to_plain
from harness.gates import gate_params, has_temperature

ROLES = ("cell", "baseline")
EVAL_SEED_STRIDE = 1_000_003  # more samples than any benchmark has (1319 problems x k)
BASELINE_GATE = "base"  # the gate tag of a baseline run: the starting checkpoint, no RL
# What a baseline evaluation depends on: the model and how it is evaluated (not the gate, the RL recipe or the seed).
BASELINE_KEYS = ("model", "eval")


def is_baseline(cfg: DictConfig) -> bool:
    return cfg.get("role", "cell") == "baseline"


# ------------------------------------------------------------------------------------------------ identity


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of the resolved config without the keys in :data:`harness.keys.HASH_IGNORED`:
    two cells with one hash compute the same thing. A baseline's hash covers only :data:`BASELINE_KEYS`, so every
    sweep of one model and evaluation shares one baseline run."""
    if cfg.get("role", "cell") == "baseline":
        data = {"role": "baseline", **{k: to_plain(cfg.get(k)) for k in BASELINE_KEYS}}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data = {k: v for k, v in dict(to_plain(cfg, missing_ok=True)).items() if k != "hydra"}
    data["train"] = _without_sync_defaults(data.get("train"))
    data["backend"] = _without_one_process_defaults(data.get("backend"))
    for key in K.HASH_IGNORED:
        node, *rest = key.split(".")
        if not rest:
            data.pop(node, None)
        elif isinstance(data.get(node), dict):
            data[node] = {k: v for k, v in data[node].items() if k != rest[0]}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _without_sync_defaults(train: Any) -> Any:
    """The train node without the off-policy keys when they say "synchronous" (staleness 0, the training dtype, no
    correction): a synchronous cell keeps the hash it had before those keys existed, so its finished run is found."""
    if not isinstance(train, dict):
        return train
    loss = train.get("loss") if isinstance(train.get("loss"), dict) else {}
    off_policy = loss.get("off_policy") if isinstance(loss.get("off_policy"), dict) else {}
    if train.get("staleness", 0) != 0 or train.get("rollout_dtype") is not None or off_policy.get("mode") != "none":
        return train
    return {**{k: v for k, v in train.items() if k not in ("staleness", "rollout_dtype")},
            "loss": {k: v for k, v in loss.items() if k != "off_policy"}}


# backend keys of multi-process cells (harness.launch): how the ranks are started and how long a collective may wait
# change no result; the others only where the cell runs on several processes.
LAUNCH_KEYS = ("num_processes", "accelerate_config", "launcher", "collective_timeout_s")


def _without_one_process_defaults(backend: Any) -> Any:
    """The backend node without the multi-process keys of a one-process cell (a cell keeps the hash it had before
    those keys existed, so its finished run is found), and without the launcher and the timeout in any case."""
    if not isinstance(backend, dict):
        return backend
    one = int(backend.get("num_processes", 1) or 1) == 1
    dropped = LAUNCH_KEYS if one else ("launcher", "collective_timeout_s")
    return {k: v for k, v in backend.items() if k not in dropped}


def staleness_of(cfg: DictConfig | Mapping[str, Any]) -> int:
    """A cell's ``train.staleness`` (0 where the config predates the key)."""
    train = cfg.get("train") or {}
    return int(train.get("staleness", 0) or 0)


def cell_name(cfg: DictConfig) -> str:
    """``erf-t4-4.2-s0`` / ``clip-e0.2-0.2-s0``: gate, its temperatures (or clip range) and the seed
    (``erf-t4-4.2-lag2-s0`` with stale rollouts)."""
    if is_baseline(cfg):
        return f"{BASELINE_GATE}-{cfg.model.name}"
    name, lag, seed = cell_name_sync(cfg), staleness_of(cfg), f"-s{cfg.seed}"
    return f"{name.removesuffix(seed)}-lag{lag}{seed}" if lag else name


def cell_name_sync(cfg: DictConfig) -> str:
    """:func:`cell_name` without the policy lag."""
    g = cfg.gate
    gate = str(g.name).split(":")[-1]
    if g.name == "clip":
        return f"clip-e{g.eps_low:g}-{g.eps_high:g}-s{cfg.seed}"
    if not has_temperature(str(g.name)):
        eps = f"-e{g.eps_low:g}-{g.eps_high:g}" if "eps_low" in g else ""
        own = "".join(f"-{key}{float(value):g}" for key, value in gate_params(g).items())
        return f"{gate}{eps}{own}-s{cfg.seed}"
    nu = f"-nu{g.nu:g}" if g.get("nu") is not None else ""
    sched = str(g.get("tau_schedule", "constant") or "constant")
    if sched == "eur_target":
        return f"{gate}{nu}-eur{g.eur_target:g}-s{cfg.seed}"
    if sched != "constant":
        start, end = g.get("tau_start") or g.tau_pos, g.get("tau_end") or g.tau_pos
        return f"{gate}{nu}-{sched}{start:g}to{end:g}-s{cfg.seed}"
    return f"{gate}{nu}-t{g.tau_pos:g}-{g.tau_neg:g}-s{cfg.seed}"


def cell_dir(cfg: DictConfig, chash: str | None = None) -> Path:
    """A sweep cell's output directory, ``<cells_dir>/<cell name>-<config hash>``: the same config always lands in
    the same place, which is what lets a re-run resume it from its checkpoints."""
    return Path(cfg.cells_dir) / f"{cell_name(cfg)}-{chash or config_hash(cfg)}"


def cell_tags(cfg: DictConfig, chash: str) -> dict[str, str]:
    """The tags of a cell's MLflow run (the names are :mod:`harness.keys`' ``TAG_*``), provenance included."""
    from harness.provenance import provenance_tags

    smooth = has_temperature(str(cfg.gate.name)) and not is_baseline(cfg)
    return {
        K.TAG_GATE: BASELINE_GATE if is_baseline(cfg) else str(cfg.gate.name),
        K.TAG_TAU_POS: str(cfg.gate.tau_pos) if smooth else "",
        K.TAG_TAU_NEG: str(cfg.gate.tau_neg) if smooth else "",
        K.TAG_EPS_LOW: "" if smooth or is_baseline(cfg) else str(cfg.gate.get("eps_low", "")),
        K.TAG_EPS_HIGH: "" if smooth or is_baseline(cfg) else str(cfg.gate.get("eps_high", "")),
        K.TAG_GATE_PARAMS: "" if is_baseline(cfg) else " ".join(f"{k}={float(v):g}"
                                                               for k, v in gate_params(cfg.gate).items()),
        K.TAG_WIDTH: str(cfg.gate.width) if smooth else "",
        K.TAG_NU: "" if cfg.gate.get("nu") is None or is_baseline(cfg) else str(cfg.gate.nu),
        K.TAG_TAU_SCHEDULE: "" if is_baseline(cfg) else str(cfg.gate.get("tau_schedule", "constant") or "constant"),
        K.TAG_EUR_TARGET: "" if cfg.gate.get("eur_target") is None else str(cfg.gate.eur_target),
        K.TAG_SEED: str(cfg.seed),
        K.TAG_STALENESS: "" if is_baseline(cfg) else str(staleness_of(cfg)),
        K.TAG_BACKEND: str(cfg.backend.name),
        K.TAG_MODEL: str(cfg.model.get("path") or cfg.model.name),
        **model_provenance_tag(cfg),
        K.TAG_TASK: str(cfg.task.name),
        K.TAG_CONFIG_HASH: chash,
        **inadmissible_tag(cfg),
        **provenance_tags(),
    }


def model_provenance_tag(cfg: DictConfig) -> dict[str, str]:
    """``{model_provenance: ...}`` for a preset whose weights are not a hub release as published (the de-quantised
    SmolLM2), else {}."""
    from harness.models import PRESETS

    preset = PRESETS.get(str(cfg.model.get("name")))
    if cfg.model.get("path") or preset is None or not preset.provenance:
        return {}
    return {K.TAG_MODEL_PROVENANCE: preset.provenance}


def inadmissible_tag(cfg: DictConfig) -> dict[str, str]:
    """``{inadmissible: <failed properties>}`` for a gate trained with ``gate.allow_inadmissible=true``, else {}."""
    if is_baseline(cfg) or not cfg.gate.get("allow_inadmissible", False):
        return {}
    from harness.gates import inadmissible_properties

    failed = inadmissible_properties(cfg.gate)
    return {K.TAG_INADMISSIBLE: "; ".join(failed)[:5000]} if failed else {}


def cell_params(cfg: DictConfig) -> dict[str, str]:
    """The flattened resolved config (``gate.tau_pos`` -> ``"4.0"``), the MLflow params of a cell run."""
    from harness.tracking import flatten

    container = OmegaConf.to_container(cfg, resolve=True)
    return flatten({k: v for k, v in container.items() if k != "hydra"})


# ------------------------------------------------------------------------------------------------ the work


def validate_cell(cfg: DictConfig, *, machine: bool = True) -> None:
    """Every check of a cell's config (train, gate, backend, model, task, eval, tracking) that needs no model and no
    data download: :class:`harness.config.ConfigError` (a ``ValueError``) naming the key, its value and what is
    allowed. ``machine=False`` leaves out :func:`check_machine`'s checks, for a driver that submits the cell to
    another machine (a SLURM login node has no GPU)."""
    with config_errors():
        _check_cell(cfg)
        if machine:
            _check_machine(cfg)


def check_machine(cfg: DictConfig) -> None:
    """What this machine must have to train the cell, checked by the process that owns it before any compute: CUDA
    where ``backend.device`` asks for it, GPUs and DeepSpeed for a multi-process cell's accelerate config, and GPU
    memory for the cell's plan (:func:`harness.memory_plan.check_fits`)."""
    with config_errors():
        _check_machine(cfg)


def _check_machine(cfg: DictConfig) -> None:
    from harness.backends import validate_backend
    from harness.backends.common import check_cuda

    validate_backend(cfg)
    if cfg.backend.name in ("native", "trl"):  # verl places and shards its model itself
        from harness.memory_plan import check_fits

        check_cuda(str(cfg.backend.get("device", "auto")))
        check_fits(cfg)


def _check_cell(cfg: DictConfig) -> None:
    from harness.backends import validate_backend
    from harness.backends.common import validate_train_config
    from harness.data import load_task
    from harness.models import check_model_config
    from harness.schedule import schedule_from_config
    from harness.tracking import validate_tracking_config

    if cfg.get("role", "cell") not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {cfg.get('role')!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    validate_backend(cfg, machine=False)
    validate_train_config(cfg)
    schedule = schedule_from_config(cfg)
    if schedule.kind != "constant" and cfg.backend.name == "verl":
        raise ValueError(f"gate.tau_schedule={schedule.kind} is not supported on backend=verl: verl's actor config "
                         "fixes tau_pos/tau_neg for the whole run (use backend=native or backend=trl)")
    validate_tracking_config(cfg.tracking)
    check_model_config(cfg.model)
    if cfg.get("data_dir") is not None or cfg.task.name == "arith":
        load_task(cfg.task, "train", data_dir=cfg.get("data_dir"), limit=1, seed=cfg.seed)
    if cfg.eval.get("enabled", True):
        from harness.evaluation import validate_eval_config

        validate_eval_config(cfg.eval, data_dir=cfg.get("data_dir"))


def run_cell(cfg: DictConfig, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train one cell with the configured backend, then evaluate its final checkpoint.

    Returns ``{"train": {...final metrics}, "eval": {...}, "final_checkpoint": str, ...}`` and writes it to
    ``<output_dir>/cell_summary.json`` (with ``config.yaml`` and the backend's ``train_history.json``: the cell's own
    files are the record of what it did, whatever happens to the tracking store).
    """
    train_fn = get_backend(cfg.backend.name)
    evaluate = _evaluator(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / K.CONFIG_ARTIFACT).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    t0 = time.perf_counter()
    result = train_fn(cfg, on_step)
    summary: dict[str, Any] = {
        "final_checkpoint": str(result.final_checkpoint),
        "initial_checkpoint": result.initial_checkpoint,
        K.TRAIN: result.history[-1] if result.history else {},
        K.TRAIN_TIME_S: time.perf_counter() - t0,
    }
    from harness.stability import learning_signal, no_signal_warning

    summary[K.LEARNING_SIGNAL] = learning_signal(result.history)
    warning = no_signal_warning(summary[K.LEARNING_SIGNAL])
    if warning:
        summary["warnings"] = [warning]
        print(f"{cell_name(cfg)}: WARNING: {warning}", file=sys.stderr)
    if evaluate is not None:
        t1 = time.perf_counter()
        summary[K.EVAL] = evaluate(str(result.final_checkpoint), out_dir / K.EVAL)
        if cfg.eval.get("baseline") and result.initial_checkpoint:
            summary[K.EVAL_INITIAL] = evaluate(result.initial_checkpoint, out_dir / K.EVAL_INITIAL)
            summary["gain"] = training_gain(out_dir / K.EVAL, out_dir / K.EVAL_INITIAL)
        summary[K.EVAL_TIME_S] = time.perf_counter() - t1
    (out_dir / K.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_baseline(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the starting checkpoint (the embedded model is built if needed) with the cell's evaluation settings;
    the summary has the shape of :func:`run_cell`'s, without training."""
    from harness.models import resolve_model_path

    evaluate = _evaluator(cfg)
    if evaluate is None:
        raise ValueError("role=baseline evaluates the starting checkpoint, but eval.enabled=false")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / K.CONFIG_ARTIFACT).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    model_path = resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"final_checkpoint": model_path, "initial_checkpoint": model_path, K.TRAIN: {},
                               K.EVAL: evaluate(model_path, out_dir / K.EVAL)}
    summary[K.EVAL_TIME_S] = time.perf_counter() - t0
    (out_dir / K.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def training_gain(after_dir: Path, before_dir: Path) -> dict[str, dict[str, float]]:
    """Accuracy after minus before training per benchmark, paired by problem: the difference, its bootstrap
    standard error and 95% CI (resampling problems), from the evaluator's per-sample files."""
    from harness.stats import paired_bootstrap, per_problem_correct

    def per_problem(path: Path) -> dict[str, float]:
        return per_problem_correct([json.loads(line) for line in path.read_text().splitlines() if line.strip()])

    out = {}
    for after in sorted((after_dir / "samples").glob("*.jsonl")):
        before = before_dir / "samples" / after.name
        if before.exists():
            g = paired_bootstrap(per_problem(after), per_problem(before))
            out[after.stem] = {k: g[k] for k in ("n", "diff", "se", "ci_low", "ci_high")}
            print(f"{after.stem}: accuracy {g['diff']:+.4f} after training (paired bootstrap SE {g['se']:.4f}, "
                  f"95% CI [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}], n={g['n']} problems)", file=sys.stderr)
    return out


def eval_seed(seed: int) -> int:
    """The sampling seed of a cell's evaluation: ``seed`` × :data:`EVAL_SEED_STRIDE`. Engines give sample j of
    prompt i the seed ``eval seed + i·k + j`` (vLLM) or seed each batch with ``eval seed + batch`` (hf), so
    evaluations of seeds s and s + 1 would share all but a few sample streams; the stride keeps them apart."""
    return int(seed) * EVAL_SEED_STRIDE


def _evaluator(cfg: DictConfig) -> Callable[[str, Path], dict[str, Any]] | None:
    """A closure ``(model_path, out_dir) -> metrics`` over the evaluator, validated up front, or None when
    ``eval.enabled`` is false."""
    if not cfg.eval.get("enabled", True):
        return None
    from harness.evaluation import describe_plan, evaluate, validate_eval_config
    from harness.models import model_prompt_config

    plan = describe_plan(validate_eval_config(cfg.eval, data_dir=cfg.get("data_dir")))
    print(f"{cell_name(cfg)}: will evaluate {plan}", file=sys.stderr)

    def run(model_path: str, out: Path) -> dict[str, Any]:
        return evaluate(model_path, cfg.eval, prompt_cfg=model_prompt_config(cfg.model),
                        data_dir=cfg.get("data_dir"), out_dir=out, seed=eval_seed(cfg.seed))

    return run


def run_tracked(cfg: DictConfig, store: Any, *, run_name: str | None = None, parent_run_id: str | None = None,
                extra_tags: Mapping[str, str] | None = None, on_step: StepCallback | None = None,
                supersede_stale: bool = False, stop_exceptions: tuple[type[BaseException], ...] = (),
                on_start: Callable[[Any], None] | None = None,
                after: Callable[[Any, dict[str, Any]], None] | None = None,
                supersede_dead: bool = False) -> tuple[str | None, dict[str, Any]]:
    """:func:`run_cell` inside one MLflow run of ``store``: params, tags and config first (then ``on_start(run)``),
    every training step as it happens (then ``on_step``, e.g. a pruner), the evaluation and the cell's files at the
    end, then ``after(run, summary)``. Returns ``(run id, summary)``. ``supersede_stale`` marks RUNNING runs a kill
    left of this config hash KILLED (a resumed sweep cell); ``supersede_dead`` only those whose process is gone
    (``harness run``). See :func:`harness.tracking.cell_run` for the run's end state; when the store stopped
    answering, the summary's ``pending_upload`` says why (the run is then uploaded later by :func:`upload_cell`)."""
    from harness import tracking

    chash = config_hash(cfg)
    with tracking.cell_run(store, run_name=run_name or cell_name(cfg), tags={**cell_tags(cfg, chash),
                                                                            **(extra_tags or {})},
                           params=cell_params(cfg), config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                           parent_run_id=parent_run_id, stop_exceptions=stop_exceptions,
                           out_dir=cfg.output_dir) as run:
        if on_start is not None:
            on_start(run)
        if (supersede_stale or supersede_dead) and run.online:
            run.call(tracking.supersede_stale_runs, store, chash, run.run_id, only_dead=not supersede_stale,
                     output_dir=str(cfg.output_dir) if cfg.get("resume") else None)

        def step(step_index: int, metrics: dict[str, float]) -> None:
            run.log_step(step_index, metrics)  # first: a stopped run keeps its curve up to the stop
            if on_step is not None:
                on_step(step_index, metrics)

        summary = run_baseline(cfg) if is_baseline(cfg) else run_cell(cfg, on_step=step)
        run.log_cell(summary, Path(cfg.output_dir))
        run.set_tags(summary_tags(summary))
        if after is not None:
            after(run, summary)
    if not run.online:
        summary["pending_upload"] = run.error
    return run.run_id, summary


def summary_tags(summary: Mapping[str, Any]) -> dict[str, str]:
    """Tags a cell run gets from its summary: the evaluator's vLLM version (it runs in its own environment) and the
    run's warnings (the report lists them)."""
    tags = {}
    workers = ((summary.get(K.EVAL) or {}).get("vllm") or {}).get("workers") or []
    if workers and workers[0].get("vllm_version"):
        tags[K.TAG_VLLM_VERSION] = str(workers[0]["vllm_version"])
    if summary.get("warnings"):
        tags[K.TAG_WARNING] = " | ".join(summary["warnings"])[:5000]
    return tags


def local_result(out_dir: str | Path) -> bool:
    """Whether the cell in ``out_dir`` finished on its own (trained and evaluated: its summary file exists)."""
    return (Path(out_dir) / K.SUMMARY_FILE).is_file()


def upload_cell(cfg: DictConfig, store: Any, *, run_name: str | None = None, parent_run_id: str | None = None,
                extra_tags: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """Upload a cell that finished locally but whose MLflow run is missing or incomplete (the store was away: see
    :mod:`harness.tracking`) from its own files, without retraining: ``train_history.json``, ``cell_summary.json``,
    ``eval/`` and what its pending-upload marker kept. The run the marker names is completed (else a new one is
    made), logging only what it lacks; RUNNING runs of its config hash are then superseded by it. Returns ``(run id,
    whether the store now holds everything)``."""
    from harness import tracking

    out = Path(cfg.output_dir)
    summary = json.loads((out / K.SUMMARY_FILE).read_text())
    pending = tracking.read_pending(out) or {}
    chash = config_hash(cfg)
    run_id = pending.get("run_id")
    if tracking.run_status(store, run_id) in (None, "FINISHED"):
        run_id = None  # gone, or closed by hand: a new run
    saved_config = out / K.CONFIG_ARTIFACT
    config_yaml = saved_config.read_text() if saved_config.exists() else OmegaConf.to_yaml(cfg, resolve=True)
    with tracking.cell_run(store, run_name=run_name or cell_name(cfg), tags={**cell_tags(cfg, chash),
                                                                            **(extra_tags or {})},
                           params=cell_params(cfg), config_yaml=config_yaml, parent_run_id=parent_run_id,
                           out_dir=out, run_id=run_id) as run:
        run.log_cell(summary, out)
        run.set_tags(summary_tags(summary))
        run.replay(pending)
    if run.online:
        run.call(tracking.supersede_stale_runs, store, chash, run.run_id)
    return run.run_id, run.online
