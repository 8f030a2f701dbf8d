r"""The TRL backend: TRL's ``GRPOTrainer`` (generation, vLLM, accelerate/DeepSpeed, checkpoints) with the
harness objective as its per-token loss.

:func:`train` puts the backend's parts together and owns its checkpoints and resuming:
:mod:`~harness.backends.trl_trainer` (the trainer subclass and its loss), :mod:`~harness.backends.trl_config` (the
harness config as ``GRPOConfig``, with the mapping table), :mod:`~harness.backends.trl_rewards` (the reward
functions), :mod:`~harness.backends.trl_history` (TRL's logs as the harness's per-step history).

Prompts are plain text rendered by :func:`harness.prompts.render_prompt` (the native backend's and the
evaluator's prompts, byte for byte) and tokenized without special tokens, as on the native backend;
reward functions therefore receive plain-text completions. Known differences from the native backend:
TRL's group std is unbiased (Bessel) with ε = 1e-4 fixed; the prompt order comes from TRL's seeded
sampler; the LR schedule advances per optimizer step (the native one per rollout batch); dropout is
disabled (``backend.disable_dropout``) so the two passes see the same network.

Diagnostics: every optimizer step the harness diagnostics of that pass (ratio statistics, mean
|r − 1|, gate weights, ... over the rows of the whole pass that went through the forward) are added to TRL's logs as
``harness/<name>``; EUR (arXiv 2602.19345 eq. 12) is over every row of the pass, zero-advantage rows left out of
the forward (``skip_zero_advantage``) included: r = 1 for them while the weights are the behaviour ones (the first
optimizer step on the generation batch), after that their log-probs come from a no-grad forward (as on the native
backend, so the two agree on the same batch). Once per harness step ``on_step(step, metrics)`` receives the native
backend's keys (``reward``, ``it1/abs_ratio_dev``, ``it2/abs_ratio_dev``, ``loss``, ``grad_norm``, ...) plus TRL's
own first-pass logs as ``trl/<name>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig

from harness import keys as K
from harness.backends import StepCallback, TrainResult
from harness.backends.checkpoints import list_checkpoints, preflight, resume_checkpoint
from harness.backends.common import fit_prompts, mini_batch_size, num_processes, start_training
from harness.backends.trl_config import (
    accelerate_sharding,
    grpo_config_kwargs,
    join_cpu_process_group,
    validate_trl_config,
)
from harness.backends.trl_history import HISTORY_FILE, HarnessStepCallback
from harness.backends.trl_rewards import reward_functions
from harness.backends.trl_trainer import HarnessGRPOTrainer
from harness.config import to_plain
from harness.models import load_model_and_tokenizer
from harness.objective import loss_kwargs
from harness.prompts import render_prompt
from harness.schedule import schedule_from_config

CHECKPOINT_PATTERN = r"checkpoint-\d+"  # transformers' checkpoint-<optimizer step>
# What a TRL checkpoint must hold to resume exactly (transformers writes them, the callback adds the history).
CHECKPOINT_REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", HISTORY_FILE)
# Under FSDP or DeepSpeed the optimizer (and, with ZeRO-3, the weights) are saved in the framework's own sharded
# files, whose names depend on its settings: the manifest covers them; these are the files every layout has.
SHARDED_CHECKPOINT_REQUIRED = ("scheduler.pt", "trainer_state.json", HISTORY_FILE)
# the checkpoint a launch's ranks continue from, verified by the process that started them (its directory: none)
LAUNCH_RESUME_ENV = "HARNESS_LAUNCH_RESUME_FROM"


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """TRL/transformers checkpoints (``checkpoint-<optimizer step>``), oldest first."""
    return list_checkpoints(ckpt_dir, CHECKPOINT_PATTERN)


def resume_point(cfg: Any) -> Path | None:
    """The checkpoint ``resume=true`` continues from: the newest under ``<output_dir>/checkpoints`` that verifies
    (newer broken ones are named in the log and set aside), None to start over. A multi-process cell's launcher calls
    it once (:mod:`harness.launch`) and hands the answer to its ranks (``LAUNCH_RESUME_ENV``: the checkpoint, or the
    checkpoint directory itself for none), so they all continue from the same one without hashing it N times over; a
    value naming another cell's checkpoints is not this cell's answer and is ignored."""
    if not cfg.get("resume"):
        return None
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    handed = os.environ.get(LAUNCH_RESUME_ENV)
    if handed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if Path(handed).resolve() == ckpt_dir.resolve():
            return None
        if Path(handed).parent.resolve() == ckpt_dir.resolve():
            return Path(handed)
    sharded = num_processes(cfg) > 1 and accelerate_sharding(cfg) != "ddp"
    return resume_checkpoint(ckpt_dir, CHECKPOINT_PATTERN,
                             SHARDED_CHECKPOINT_REQUIRED if sharded else CHECKPOINT_REQUIRED)


# ----------------------------------------------------------------------------- the entry point


def train(cfg: Any, on_step: StepCallback | None = None) -> TrainResult:
    """Train with TRL's GRPOTrainer and the harness objective; HF-format checkpoints under
    ``<output_dir>/checkpoints/checkpoint-<optimizer step>`` (each loads with ``from_pretrained``)."""
    from datasets import Dataset

    validate_trl_config(cfg)
    problems, model_path, prompt_cfg = start_training(cfg)
    t = cfg.train
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"

    model, tokenizer = load_model_and_tokenizer({**to_plain(cfg.model), "path": model_path}, device="cpu",
                                                cache_dir=cfg.get("cache_dir"))
    n_saves = len({min(s, t.steps) for s in range(t.save_every, t.steps + t.save_every, t.save_every)})
    # transformers keeps the optimizer in every checkpoint it keeps: count all of them in full
    keep = t.get("keep_checkpoints")
    preflight(model, ckpt_dir, n_saves=n_saves, keep=keep, full_state_kept=True)
    problems = fit_prompts(problems, tokenizer, prompt_cfg, t.get("max_prompt_tokens"))
    dataset = Dataset.from_list([
        {"prompt": render_prompt(tokenizer, p["problem"], prompt_cfg), "answer": str(p["answer"]),
         "problem": str(p["problem"]), "id": str(p["id"])}
        for p in problems
    ])
    funcs, weights = reward_functions(cfg)
    join_cpu_process_group(cfg)
    args = GRPOConfig(**{**grpo_config_kwargs(cfg, ckpt_dir), "reward_weights": weights})

    history: list[dict[str, float]] = []
    # the newest checkpoint that verifies (newer broken ones are named in the log and set aside)
    resume_from = resume_point(cfg)
    if resume_from is not None:
        history = json.loads((resume_from / HISTORY_FILE).read_text())
    schedule = schedule_from_config(cfg)
    schedule.replay(history, K.pass_key(int(t.num_iterations), K.EUR), K.TAU_POS)  # a resumed controller goes on
    loss_kw = loss_kwargs(cfg)
    loss_kw["tau_pos"], loss_kw["tau_neg"] = schedule.taus(len(history))
    callback = HarnessStepCallback(int(t.num_iterations), t.rollout_batch_size // t.num_generations, history, on_step,
                                   minis_per_pass=t.rollout_batch_size // mini_batch_size(t), schedule=schedule)
    trainer = HarnessGRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[callback], loss_kwargs=loss_kw,
                                 sampler=str(cfg.backend.get("sampler", "cached")),
                                 skip_zero_advantage=bool(cfg.backend.get("skip_zero_advantage", True)))
    callback.loss_kwargs = trainer.harness_loss_kwargs  # the dict the loss reads (the trainer keeps a copy)
    # With the progress bar off, transformers prints every log dict (~60 keys a step here): keep the run quiet,
    # the metrics reach on_step, the history and trainer_state.json anyway.
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    if trainer.accelerator.is_main_process:  # a multi-process cell's files are rank 0's
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / K.HISTORY_FILE).write_text(json.dumps(history))
    checkpoints = _checkpoints(ckpt_dir)
    if not checkpoints:
        raise RuntimeError(f"TRL saved no checkpoint under {ckpt_dir}")
    return TrainResult(final_checkpoint=checkpoints[-1], checkpoints=checkpoints, history=history,
                       initial_checkpoint=model_path)
