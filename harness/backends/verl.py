r"""The verl backend: the harness config translated into a ``python -m verl.trainer.main_ppo`` run.

verl (0.9.1) pins ``transformers<5.11`` and brings Ray, so it lives in its own Python environment
(``backend.python``, default ``.venv-verl/bin/python``, made by ``scripts/install_verl.sh``); this module
only writes files and starts that interpreter, it never imports verl. The pieces:

1. data: the task's train split written as parquet in verl's RL format (``data_source``, chat
   ``prompt`` messages built by :func:`harness.prompts.build_messages` — verl renders them with the
   tokenizer's chat template, the same call :func:`harness.prompts.render_prompt` makes —,
   ``reward_model.ground_truth``, ``extra_info``);
2. loss: ``actor.policy_loss.loss_mode=harness_<gate>``, registered in every verl process by
   :mod:`harness.backends.verl_plugin` (entry point ``verl.plugins``, with ``VERL_USE_EXTERNAL_MODULES`` and
   ``actor_rollout_ref.model.external_lib`` as fallbacks, passed to the Ray workers through
   ``ray_kwargs.ray_init.runtime_env.env_vars``);
3. reward: ``reward.custom_reward_function`` = :func:`harness.backends.verl_plugin.compute_score`;
4. metrics: verl's ``file`` logger (JSON lines at ``<output_dir>/verl_metrics.jsonl``), read while the
   run goes and turned into the history / ``on_step`` calls;
5. checkpoints: ``actor.checkpoint.save_contents`` includes ``hf_model``, so every
   ``global_step_N/actor/huggingface`` is a full Hugging Face model directory for the evaluator.

Mapping (harness → verl), in :func:`verl_overrides`:

===============================  ==================================================================
harness                          verl
===============================  ==================================================================
train.steps                      trainer.total_training_steps
train.rollout_batch_size / G     data.train_batch_size (prompts per rollout batch)
train.mini_batch_size / G        actor.ppo_mini_batch_size (prompts per optimizer step; null: the whole
                                 rollout batch, one optimizer step per PPO epoch)
train.num_generations (G)        actor_rollout_ref.rollout.n
train.micro_batch_size           actor.ppo_micro_batch_size_per_gpu (and the log-prob micro-batches)
train.num_iterations             actor.ppo_epochs
train.max_new_tokens             data.max_response_length
train.rollout_temperature/top_p  rollout.temperature / top_p (top_k = -1: off)
train.lr, betas, weight_decay    actor.optim.*; max_grad_norm → optim.clip_grad (and actor.grad_clip)
train.adam_eps                   actor.optim.override_optimizer_config.eps
train.warmup_steps, lr_schedule  actor.optim.lr_warmup_steps, lr_scheduler_type (constant | cosine only)
train.max_prompt_tokens          data.max_prompt_length (when backend.max_prompt_length is null)
train.advantage                  algorithm.adv_estimator=grpo, norm_adv_by_std_in_grpo (grpo: true)
train.loss.agg                   actor.loss_agg_mode (seq-mean-token-mean for GRPO/SAPO)
train.loss.norm_length           actor.loss_scale_factor
train.loss.kl_beta               actor.use_kl_loss, kl_loss_coef, kl_loss_type=low_var_kl (k3)
train.loss.ratio_level/log_ratio_clip, gate.width
                                 HARNESS_VERL_* environment variables (verl has no keys for them)
gate.name                        actor.policy_loss.loss_mode = harness_<gate>
gate.tau_pos / tau_neg           actor.tau_pos / tau_neg
gate.eps_low / eps_high          actor.clip_ratio_low / clip_ratio_high
gate.clip_c (dual_clip, dppo_*)  actor.clip_ratio_c
a method's other keys            HARNESS_VERL_GATE_PARAMS (JSON)
train.save_every                 trainer.save_freq
train.rewards.*                  reward.custom_reward_function.reward_kwargs (format mode too)
===============================  ==================================================================

Known differences from the native backend: verl's GRPO std is unbiased with ε = 1e-6; its KL term
clamps the k3 estimate to ±10 instead of clamping log-ratios; full training needs CUDA GPUs and a vLLM
or SGLang rollout engine (see the README).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.backends import StepCallback, TrainResult
from harness.backends.common import mini_batch_size, start_training, validate_train_config
from harness.config import REPO_ROOT, to_plain

PLUGIN_MODULE = "harness.backends.verl_plugin"
METRICS_FILE = "verl_metrics.jsonl"
LOG_FILE = "verl.log"
DATA_SOURCE_PREFIX = "harness/"
VERL_LR_SCHEDULES = ("constant", "cosine")  # verl 0.9's FSDPOptimizerConfig asserts one of these
_HISTORY_KEYS = {  # history key <- verl metric
    K.REWARD: "critic/score/mean",
    K.RESPONSE_LENGTH: "response_length/mean",
    K.TRUNCATION_RATE: "response_length/clip_ratio",
    K.ENTROPY: "actor/entropy",
    K.LOSS: "actor/pg_loss",
    K.GRAD_NORM: "actor/grad_norm",
    K.LR: "actor/lr",
    K.STEP_TIME_S: "timing_s/step",
    K.ABS_RATIO_DEV: f"actor/harness/{K.ABS_RATIO_DEV}",
    K.GATE_WEIGHT: f"actor/harness/{K.GATE_WEIGHT}",
}


# ----------------------------------------------------------------------------- overrides


def _hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings single-quoted unless plainly safe)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite value {value!r} in a verl override")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text) and text not in ("null", "true", "false"):
        return text
    return _hydra_quoted(text)


def _hydra_quoted(text: str) -> str:
    """A string value, always quoted (Hydra keeps it a string)."""
    text = str(text)
    if "\\" in text:  # Hydra's rules for backslashes inside quotes depend on what follows them: refuse
        raise ValueError(f"backslash in a verl override value: {text!r}")
    return "'" + text.replace("'", "\\'") + "'"


def loss_env(cfg: Any) -> dict[str, str]:
    """Environment variables that carry what verl's config cannot (read by :mod:`harness.backends.verl_plugin`)."""
    from harness.backends.verl_plugin import (
        ENV_GATE,
        ENV_GATE_PARAMS,
        ENV_LOG_RATIO_CLIP,
        ENV_NU,
        ENV_RATIO_LEVEL,
        ENV_WIDTH,
    )
    from harness.gates import gate_params, known_gates

    env = {
        ENV_RATIO_LEVEL: str(cfg.train.loss.ratio_level),
        ENV_LOG_RATIO_CLIP: repr(float(cfg.train.loss.log_ratio_clip)),
    }
    if cfg.gate.get("width") is not None:
        env[ENV_WIDTH] = str(cfg.gate.width)
    if cfg.gate.get("nu") is not None:
        env[ENV_NU] = repr(float(cfg.gate.nu))
    own = {k: float(v) for k, v in gate_params(cfg.gate).items() if k != "clip_c"}  # clip_c: actor.clip_ratio_c
    if own:
        env[ENV_GATE_PARAMS] = json.dumps(own, sort_keys=True)
    if str(cfg.gate.name) not in known_gates():
        env[ENV_GATE] = str(cfg.gate.name)  # an import path: harness_custom reads it
    return env


def verl_overrides(
    cfg: Any,
    *,
    model_path: str | None = None,
    train_file: str | None = None,
    max_prompt_length: int | None = None,
) -> list[str]:
    """The ``python -m verl.trainer.main_ppo`` overrides for the harness config ``cfg`` (pure: no files,
    no model, no verl import). ``model_path`` defaults to ``cfg.model.path`` (else the preset name),
    ``train_file`` to ``<output_dir>/verl_data/train.parquet``, ``max_prompt_length`` to
    ``backend.max_prompt_length`` (else 512). ``backend.extra_overrides`` are appended last (they win)."""
    from harness.backends.verl_plugin import loss_name

    t, g, bk = cfg.train, cfg.gate, cfg.backend
    if t.rollout_batch_size % t.num_generations:
        raise ValueError(f"train.rollout_batch_size={t.rollout_batch_size} must be divisible by "
                         f"train.num_generations={t.num_generations}")
    if t.loss.agg not in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(f"train.loss.agg={t.loss.agg!r} is not supported by the verl backend")
    if t.lr_schedule not in VERL_LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={t.lr_schedule!r} is not supported by verl's FSDP optimizer (allowed: "
                         f"{', '.join(VERL_LR_SCHEDULES)}); the paper's linear decay runs on backend=trl or native")
    out = Path(str(cfg.output_dir))
    model_path = model_path or str(cfg.model.get("path") or cfg.model.name)
    train_file = train_file or str(out / "verl_data" / "train.parquet")
    prompt_len = int(max_prompt_length or bk.get("max_prompt_length") or t.get("max_prompt_tokens") or 512)
    prompts_per_step = t.rollout_batch_size // t.num_generations
    mini = mini_batch_size(t)
    if mini % t.num_generations:
        raise ValueError(f"train.mini_batch_size={mini} must be divisible by train.num_generations="
                         f"{t.num_generations} on the verl backend (verl counts mini-batches in prompts)")
    log_prob_mb = int(bk.get("log_prob_micro_batch_size_per_gpu") or t.micro_batch_size)
    r = t.rewards
    arr = "actor_rollout_ref"
    o: list[tuple[str, Any]] = [
        # algorithm: GRPO group advantages, no critic, no KL in the reward
        ("algorithm.adv_estimator", "grpo"),
        ("algorithm.norm_adv_by_std_in_grpo", t.advantage == "grpo"),
        ("algorithm.use_kl_in_reward", False),
        # data
        ("data.train_files", train_file),
        ("data.val_files", train_file),  # verl builds a val set even with validation off; never evaluated
        ("data.prompt_key", "prompt"),
        ("data.train_batch_size", prompts_per_step),
        ("data.max_prompt_length", prompt_len),
        ("data.max_response_length", int(t.max_new_tokens)),
        ("data.filter_overlong_prompts", True),
        ("data.truncation", "error"),
        ("data.shuffle", True),
        ("data.seed", int(cfg.seed)),
        # model
        (f"{arr}.model.path", model_path),
        (f"{arr}.model.external_lib", "harness.backends.verl_plugin"),
        (f"{arr}.model.use_remove_padding", bool(bk.get("use_remove_padding", True))),
        (f"{arr}.model.enable_gradient_checkpointing", bool(bk.get("enable_gradient_checkpointing", True))),
        # actor: the gate, its parameters, aggregation, PPO epochs = updates per rollout batch
        (f"{arr}.actor.strategy", str(bk.get("strategy", "fsdp"))),
        (f"{arr}.actor.policy_loss.loss_mode", loss_name(str(g.name))),
        # a gate node has ε (clip and the ratio-control methods) or τ (smooth gates), never both: verl's defaults
        # stand for the other
        *([(f"{arr}.actor.tau_pos", float(g.tau_pos)), (f"{arr}.actor.tau_neg", float(g.tau_neg))] if "tau_pos" in g
          else [(f"{arr}.actor.clip_ratio", float(g.eps_low)), (f"{arr}.actor.clip_ratio_low", float(g.eps_low)),
                (f"{arr}.actor.clip_ratio_high", float(g.eps_high))] if "eps_low" in g else []),
        # the methods' own keys: where verl has one it is used, the rest travel in $HARNESS_VERL_GATE_PARAMS
        *([(f"{arr}.actor.clip_ratio_c", float(g.clip_c))] if "clip_c" in g else []),
        (f"{arr}.actor.loss_agg_mode", str(t.loss.agg)),
        (f"{arr}.actor.loss_scale_factor", None if t.loss.norm_length is None else int(t.loss.norm_length)),
        (f"{arr}.actor.ppo_epochs", int(t.num_iterations)),
        (f"{arr}.actor.ppo_mini_batch_size", mini // t.num_generations),
        (f"{arr}.actor.ppo_micro_batch_size_per_gpu", int(t.micro_batch_size)),
        (f"{arr}.actor.shuffle", False),
        (f"{arr}.actor.data_loader_seed", int(cfg.seed)),
        (f"{arr}.actor.entropy_coeff", 0.0),
        (f"{arr}.actor.use_kl_loss", float(t.loss.kl_beta) > 0),
        (f"{arr}.actor.kl_loss_coef", float(t.loss.kl_beta)),
        (f"{arr}.actor.kl_loss_type", "low_var_kl"),
        (f"{arr}.actor.grad_clip", float(t.max_grad_norm)),
        (f"{arr}.actor.optim.lr", float(t.lr)),
        (f"{arr}.actor.optim.betas", [float(b) for b in t.betas]),
        (f"{arr}.actor.optim.weight_decay", float(t.weight_decay)),
        (f"{arr}.actor.optim.override_optimizer_config", {"eps": float(t.get("adam_eps", 1e-8))}),
        (f"{arr}.actor.optim.clip_grad", float(t.max_grad_norm)),
        (f"{arr}.actor.optim.lr_warmup_steps", int(t.warmup_steps)),
        (f"{arr}.actor.optim.lr_scheduler_type", str(t.lr_schedule)),
        (f"{arr}.actor.optim.min_lr_ratio", 0.0),
        (f"{arr}.actor.fsdp_config.param_offload", bool(bk.get("param_offload", False))),
        (f"{arr}.actor.fsdp_config.optimizer_offload", bool(bk.get("optimizer_offload", False))),
        (f"{arr}.actor.checkpoint.save_contents", ["model", "optimizer", "extra", "hf_model"]),
        (f"{arr}.ref.log_prob_micro_batch_size_per_gpu", log_prob_mb),
        # rollout
        (f"{arr}.rollout.name", str(bk.get("rollout", "vllm"))),
        (f"{arr}.rollout.n", int(t.num_generations)),
        (f"{arr}.rollout.temperature", float(t.rollout_temperature)),
        (f"{arr}.rollout.top_p", float(t.top_p)),
        (f"{arr}.rollout.top_k", -1),
        (f"{arr}.rollout.tensor_model_parallel_size", int(bk.get("rollout_tp", 1))),
        (f"{arr}.rollout.gpu_memory_utilization", float(bk.get("gpu_memory_utilization", 0.5))),
        (f"{arr}.rollout.log_prob_micro_batch_size_per_gpu", log_prob_mb),
        # reward: the harness scorer
        ("reward.custom_reward_function.path", f"pkg://{PLUGIN_MODULE}"),
        ("reward.custom_reward_function.name", "compute_score"),
        ("+reward.custom_reward_function.reward_kwargs.format_weight", float(r.format_weight)),
        ("+reward.custom_reward_function.reward_kwargs.accuracy_weight", float(r.accuracy_weight)),
        ("+reward.custom_reward_function.reward_kwargs.format_mode", str(r.get("format", "graded"))),
        ("+reward.custom_reward_function.reward_kwargs.accuracy_fallbacks",
         [str(f) for f in (r.get("accuracy_fallbacks") or [])]),
    ]
    extras = list(to_plain(r.extra) or [])
    if extras:
        o += [("+reward.custom_reward_function.reward_kwargs.extra_paths", [str(e["path"]) for e in extras]),
              ("+reward.custom_reward_function.reward_kwargs.extra_weights", [float(e["weight"]) for e in extras])]
    o += [
        # trainer: steps, checkpoints, logging, resources
        ("trainer.total_training_steps", int(t.steps)),
        ("trainer.total_epochs", 1000),  # an upper bound; total_training_steps ends the run
        ("trainer.save_freq", int(t.save_every)),
        ("trainer.test_freq", -1),
        ("trainer.val_before_train", False),
        ("trainer.default_local_dir", str(out / "checkpoints")),
        ("trainer.resume_mode", "auto" if cfg.get("resume") else "disable"),
        ("trainer.logger", ["console", "file"]),
        ("trainer.project_name", "harness"),
        ("trainer.experiment_name", re.sub(r"[^A-Za-z0-9_.-]+", "_", str(g.name))),
        ("trainer.n_gpus_per_node", int(bk.get("n_gpus_per_node", 1))),
        ("trainer.nnodes", int(bk.get("nnodes", 1))),
        ("trainer.device", str(bk.get("device", "cuda"))),
    ]
    if bk.get("ray_address"):
        o.append(("+ray_kwargs.ray_init.address", str(bk.ray_address)))
    if bk.get("num_cpus"):
        o.append(("ray_kwargs.ray_init.num_cpus", int(bk.num_cpus)))
    env = {"VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE, "VERL_FILE_LOGGER_PATH": str(out / METRICS_FILE),
           **loss_env(cfg)}
    overrides = [f"{key}={_hydra_value(value)}" for key, value in o]
    # Ray wants strings in env_vars: always quote, so Hydra never turns "20.0" or "true" into a number or bool.
    overrides += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}={_hydra_quoted(v)}" for k, v in sorted(env.items())]
    return overrides + [str(x) for x in (to_plain(bk.get("extra_overrides")) or [])]


# ----------------------------------------------------------------------------- data


def verl_rows(problems: Sequence[Mapping[str, Any]], prompt_cfg: Any, *, task_name: str, split: str) -> list[dict]:
    """Problems in verl's RL-dataset schema (what ``verl.utils.dataset.RLHFDataset`` reads)."""
    from harness.prompts import build_messages

    return [
        {
            "data_source": f"{DATA_SOURCE_PREFIX}{task_name}",
            "prompt": build_messages(str(p["problem"]), prompt_cfg),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(p["answer"])},
            "extra_info": {"split": split, "index": i, "id": str(p["id"]), "problem": str(p["problem"])},
        }
        for i, p in enumerate(problems)
    ]


def write_parquet(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


def max_prompt_tokens(tokenizer: Any, problems: Sequence[Mapping[str, Any]], prompt_cfg: Any) -> int:
    """Longest rendered prompt in tokens (no special tokens added: the chat template is the prompt)."""
    from harness.prompts import render_prompt

    texts = [render_prompt(tokenizer, str(p["problem"]), prompt_cfg) for p in problems]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- metrics and checkpoints


def history_entry(step: int, data: Mapping[str, Any]) -> dict[str, float]:
    """One verl file-logger record as a harness history entry: native keys where verl has them,
    every numeric verl metric as ``verl/<name>``."""
    entry: dict[str, float] = {K.STEP: float(step)}
    numeric = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for native, key in _HISTORY_KEYS.items():
        if key in numeric:
            entry[native] = numeric[key]
    entry.update({f"verl/{k}": v for k, v in numeric.items()})
    return entry


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, float]], int]:
    """Complete JSON lines of verl's file logger from byte ``offset``: (history entries, new offset)."""
    if not path.exists():
        return [], offset
    if path.stat().st_size < offset:  # verl's file logger truncates the file when a (resumed) run starts
        offset = 0
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    entries, consumed = [], 0
    for line in chunk.split(b"\n")[:-1]:  # the last piece is empty or a line still being written
        consumed += len(line) + 1
        if line.strip():
            record = json.loads(line)
            entries.append(history_entry(int(record["step"]), record.get("data", {})))
    return entries, offset + consumed


def hf_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``global_step_N/actor/huggingface`` directories that hold a full HF model, oldest first."""
    found = []
    for step_dir in ckpt_dir.glob("global_step_*"):
        hf = step_dir / "actor" / "huggingface"
        if (hf / "config.json").exists() and any(hf.glob("*.safetensors")):
            found.append((int(step_dir.name.rsplit("_", 1)[-1]), hf))
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------- launch


def resolve_python(spec: str) -> Path:
    """``backend.python``: absolute, or relative to the repository root."""
    path = Path(os.path.expanduser(spec))
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.exists():
        raise ValueError(f"backend.python={spec!r}: {path} does not exist; create the verl environment with "
                         "scripts/install_verl.sh (verl pins transformers<5.11, so it has its own virtualenv)")
    return path


def launch_env(cfg: Any) -> dict[str, str]:
    """The launcher's environment: ours plus the loss settings, the plugin fallback and the metrics path
    (also passed to the Ray workers through runtime_env env_vars, see :func:`verl_overrides`)."""
    env = dict(os.environ)
    env.update(loss_env(cfg))
    env["VERL_USE_EXTERNAL_MODULES"] = PLUGIN_MODULE
    env["VERL_FILE_LOGGER_PATH"] = str(Path(str(cfg.output_dir)) / METRICS_FILE)
    # harness importable even where it is not pip-installed in the verl environment (local Ray workers
    # inherit the driver's environment).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HYDRA_FULL_ERROR", "1")
    return env


def train(cfg: Any, on_step: StepCallback | None = None) -> TrainResult:
    """Write the data, start ``<backend.python> -m verl.trainer.main_ppo <overrides>``, stream its metrics
    into ``on_step``, and return the HF checkpoints it saved."""
    validate_train_config(cfg)
    verl_overrides(cfg)  # config errors before anything is written
    bk = cfg.backend
    python = resolve_python(str(bk.python))
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    problems, model_path, prompt_cfg = start_training(cfg)
    prompt_len = bk.get("max_prompt_length") or cfg.train.get("max_prompt_tokens")
    if not prompt_len:
        from transformers import AutoTokenizer

        prompt_len = max_prompt_tokens(AutoTokenizer.from_pretrained(model_path), problems, prompt_cfg)
    train_file = write_parquet(verl_rows(problems, prompt_cfg, task_name=str(cfg.task.name), split="train"),
                               out_dir / "verl_data" / "train.parquet")
    overrides = verl_overrides(cfg, model_path=model_path, train_file=str(train_file),
                               max_prompt_length=int(prompt_len))
    cmd = [str(python), "-m", "verl.trainer.main_ppo", *overrides]
    (out_dir / "verl_command.sh").write_text(shlex.join(cmd) + "\n")

    metrics_path = out_dir / METRICS_FILE
    if metrics_path.exists():
        metrics_path.unlink()  # verl truncates it anyway; a stale file must not be read as this run's steps
    history: list[dict[str, float]] = []
    previous = out_dir / K.HISTORY_FILE
    if cfg.get("resume") and previous.exists():
        history = json.loads(previous.read_text())  # steps before the resumed checkpoint
    offset = 0
    timeout = bk.get("timeout_s")
    t0 = time.monotonic()
    with (out_dir / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=str(out_dir), env=launch_env(cfg), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: stop Ray workers with it
        try:
            while True:
                rc = proc.poll()
                entries, offset = read_metrics(metrics_path, offset)
                for entry in entries:
                    history = [h for h in history if h["step"] < entry["step"]]  # a resumed run redoes later steps
                    history.append(entry)
                    if on_step is not None:
                        on_step(int(entry["step"]), entry)
                if rc is not None:
                    break
                if timeout and time.monotonic() - t0 > float(timeout):
                    raise TimeoutError(f"verl run exceeded backend.timeout_s={timeout}")
                time.sleep(1.0)
        except BaseException:
            _stop(proc)
            raise
    (out_dir / K.HISTORY_FILE).write_text(json.dumps(history))
    checkpoints = hf_checkpoints(out_dir / "checkpoints")
    if rc != 0 or not checkpoints:
        tail = (out_dir / LOG_FILE).read_text(errors="replace")[-4000:]
        raise RuntimeError(f"verl run failed (exit code {rc}, {len(checkpoints)} HF checkpoints); command in "
                           f"{out_dir / 'verl_command.sh'}, log {out_dir / LOG_FILE}; last lines:\n{tail}")
    return TrainResult(final_checkpoint=checkpoints[-1], checkpoints=checkpoints, history=history,
                       initial_checkpoint=model_path)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and its process group (Ray's local workers), politely first."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

