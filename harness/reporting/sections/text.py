"""How several sections write numbers in words: a count with its noun, a mean over seeds with its interval."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def plural(count: int, noun: str) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def seed_interval_text(v: Mapping[str, Any], fmt: str = ".3g") -> str:
    """A mean over seeds with its interval (:func:`harness.stability.over_seeds`) as ``mean [low, high]``; the mean
    alone for one seed, ``—`` without a finite mean."""
    if not math.isfinite(v["mean"]):
        return "—"
    text = f"{v['mean']:{fmt}}"
    if v["n_seeds"] > 1 and math.isfinite(v["ci_low"]):
        text += f" [{v['ci_low']:{fmt}}, {v['ci_high']:{fmt}}]"
    return text
