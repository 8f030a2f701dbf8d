"""Extra reward functions for the tests, loaded by import path (``tests.custom_rewards:NAME``)."""

from __future__ import annotations

import hashlib

CALLS = {"signal_once": 0}


def signal_once(texts: list[str], golds: list[str], problems: list[dict]) -> list[float]:
    """A reward that varies between completions on its first call only, then is 0 everywhere: the step after the
    first has no learning signal (reset ``CALLS["signal_once"]`` between runs)."""
    CALLS["signal_once"] += 1
    if CALLS["signal_once"] > 1:
        return [0.0] * len(texts)
    return [hashlib.sha256(f"{i}:{t}".encode()).digest()[0] / 255 for i, t in enumerate(texts)]
