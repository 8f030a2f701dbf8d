"""The training reward: one copy, called by the native, TRL and verl backends.

For a completion y of a problem with gold answer g,

    R(y) = w_fmt · format(y) + w_acc · [answer(y) = g] + Σ_k w_k · extra_k(y)

``format`` is :func:`harness.scoring.format_score` (``train.rewards.format``: the paper's graded eq. 10 — 1 for the
whole ``<think> … </think> <answer> … </answer>`` template, 0.5 / 0.25 for parts of it — or 0/1 for the exact
template). ``answer(y)`` is the last ``<answer>`` span (:func:`harness.scoring.score`), as the paper judges it;
``train.rewards.accuracy_fallbacks`` may add the scorer's fallbacks (``boxed``, ``last_number``) for a model that
cannot produce the span yet (a small pretrained model on a CPU: docs/real-models.md). The extra functions are
``fn(texts, golds, problems) -> one float per text``, named by import path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.config import ConfigError, import_object
from harness.scoring import FALLBACKS, FORMAT_REWARDS, format_score, score_batch

RewardFn = Callable[..., Sequence[float]]  # fn(texts, golds, problems) -> one float per text


@dataclass(frozen=True)
class RewardSpec:
    """What ``train.rewards`` asks for, checked: see the module docstring for the formula."""

    format_mode: str = "graded"
    format_weight: float = 1.0
    accuracy_weight: float = 1.0
    accuracy_fallbacks: tuple[str, ...] = ()
    extra: tuple[tuple[RewardFn, float], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Rewards:
    """Per-completion rewards: the total and its two built-in parts (0/1 accuracy, format score)."""

    total: list[float]
    format: list[float]
    accuracy: list[float]


def load_reward(path: str) -> RewardFn:
    """An extra reward function ``fn(texts, golds, problems) -> floats`` named by ``"package.module:fn"``."""
    fn = import_object(path, what="train.rewards.extra")
    if not callable(fn):
        raise ValueError(f"train.rewards.extra: {path!r} is not callable")
    return fn


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reward_spec(rewards: Mapping[str, Any] | Any) -> RewardSpec:
    """The checked :class:`RewardSpec` of a ``train.rewards`` node (``ConfigError`` naming the key and what is
    allowed; the extra functions are imported here, so a bad path fails before any model loads)."""
    get = rewards.get
    mode = get("format", "graded")
    if mode not in FORMAT_REWARDS:
        raise ConfigError(f"train.rewards.format must be one of {', '.join(FORMAT_REWARDS)}, got {mode!r}")
    for key in ("format_weight", "accuracy_weight"):
        if not _finite(get(key, 1.0)):
            raise ConfigError(f"train.rewards.{key} must be a finite number, got {get(key)!r}")
    fallbacks = get("accuracy_fallbacks", None) or ()
    if isinstance(fallbacks, str) or any(f not in FALLBACKS for f in fallbacks):
        raise ConfigError(f"train.rewards.accuracy_fallbacks must be a list of {', '.join(FALLBACKS)} (or empty: the "
                          f"<answer> span only), got {fallbacks!r}")
    extra = []
    for item in get("extra", None) or []:
        weight = item.get("weight", 1.0)
        if not _finite(weight):
            raise ConfigError(f"train.rewards.extra: weight of {item.get('path')!r} must be a finite number, "
                              f"got {weight!r}")
        extra.append((load_reward(str(item["path"])), float(weight)))
    return RewardSpec(format_mode=str(mode), format_weight=float(get("format_weight", 1.0)),
                      accuracy_weight=float(get("accuracy_weight", 1.0)), accuracy_fallbacks=tuple(fallbacks),
                      extra=tuple(extra))


def format_rewards(texts: Sequence[str], mode: str = "graded") -> list[float]:
    """``format(y)`` of each completion."""
    return [format_score(t, mode) for t in texts]


def accuracy_rewards(texts: Sequence[str], golds: Sequence[str], fallbacks: Sequence[str] = ()) -> list[float]:
    """``[answer(y) = g]`` of each completion (math-verify in the scorer's process pool)."""
    return [float(s.correct) for s in score_batch(list(texts), [str(g) for g in golds], fallbacks=tuple(fallbacks))]


def rollout_rewards(texts: Sequence[str], golds: Sequence[str], problems: Sequence[Mapping[str, Any]],
                    spec: RewardSpec) -> Rewards:
    """R(y) of every completion (``problems[i]`` is the record completion i answers, for the extra functions)."""
    fmt = format_rewards(texts, spec.format_mode)
    acc = accuracy_rewards(texts, golds, spec.accuracy_fallbacks)
    total = [spec.format_weight * f + spec.accuracy_weight * a for f, a in zip(fmt, acc, strict=True)]
    for fn, weight in spec.extra:
        values = [float(v) for v in fn(list(texts), list(golds), list(problems))]
        if len(values) != len(total):
            raise ValueError(f"train.rewards.extra: {fn!r} returned {len(values)} values for {len(total)} texts")
        total = [r + weight * v for r, v in zip(total, values, strict=True)]
    return Rewards(total=total, format=fmt, accuracy=acc)
