"""What every training backend shares: the checks of the ``train`` config's values (its keys and types are
:mod:`harness.schema`'s, checked when the config is composed) and the mini-batch arithmetic."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from harness.config import ConfigError
from harness.gates import validate_gate_config
from harness.objective import AGG_MODES, OFF_POLICY_MODES, RATIO_LEVELS, loss_kwargs, policy_loss
from harness.rewards import reward_spec

log = logging.getLogger(__name__)

ADVANTAGE_MODES = ("grpo", "drgrpo")
LR_SCHEDULES = ("constant", "cosine", "linear")
SAMPLERS = ("cached", "generate")  # backend.sampler of the native backend
# backend=trl also takes prompt_seeded: the cached sampler with a random stream per prompt (rollouts independent of
# the batch a prompt shares and of the process count)
TRL_SAMPLERS = (*SAMPLERS, "prompt_seeded")
DEVICES = ("auto", "cpu", "cuda")  # backend.device (native also takes cuda:N)
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # train.save_dtype (null: as trained)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num_processes(cfg: Any) -> int:
    """The processes one cell trains on, ``backend.num_processes`` (1 where the backend has no such key)."""
    return int(cfg.backend.get("num_processes", 1) or 1)


def world_size(cfg: Any) -> int:
    """The processes training the cell: those of the launch this process is in (``WORLD_SIZE``, one started by
    ``accelerate launch`` / ``torchrun``), else the ones the cell asks for (``backend.num_processes``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    return launched if launched > 1 else num_processes(cfg)


def check_cuda(device: str, cuda: bool | None = None) -> None:
    """``ValueError`` naming ``backend.device`` when it asks for CUDA (``cuda``, ``cuda:N``) on a machine without it
    (``cuda``: whether the machine that trains has CUDA; None: this one)."""
    if device.startswith("cuda") and not (torch.cuda.is_available() if cuda is None else cuda):
        raise ValueError(f"backend.device={device!r} but this machine has no CUDA; use 'cpu' or 'auto'")


def validate_backend_keys(bk: Any) -> None:
    """The values of the keys several backends share (their types are :mod:`harness.schema`'s): ``threads`` a
    positive integer or null, ``device`` a known device (``ConfigError``); backend-specific checks live with each
    backend."""
    threads = bk.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"backend.threads must be null or an integer >= 1, got {threads!r}")
    device = bk.get("device")
    if bk.name in ("native", "trl") and device is not None:
        ok = device in DEVICES or (bk.name == "native" and str(device).startswith("cuda:")
                                   and str(device)[5:].isdigit())
        if not ok:
            raise ConfigError(f"backend.device must be one of {', '.join(DEVICES)}"
                              f"{' or cuda:N' if bk.name == 'native' else ''}, got {device!r}")
    processes = bk.get("num_processes", 1)
    if bk.name in ("native", "trl") and (not isinstance(processes, int) or isinstance(processes, bool)
                                         or processes < 1):
        raise ConfigError(f"backend.num_processes must be an integer >= 1, got {processes!r}")
    if bk.name == "native" and processes != 1:
        raise ConfigError(f"backend.num_processes={processes}: the native backend trains in one process; run a cell "
                          "on several processes with backend=trl backend.num_processes=N (accelerate: DDP, FSDP, "
                          "ZeRO-2/3), or with backend=verl backend.n_gpus_per_node=N")


def validate_train_config(cfg: Any) -> None:
    """Every check of ``train`` / ``gate`` / ``backend`` that can fail before compute starts, with the key and the
    allowed values (``ValueError``; :class:`harness.config.ConfigError` for most)."""
    t = cfg.train
    for key in ("steps", "rollout_batch_size", "num_generations", "micro_batch_size", "num_iterations",
                "max_new_tokens", "save_every"):
        value = t[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"train.{key} must be an integer >= 1, got {value!r}")
    if not isinstance(t.warmup_steps, int) or isinstance(t.warmup_steps, bool) or t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be an integer >= 0, got {t.warmup_steps!r}")
    for key, low in (("max_grad_norm", 0.0), ("adv_eps", 0.0)):
        if not (_number(t[key]) and t[key] > low):
            raise ConfigError(f"train.{key} must be a finite number > {low:g}, got {t[key]!r}")
    if not (_number(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay!r}")
    betas = list(t.betas) if not isinstance(t.betas, str | int | float) else None
    if betas is None or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas!r}")
    loss = t.loss
    if loss.ratio_level not in RATIO_LEVELS:
        raise ConfigError(f"train.loss.ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {loss.ratio_level!r}")
    if loss.agg not in AGG_MODES:
        raise ConfigError(f"train.loss.agg must be one of {', '.join(AGG_MODES)}, got {loss.agg!r}")
    if not (_number(loss.kl_beta) and loss.kl_beta >= 0):
        raise ConfigError(f"train.loss.kl_beta must be a finite number >= 0, got {loss.kl_beta!r}")
    if not (_number(loss.log_ratio_clip) and loss.log_ratio_clip > 0):
        raise ConfigError(f"train.loss.log_ratio_clip must be a finite number > 0, got {loss.log_ratio_clip!r}")
    if loss.get("norm_length") is not None and not (_number(loss.norm_length) and loss.norm_length > 0):
        raise ConfigError(f"train.loss.norm_length must be null or a number > 0, got {loss.norm_length!r}")
    validate_backend_keys(cfg.backend)
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
    allowed = TRL_SAMPLERS if cfg.backend.name == "trl" else SAMPLERS
    if cfg.backend.name in ("native", "trl") and sampler not in allowed:
        raise ValueError(f"backend.sampler must be one of {', '.join(allowed)} for backend={cfg.backend.name}, "
                         f"got {sampler!r}")
    share = t.rollout_batch_size // world_size(cfg)
    if sampler == "prompt_seeded" and share % t.num_generations:
        # a group split over two processes would be sampled by TRL's generate, with no seed of its prompt's own
        raise ValueError(f"backend.sampler=prompt_seeded needs each process's share of train.rollout_batch_size "
                         f"({t.rollout_batch_size} / {world_size(cfg)} processes (backend.num_processes) = {share}) "
                         f"to hold whole groups of train.num_generations={t.num_generations}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    if not t.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {t.lr!r}")
    if not t.get("adam_eps", 1e-8) > 0:
        raise ValueError(f"train.adam_eps must be > 0, got {t.adam_eps!r}")
    keep = t.get("keep_checkpoints")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ConfigError(f"train.keep_checkpoints must be null (keep all) or an integer >= 1, got {keep!r}")
    save_dtype = t.get("save_dtype")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"train.save_dtype must be null (as trained) or one of {', '.join(SAVE_DTYPES)}, "
                          f"got {save_dtype!r}")
    if save_dtype is not None and cfg.backend.name != "native":
        raise ConfigError(f"train.save_dtype={save_dtype} is applied by backend=native only (backend="
                          f"{cfg.backend.name} saves in the dtype it trains in); leave it null")
    validate_off_policy_config(cfg)
    max_prompt = t.get("max_prompt_tokens")
    if max_prompt is not None and (not isinstance(max_prompt, int) or max_prompt < 1):
        raise ValueError(f"train.max_prompt_tokens must be null or an integer >= 1, got {max_prompt!r}")
    # Fails on an unknown gate / bad tau / bad eps / bad agg before any model is loaded.
    validate_gate_config(cfg.gate)
    dummy = torch.zeros(1, 2)
    policy_loss(dummy, dummy, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), **loss_kwargs(cfg), diagnostics=False,
                behaviour_logp=dummy)
    reward_spec(t.rewards)


def validate_off_policy_config(cfg: Any) -> None:
    """``train.staleness``, ``train.rollout_dtype`` and ``train.loss.off_policy``: their values, and that only the
    native backend runs them (``ConfigError`` naming the key and what is allowed)."""
    t = cfg.train
    staleness = t.get("staleness", 0)
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise ConfigError(f"train.staleness must be an integer >= 0 (0: synchronous), got {staleness!r}")
    rollout_dtype = t.get("rollout_dtype")
    if rollout_dtype is not None and rollout_dtype not in SAVE_DTYPES:
        raise ConfigError(f"train.rollout_dtype must be null (the training dtype) or one of {', '.join(SAVE_DTYPES)}, "
                          f"got {rollout_dtype!r}")
    op = t.loss.off_policy
    if op.mode not in OFF_POLICY_MODES:
        raise ConfigError(f"train.loss.off_policy.mode must be one of {', '.join(OFF_POLICY_MODES)}, got {op.mode!r}")
    levels = ("token",) if op.mode == "decoupled" else RATIO_LEVELS
    if op.level not in levels:
        raise ConfigError(f"train.loss.off_policy.level must be one of {', '.join(levels)} with mode={op.mode}, got "
                          f"{op.level!r}")
    if not (_number(op.cap) and op.cap > 0):
        raise ConfigError(f"train.loss.off_policy.cap must be a finite number > 0, got {op.cap!r}")
    if op.cap_low is not None and (op.mode == "decoupled" or not (_number(op.cap_low) and 0 <= op.cap_low <= op.cap)):
        allowed = "null with mode=decoupled" if op.mode == "decoupled" else f"null or a number in [0, cap={op.cap}]"
        raise ConfigError(f"train.loss.off_policy.cap_low must be {allowed}, got {op.cap_low!r}")
    used = [f"{key}={value}" for key, value, default in (("train.staleness", staleness, 0),
                                                         ("train.rollout_dtype", rollout_dtype, None),
                                                         ("train.loss.off_policy.mode", op.mode, "none"))
            if value != default]
    if used and cfg.backend.name != "native":
        raise ConfigError(f"{', '.join(used)}: off-policy regimes run on backend=native only (backend="
                          f"{cfg.backend.name}: TRL's async trainer and verl's fully-async trainer are separate "
                          "programs the harness does not drive); use backend=native or leave them at their defaults")


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
