"""Training backends: one small interface, chosen by the Hydra group ``backend=``.

A backend is a function ``train(cfg, on_step=None) -> TrainResult``. ``cfg`` is the composed run
config (``gate``, ``train``, ``model``, ``task``, ``backend``, ...); ``on_step(step, metrics)`` is
called after every optimizer step with plain-float metrics (the sweep logs them to MLflow, the tuner
reports them to Optuna and may raise ``optuna.TrialPruned`` from it to stop the run).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What every backend returns."""

    final_checkpoint: Path  # Hugging Face format: save_pretrained of model and tokenizer
    checkpoints: list[Path] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per step, with "step"
    initial_checkpoint: str | None = None  # the weights training started from (path or hub id)


class Backend(Protocol):
    def __call__(self, cfg: Any, on_step: StepCallback | None = None) -> TrainResult: ...


BACKENDS: dict[str, str] = {
    "native": "harness.backends.native:train",
    "trl": "harness.backends.trl:train",
    "verl": "harness.backends.verl:train",
}


# Checks a backend adds to the shared ones (harness.backends.common), run by harness.cell.validate_cell before any
# model or data is loaded: fn(cfg, machine=...), machine=False leaving out what only the machine that trains can tell.
VALIDATORS: dict[str, str] = {"trl": "harness.backends.trl_config:validate_trl_config"}


def validate_backend(cfg: Any, *, machine: bool = True) -> None:
    """The backend-specific checks of ``cfg`` (``ValueError`` naming the key), after the backend is importable;
    with ``machine``, also what this machine must have to train it (GPUs, DeepSpeed)."""
    name = cfg.backend.name
    get_backend(name)
    if name in VALIDATORS:
        module, _, attr = VALIDATORS[name].partition(":")
        getattr(importlib.import_module(module), attr)(cfg, machine=machine)


def get_backend(name: str) -> Backend:
    """The ``train`` function of a backend; ValueError listing the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} (key: backend.name)")
    module, _, attr = BACKENDS[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"backend {name!r} is not available here: {exc} (install the extra: pip install "
                         f"-e '.[{name}]')") from exc
    return getattr(mod, attr)
