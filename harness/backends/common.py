"""What every training backend shares: the checks of the ``train`` config, the mini-batch arithmetic and the
extra reward functions named by import path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from harness.config import import_object
from harness.gates import get_gate
from harness.objective import loss_kwargs, policy_loss
from harness.scoring import FORMAT_REWARDS

ADVANTAGE_MODES = ("grpo", "drgrpo")
LR_SCHEDULES = ("constant", "cosine", "linear")
SAMPLERS = ("cached", "generate")  # backend.sampler of the native backend

RewardFn = Callable[..., Sequence[float]]  # fn(texts, golds, problems) -> one float per text


def validate_train_config(cfg: Any) -> None:
    """Every check of ``train`` / ``gate`` that can fail before compute starts, with the key and the allowed
    values (``ValueError``)."""
    t = cfg.train
    for key in ("steps", "rollout_batch_size", "num_generations", "micro_batch_size", "num_iterations",
                "max_new_tokens", "save_every"):
        value = t[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{key} must be an integer >= 1, got {value!r}")
    if t.rollout_batch_size % t.num_generations:
        raise ValueError(
            f"train.rollout_batch_size={t.rollout_batch_size} must be divisible by train.num_generations="
            f"{t.num_generations} (each prompt gets num_generations rollouts)"
        )
    if t.num_generations < 2:
        raise ValueError("train.num_generations must be >= 2: group advantages need at least two rollouts")
    mini = t.get("mini_batch_size")
    if mini is not None and (not isinstance(mini, int) or mini < 1 or t.rollout_batch_size % mini_batch_size(t)):
        raise ValueError(f"train.mini_batch_size={mini!r} must be null or an integer >= 1 that divides "
                         f"train.rollout_batch_size={t.rollout_batch_size} (or exceeds it: one step per pass)")
    if mini_batch_size(t) % t.micro_batch_size:
        raise ValueError(f"train.micro_batch_size={t.micro_batch_size} must divide train.rollout_batch_size="
                         f"{t.rollout_batch_size} and train.mini_batch_size={mini_batch_size(t)}")
    if not t.rollout_temperature > 0:
        raise ValueError(f"train.rollout_temperature must be > 0, got {t.rollout_temperature!r}")
    if not 0 < t.top_p <= 1:
        raise ValueError(f"train.top_p must be in (0, 1], got {t.top_p!r}")
    if t.advantage not in ADVANTAGE_MODES:
        raise ValueError(f"train.advantage must be one of {', '.join(ADVANTAGE_MODES)}, got {t.advantage!r}")
    sampler = cfg.backend.get("sampler", "cached")
    if cfg.backend.name == "native" and sampler not in SAMPLERS:
        raise ValueError(f"backend.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    if not t.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {t.lr!r}")
    if not t.get("adam_eps", 1e-8) > 0:
        raise ValueError(f"train.adam_eps must be > 0, got {t.adam_eps!r}")
    max_prompt = t.get("max_prompt_tokens")
    if max_prompt is not None and (not isinstance(max_prompt, int) or max_prompt < 1):
        raise ValueError(f"train.max_prompt_tokens must be null or an integer >= 1, got {max_prompt!r}")
    fmt = t.rewards.get("format", "graded")
    if fmt not in FORMAT_REWARDS:
        raise ValueError(f"train.rewards.format must be one of {', '.join(FORMAT_REWARDS)}, got {fmt!r}")
    # Fails on an unknown gate / bad tau / bad eps / bad agg before any model is loaded.
    g = cfg.gate
    get_gate(g.name, eps_low=g.eps_low, eps_high=g.eps_high)
    dummy = torch.zeros(1, 2)
    policy_loss(dummy, dummy, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), **loss_kwargs(cfg), diagnostics=False)
    for extra in t.rewards.extra or []:
        load_reward(extra.path)


def mini_batch_size(t: Any) -> int:
    """Completions per optimizer step: ``train.mini_batch_size``, capped at the rollout batch (null: the whole
    rollout batch, one optimizer step per pass)."""
    return min(int(t.get("mini_batch_size") or t.rollout_batch_size), int(t.rollout_batch_size))


def start_training(cfg: Any) -> tuple[list[dict[str, str]], str, Any]:
    """What every backend does first: check the config, apply ``backend.threads``, and return what it trains on:
    the task's train split (from ``data_dir`` or the hub; loaded before any model, so a data error costs seconds,
    and ``ValueError`` when it is empty), the starting model's path (the embedded model is built here if needed) and
    the model's prompt settings."""
    from harness.data import load_task, resolve_data_dir
    from harness.models import model_prompt_config, resolve_model_path

    validate_train_config(cfg)
    if cfg.backend.get("threads"):
        torch.set_num_threads(int(cfg.backend.threads))

    problems = load_task(cfg.task, "train", data_dir=resolve_data_dir(cfg.get("data_dir")), seed=cfg.seed)
    if not problems:
        raise ValueError(f"task {cfg.task.name!r} has no training problems")
    return problems, resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir")), model_prompt_config(cfg.model)


def fit_prompts(problems: list[dict[str, str]], tokenizer: Any, prompt_cfg: Any,
                max_tokens: int | None) -> list[dict[str, str]]:
    """The problems whose rendered prompt has at most ``max_tokens`` tokens (all of them when None); ``ValueError``
    when none is left (``train.max_prompt_tokens`` named)."""
    if max_tokens is None:
        return problems
    from harness.prompts import render_prompt

    texts = [render_prompt(tokenizer, p["problem"], prompt_cfg) for p in problems]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [p for p, n in zip(problems, lengths, strict=True) if n <= max_tokens]
    if not kept:
        raise ValueError(f"train.max_prompt_tokens={max_tokens}: every training prompt is longer "
                         f"(shortest {min(lengths)} tokens)")
    return kept


def load_reward(path: str) -> RewardFn:
    """An extra reward function ``fn(texts, golds, problems) -> floats`` named by ``"package.module:fn"``."""
    fn = import_object(path, what="train.rewards.extra")
    if not callable(fn):
        raise ValueError(f"train.rewards.extra: {path!r} is not callable")
    return fn
