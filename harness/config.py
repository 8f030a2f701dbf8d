"""Config plumbing every module shares: where the repository's config folders are, OmegaConf nodes as plain
Python containers, and objects named by import path (custom gates, extra reward functions)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"  # Hydra config groups (gate, train, backend, model, task, eval, tracking)
SWEEPS_DIR = REPO_ROOT / "sweeps"  # primary configs of `harness sweep NAME` and `harness tune`
EVAL_TASK_DIR = REPO_ROOT / "eval"  # lm-eval task files


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
