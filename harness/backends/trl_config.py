"""Config translation of the TRL backend: the harness config as ``trl.GRPOConfig`` keyword arguments
(:func:`grpo_config_kwargs`, pure) and the TRL-specific checks ``harness run`` makes before anything is loaded
(:func:`validate_trl_config`).

Config mapping (harness → ``GRPOConfig``; one harness step = one rollout batch, as on the native
backend):

==============================  =====================================================================
harness                         TRL
==============================  =====================================================================
backend.collective_timeout_s    ddp_timeout (seconds a collective may wait)
train.steps                     max_steps = steps × num_iterations × mini-batches (TRL counts optimizer
                                steps)
train.rollout_batch_size        generation_batch_size (= micro × accumulation × processes)
train.micro_batch_size          per_device_train_batch_size
(rollout / micro / processes)   steps_per_generation
train.mini_batch_size           gradient_accumulation_steps = mini / micro / processes (null: rollout,
                                one optimizer step per pass)
train.num_generations           num_generations
train.num_iterations            num_iterations (2: the second pass has r ≠ 1, where gates differ)
train.max_new_tokens            max_completion_length
train.rollout_temperature/top_p temperature / top_p (top_k=0: off, as native)
train.lr, betas, adam_eps       learning_rate, adam_beta1/2, adam_epsilon; weight_decay; max_grad_norm
train.warmup_steps, lr_schedule warmup_steps × optimizer steps per batch; constant_with_warmup | cosine |
                                linear
train.max_prompt_tokens         longer training prompts are left out before TRL sees the dataset
train.advantage                 scale_rewards = group (grpo) | none (drgrpo)
train.loss.agg                  loss_type grpo | bnpo | dr_grpo | luspo (same aggregation; for TRL's logs)
train.loss.kl_beta              beta (TRL then computes reference log-probs)
train.rewards.*                 reward_funcs [format (graded | binary), accuracy, extras...] + reward_weights
train.save_every                save_steps = save_every × optimizer steps per batch (HF-format checkpoints)
train.keep_checkpoints          save_total_limit (transformers deletes older checkpoints; each keeps its optimizer)
gate.*                          the harness loss (and epsilon / sapo temperatures, for TRL's logs)
==============================  =====================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harness.backends.common import check_cuda, mini_batch_size, num_processes
from harness.backends.common import world_size as processes_of
from harness.config import CONF_DIR, ConfigError, to_plain

TRL_LOSS_TYPE = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo",
                 "seq-mean-token-sum": "luspo"}
LR_SCHEDULER = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
VLLM_KEYS = ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
             "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
             "vllm_max_model_length", "vllm_enable_sleep_mode", "vllm_importance_sampling_correction")
LAUNCHERS = ("accelerate", "torchrun")  # backend.launcher of a multi-process cell (harness.launch)
ACCELERATE_DIR = CONF_DIR / "accelerate"  # the shipped accelerate configs, by name (backend.accelerate_config)
ACCELERATE_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")
# TRL features that act inside its own _compute_loss; the harness loss does not implement them.
UNSUPPORTED = {"top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "entropy_coef": 0.0,
               "use_adaptive_entropy": False, "delta": None}


def _use_cpu(device: str, *, cuda: bool | None = None) -> bool:
    """Whether TRL trains on the CPU, for ``backend.device`` on a machine with CUDA or not (``cuda``; None: this
    one). ``ValueError`` naming the key for a value TRL cannot take, or ``cuda`` without CUDA."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if device == "auto":
        return not cuda
    if device.startswith("cuda"):
        check_cuda(device, cuda)
        if device != "cuda":
            raise ValueError(f"backend.device={device!r}: TRL places the model itself; use 'cuda' and choose GPUs "
                             "with CUDA_VISIBLE_DEVICES (several GPUs: backend.num_processes)")
        return False
    if device == "cpu":
        return True
    raise ValueError(f"backend.device must be auto, cpu or cuda, got {device!r}")


def grpo_config_kwargs(cfg: Any, output_dir: str | Path, *, world_size: int | None = None,
                       cuda: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of ``trl.GRPOConfig`` for the harness config ``cfg`` (the table in the module
    docstring), for a machine with CUDA or not (``cuda``; None: this one). Pure: no model, data or GPU is touched."""
    t, g, bk = cfg.train, cfg.gate, cfg.backend
    world = processes_of(cfg) if world_size is None else world_size
    per_update = t.micro_batch_size * world
    mini = mini_batch_size(t)
    if mini % per_update:
        raise ValueError(f"train.mini_batch_size={mini} (null: train.rollout_batch_size) must be divisible by "
                         f"train.micro_batch_size x processes (backend.num_processes) = {t.micro_batch_size} x "
                         f"{world}")
    accumulation = mini // per_update
    updates = t.num_iterations * (t.rollout_batch_size // mini)  # optimizer steps per rollout batch
    if t.loss.agg not in TRL_LOSS_TYPE:
        raise ValueError(f"train.loss.agg must be one of {', '.join(TRL_LOSS_TYPE)}, got {t.loss.agg!r}")
    use_cpu = _use_cpu(str(bk.device), cuda=cuda)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        max_steps=int(t.steps * updates),
        per_device_train_batch_size=int(t.micro_batch_size),
        gradient_accumulation_steps=accumulation,
        steps_per_generation=t.rollout_batch_size // per_update,  # one generation batch = one rollout batch
        num_generations=int(t.num_generations),
        num_iterations=int(t.num_iterations),
        max_completion_length=int(t.max_new_tokens),
        temperature=float(t.rollout_temperature),
        top_p=float(t.top_p),
        top_k=0,
        learning_rate=float(t.lr),
        adam_beta1=float(t.betas[0]),
        adam_beta2=float(t.betas[1]),
        adam_epsilon=float(t.get("adam_eps", 1e-8)),
        weight_decay=float(t.weight_decay),
        max_grad_norm=float(t.max_grad_norm),
        lr_scheduler_type=LR_SCHEDULER[t.lr_schedule],
        warmup_steps=int(t.warmup_steps * updates),
        optim="adamw_torch",
        scale_rewards="group" if t.advantage == "grpo" else "none",
        loss_type=TRL_LOSS_TYPE[t.loss.agg],
        importance_sampling_level=str(t.loss.ratio_level),
        beta=float(t.loss.kl_beta),
        use_bias_correction_kl=False,  # the harness k3 term has no importance weight
        # a gate node has ε (clip) or τ (smooth gates), never both: TRL's defaults stand for the other
        # TRL's own loss never runs (the harness objective does); these only make TRL's logs carry the gate's values
        **(dict(sapo_temperature_pos=float(g.tau_pos), sapo_temperature_neg=float(g.tau_neg)) if "tau_pos" in g else
           dict(epsilon=float(g.eps_low), epsilon_high=float(g.eps_high)) if "eps_low" in g else {}),
        reward_weights=None,  # set with the reward functions
        mask_truncated_completions=False,
        disable_dropout=bool(bk.get("disable_dropout", True)),
        # a process that waits longer than this in a collective (a rank hung or gone) fails, and with it the cell
        ddp_timeout=int(bk.get("collective_timeout_s", 1800)),
        gradient_checkpointing=bool(bk.get("gradient_checkpointing", False)),
        use_cpu=use_cpu,
        bf16=bool(bk.get("bf16", True)) and not use_cpu,  # GRPOConfig defaults bf16=True, which CPUs reject
        logging_steps=1,
        logging_first_step=True,
        report_to=[],
        save_strategy="steps",
        save_steps=int(t.save_every * updates),
        save_only_model=False,  # keep optimizer/scheduler/RNG so `resume=true` continues exactly
        save_total_limit=t.get("keep_checkpoints"),
        remove_unused_columns=False,
        shuffle_dataset=True,
        dataloader_num_workers=0,
        disable_tqdm=not bool(bk.get("progress", True)),
        log_completions=False,
    )
    for key in VLLM_KEYS:
        if key in bk and bk[key] is not None:
            kwargs[key] = to_plain(bk[key]) if hasattr(bk[key], "items") else bk[key]
    if kwargs.get("use_vllm") and use_cpu:
        raise ValueError("backend.use_vllm=true needs a GPU (TRL's vLLM integration is CUDA-only); on CPU leave it off")
    extra = bk.get("grpo_config") or {}
    extra = to_plain(extra) if hasattr(extra, "items") else dict(extra)
    kwargs.update(extra)  # explicit pass-through of any other GRPOConfig field
    return kwargs


def join_cpu_process_group(cfg: Any) -> None:
    """On a CPU, a rank of a multi-process launch joins its gloo process group here, with
    ``backend.collective_timeout_s`` as the timeout of every collective: transformers passes ``ddp_timeout`` on
    GPUs only, and gloo's default (30 minutes) would leave the ranks of a cell whose peer hung waiting that long.
    ``GRPOConfig`` then takes this group as it finds it. Nothing to do in one process or on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not _use_cpu(str(cfg.backend.device)):
        return
    if not torch.distributed.is_initialized():
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(cpu=True, timeout=timedelta(seconds=float(cfg.backend.get("collective_timeout_s", 1800))))


def accelerate_config_file(cfg: Any) -> Path:
    """The accelerate config of a multi-process cell: ``conf/accelerate/<backend.accelerate_config>.yaml`` for a
    shipped name, else the value as a file's path (``ConfigError`` naming the key and the names)."""
    value = str(cfg.backend.get("accelerate_config", "ddp"))
    if value in ACCELERATE_CONFIGS:
        return ACCELERATE_DIR / f"{value}.yaml"
    path = Path(value).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.resolve()
    raise ConfigError(f"backend.accelerate_config must be one of {', '.join(ACCELERATE_CONFIGS)} or an accelerate "
                      f"config file's path, got {value!r}")


def accelerate_sharding(cfg: Any) -> str:
    """How a multi-process cell's accelerate config shards the model states, in :mod:`harness.memory_plan`'s words:
    ``ddp``, ``fsdp``, ``zero2`` or ``zero3`` (a file of one's own is read: its ``distributed_type`` and stage)."""
    value = str(cfg.backend.get("accelerate_config", "ddp"))
    if value in ACCELERATE_CONFIGS:
        return value
    import yaml

    data = yaml.safe_load(accelerate_config_file(cfg).read_text()) or {}
    kind = str(data.get("distributed_type", "MULTI_GPU")).upper()
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "zero3" if int((data.get("deepspeed_config") or {}).get("zero_stage", 2)) >= 3 else "zero2"
    return "ddp"


def validate_launch_config(cfg: Any) -> None:
    """The values of the multi-process keys (``backend.num_processes``, ``launcher``, ``accelerate_config``,
    ``collective_timeout_s``), wherever the cell will run (``ConfigError`` naming the key). What the machine must
    have for them is :func:`check_launch_machine`'s."""
    bk = cfg.backend
    launcher = bk.get("launcher", "accelerate")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"backend.launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    timeout = bk.get("collective_timeout_s", 1800)
    if not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout >= 1):
        raise ConfigError(f"backend.collective_timeout_s must be a number of seconds >= 1, got {timeout!r}")
    accelerate_config_file(cfg)
    processes = num_processes(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and processes > 1 and processes != launched:
        raise ConfigError(f"backend.num_processes={processes} inside a launch of {launched} processes: leave it at 1 "
                          "when starting the ranks yourself (accelerate launch / torchrun), or let the harness start "
                          "them (no outer launch)")
    if processes > 1 and launcher == "torchrun" and accelerate_sharding(cfg) != "ddp":
        raise ConfigError(f"backend.launcher=torchrun runs DDP only; backend.accelerate_config={bk.accelerate_config} "
                          "needs backend.launcher=accelerate")


def check_launch_machine(cfg: Any) -> None:
    """What the machine that starts a multi-process cell's ranks must have (``ConfigError`` naming the key): GPUs
    for a sharded config (on a CPU accelerate runs every config as DDP), one GPU per process, DeepSpeed for ZeRO.
    Run there (the process that owns the cell: ``harness run``, the sweep's local job, a SLURM task), not by a driver
    that submits the cell to another machine."""
    bk = cfg.backend
    processes = num_processes(cfg)
    if processes == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    sharding = accelerate_sharding(cfg)
    if _use_cpu(str(bk.device)):
        if sharding != "ddp":
            raise ConfigError(f"backend.accelerate_config={bk.accelerate_config} shards over GPUs; on a CPU accelerate "
                              "runs the processes as DDP (gloo) whatever its config says: use "
                              "backend.accelerate_config=ddp")
    elif processes > torch.cuda.device_count():
        raise ConfigError(f"backend.num_processes={processes} but this machine sees {torch.cuda.device_count()} "
                          "GPU(s) (CUDA_VISIBLE_DEVICES): one process per GPU")
    if sharding.startswith("zero"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"backend.accelerate_config={bk.accelerate_config} needs DeepSpeed: pip install "
                              "deepspeed (or backend.accelerate_config=fsdp, which shards the same states)")


def validate_trl_config(cfg: Any, *, machine: bool = True) -> None:
    """Checks on top of the native backend's, before anything is loaded; with ``machine``, also what this machine
    must have to train the cell (CUDA for ``backend.device=cuda``, :func:`check_launch_machine`)."""
    validate_launch_config(cfg)
    grpo_config_kwargs(cfg, "unused", cuda=None if machine else True)
    if machine:
        check_launch_machine(cfg)
    for key, value in (cfg.backend.get("grpo_config") or {}).items():
        if key in UNSUPPORTED and value != UNSUPPORTED[key]:
            raise ValueError(f"backend.grpo_config.{key}={value!r}: acts inside TRL's own loss; not supported with the "
                             f"harness objective (leave it at {UNSUPPORTED[key]!r})")
