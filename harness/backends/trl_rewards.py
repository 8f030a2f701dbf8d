"""The TRL backend's reward functions: :mod:`harness.rewards` (the one training reward of every backend) behind
TRL's reward-function signature (the completions, plus the dataset's columns as keyword arguments; one float per
completion). TRL sums them with ``reward_weights``, which is :mod:`harness.rewards`' R.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from harness.rewards import accuracy_rewards, format_rewards, reward_spec


def _text(completion: Any) -> str:
    """A completion as text: TRL passes strings for plain-text prompts and message lists for chats."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    raise TypeError(f"unexpected completion type {type(completion).__name__}")


def format_reward(completions: Sequence[Any], *, mode: str = "graded", **_: Any) -> list[float]:
    """:func:`harness.rewards.format_rewards` of TRL's completions."""
    return format_rewards([_text(c) for c in completions], mode)


def accuracy_reward(completions: Sequence[Any], answer: Sequence[str], *, fallbacks: Sequence[str] = (),
                    **_: Any) -> list[float]:
    """:func:`harness.rewards.accuracy_rewards` of TRL's completions (the ``<answer>`` span, plus
    ``train.rewards.accuracy_fallbacks``: as on the native backend)."""
    return accuracy_rewards([_text(c) for c in completions], answer, fallbacks)


def reward_functions(cfg: Any) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """TRL reward functions and their weights (TRL sums them weighted, which is :mod:`harness.rewards`' R): format,
    accuracy, then ``train.rewards.extra`` (``fn(texts, golds, problems)``, wrapped to TRL's keyword signature)."""
    spec = reward_spec(cfg.train.rewards)
    fmt = partial(format_reward, mode=spec.format_mode)
    fmt.__name__ = "format_reward"  # type: ignore[attr-defined]  # TRL logs rewards/<__name__>/mean
    acc = partial(accuracy_reward, fallbacks=spec.accuracy_fallbacks)
    acc.__name__ = "accuracy_reward"  # type: ignore[attr-defined]
    funcs: list[Callable[..., list[float]]] = [fmt, acc]
    weights = [spec.format_weight, spec.accuracy_weight]
    for fn, weight in spec.extra:

        def wrapped(completions: Sequence[Any], answer: Sequence[str], problem: Sequence[str], id: Sequence[str],
                    _fn: Callable[..., Sequence[float]] = fn, **_: Any) -> list[float]:
            texts = [_text(c) for c in completions]
            probs = [{"id": i, "problem": p, "answer": a} for i, p, a in zip(id, problem, answer, strict=True)]
            return [float(v) for v in _fn(texts, list(answer), probs)]

        wrapped.__name__ = f"{fn.__module__}.{fn.__qualname__}"
        funcs.append(wrapped)
        weights.append(weight)
    return funcs, weights
