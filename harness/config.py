"""Config plumbing every module shares: where the repository's config folders are, OmegaConf nodes as plain
Python containers, and objects named by import path (custom gates, extra reward functions)."""

from __future__ import annotations

import importlib
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"  # Hydra config groups (gate, train, backend, model, task, eval, tracking)
SWEEPS_DIR = REPO_ROOT / "sweeps"  # primary configs of `harness sweep NAME` and `harness tune`
EVAL_TASK_DIR = REPO_ROOT / "eval"  # lm-eval task files


class ConfigError(ValueError):
    """A run config that fails a check before any compute starts (a bad key, value or path): the ``harness`` command
    prints its message as one line and exits 2. A ``ValueError``, so callers that catch those still do."""


class RunIncomplete(RuntimeError):
    """Raised after a run or sweep has printed its summary when not everything is done: the ``harness`` command
    prints the message as one line and exits ``exit_code`` (1: cells failed, 3: results await upload)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def config_errors() -> Iterator[None]:
    """Checks before any compute: a ``ValueError`` (or an OmegaConf error: a missing or mistyped key) inside becomes
    a :class:`ConfigError` with the same message."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        if type(exc).__module__.startswith("omegaconf"):
            raise ConfigError(" ".join(str(exc).split())) from exc
        raise


def to_plain(node: Any, *, missing_ok: bool = False) -> Any:
    """An OmegaConf node as plain dicts/lists (interpolations resolved); anything else unchanged. With
    ``missing_ok`` a mandatory ``???`` value comes through as the string ``"???"`` instead of raising. Imports
    omegaconf only when handed one of its nodes."""
    if type(node).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True, throw_on_missing=not missing_ok)
    return node


def import_object(path: str, *, what: str = "object") -> Any:
    """The attribute named by ``"package.module:attr"`` (``attr`` may be dotted). ``ValueError`` naming ``what``
    (e.g. ``"gate"``, ``"train.rewards.extra"``) and the part that could not be found."""
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def slug(name: str) -> str:
    """``name`` as a file-system-safe string (runs of anything but word characters, ``.`` and ``-`` become ``_``)."""
    return re.sub(r"[^\w.-]+", "_", name)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's stop) raises ``SystemExit(143)`` in the main thread, so what is running
    cleans up as on Ctrl-C: the run being logged ends KILLED instead of staying RUNNING forever, a tuning driver's
    in-flight trials are marked FAIL."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
