"""Hydra apps: ``harness run`` (one cell: train → evaluate → log).

``run_cell(cfg)`` is the plain-Python core that the sweep and the tuner call for every cell.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.backends import StepCallback, get_backend

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def run_cell(cfg: DictConfig, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train one cell with the configured backend, then evaluate its final checkpoint.

    Returns ``{"train": {...final metrics}, "eval": {...}, "final_checkpoint": str, ...}`` and
    writes it to ``<output_dir>/cell_summary.json``.
    """
    train_fn = get_backend(cfg.backend.name)
    evaluate = _evaluator(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    t0 = time.perf_counter()
    result = train_fn(cfg, on_step)
    summary: dict[str, Any] = {
        "final_checkpoint": str(result.final_checkpoint),
        "initial_checkpoint": result.initial_checkpoint,
        "train": result.history[-1] if result.history else {},
        "train_time_s": time.perf_counter() - t0,
    }
    if evaluate is not None:
        t1 = time.perf_counter()
        summary["eval"] = evaluate(str(result.final_checkpoint), out_dir / "eval")
        if cfg.eval.get("baseline") and result.initial_checkpoint:
            summary["eval_initial"] = evaluate(result.initial_checkpoint, out_dir / "eval_initial")
            summary["gain"] = training_gain(out_dir / "eval", out_dir / "eval_initial")
        summary["eval_time_s"] = time.perf_counter() - t1
    (out_dir / "cell_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def training_gain(after_dir: Path, before_dir: Path) -> dict[str, dict[str, float]]:
    """Accuracy after minus before training per benchmark, paired by problem: the difference, its bootstrap
    standard error and 95% CI (resampling problems), from the evaluator's per-sample files."""
    from harness.reporting import paired_bootstrap, per_problem_correct

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


def _evaluator(cfg: DictConfig):
    """A closure ``(model_path, out_dir) -> metrics`` over the evaluator, validated up front, or None
    when ``eval.enabled`` is false."""
    if not cfg.eval.get("enabled", True):
        return None
    from harness.evaluation import evaluate, validate_eval_config
    from harness.models import model_prompt_config

    validate_eval_config(cfg.eval, data_dir=cfg.get("data_dir"))

    def run(model_path: str, out: Path) -> dict[str, Any]:
        return evaluate(model_path, cfg.eval, prompt_cfg=model_prompt_config(cfg.model),
                        data_dir=cfg.get("data_dir"), out_dir=out, seed=cfg.seed)

    return run


def validate_cell(cfg: DictConfig) -> None:
    """Every check of a cell's config that needs no model and no data download (raises ValueError)."""
    from harness.backends.native import validate_train_config
    from harness.data import load_task
    from harness.models import check_model_config

    get_backend(cfg.backend.name)
    validate_train_config(cfg)
    check_model_config(cfg.model)
    if cfg.get("data_dir") is not None or cfg.task.name == "arith":
        load_task(cfg.task, "train", data_dir=cfg.get("data_dir"), limit=1, seed=cfg.seed)
    if cfg.eval.get("enabled", True):
        from harness.evaluation import validate_eval_config

        validate_eval_config(cfg.eval, data_dir=cfg.get("data_dir"))


def hydra_entry(config_dir: Path, config_name: str, task, argv: list[str], prog: str) -> int:
    """Run ``task`` as a Hydra app on ``argv`` (so --cfg, --help, -m and overrides all work).
    Primary configs outside conf/ (sweeps/) see conf/ through Hydra's search path."""
    import hydra

    if Path(config_dir) != CONF_DIR:
        argv = [*argv, f"hydra.searchpath=[file://{CONF_DIR}]"]
    wrapped = hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        wrapped()
    finally:
        sys.argv = saved
    return 0


def _run_task(cfg: DictConfig) -> None:
    """One cell, logged to MLflow unless ``tracking.enabled=false`` (a single run is never skipped)."""
    validate_cell(cfg)
    if not cfg.tracking.get("enabled", True):
        summary = run_cell(cfg)
    else:
        from harness import tracking
        from harness.sweep import cell_name

        experiment_id = tracking.prepare(cfg.tracking)
        with tracking.cell_run(cfg, experiment_id=experiment_id, run_name=cell_name(cfg)) as run:
            summary = run_cell(cfg, on_step=tracking.log_step)
            tracking.log_cell(summary, Path(cfg.output_dir))
        summary["mlflow_run_id"] = run.info.run_id
    print(json.dumps({k: v for k, v in summary.items() if k != "train"}, indent=2, default=str))


def run_main(argv: list[str]) -> int:
    """``harness run [overrides]``."""
    return hydra_entry(CONF_DIR, "run", _run_task, argv, "harness run")
