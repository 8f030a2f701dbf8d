"""The TRL backend's per-step history: :class:`HarnessStepCallback` turns TRL's per-optimizer-step logs into one
entry per harness step with the native backend's keys, moves a τ schedule between steps and stores the history in
every checkpoint (:data:`HISTORY_FILE`), so a resumed run returns all of it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from harness import keys as K
from harness.backends import StepCallback
from harness.backends.checkpoints import write_manifest
from harness.schedule import TauSchedule

HISTORY_FILE = "harness_history.json"  # the history so far, in every checkpoint

_FIRST_PASS_KEYS = {  # history key <- TRL's log key (from the pass that generated the batch)
    K.REWARD: "reward",
    K.REWARD_STD: "reward_std",
    K.REWARD_FORMAT: "rewards/format_reward/mean",
    K.REWARD_ACCURACY: "rewards/accuracy_reward/mean",
    K.RESPONSE_LENGTH: "completions/mean_length",
    K.TRUNCATION_RATE: "completions/clipped_ratio",
    K.ENTROPY: "entropy",
    K.ZERO_VAR_FRAC: "frac_reward_zero_std",
}


class HarnessStepCallback(TrainerCallback):
    """Groups TRL's per-optimizer-step logs into one harness step (``num_iterations`` passes over a rollout
    batch), appends it to ``history`` and calls ``on_step(step, metrics)``; stores the history in every
    checkpoint so a resumed run returns the whole history."""

    def __init__(self, num_iterations: int, prompts_per_step: int, history: list[dict[str, float]],
                 on_step: StepCallback | None = None, minis_per_pass: int = 1, schedule: TauSchedule | None = None,
                 loss_kwargs: dict[str, Any] | None = None) -> None:
        # ``schedule`` moves the temperatures in ``loss_kwargs`` (the trainer's own dict, read by every loss call)
        # between harness steps: after step s is merged, the taus of step s + 1 are set before TRL computes its loss.
        self.schedule, self.loss_kwargs = schedule, loss_kwargs
        self.num_iterations = num_iterations
        self.minis_per_pass = minis_per_pass
        self.prompts_per_step = prompts_per_step
        self.history = history
        self.on_step = on_step
        self._passes: list[dict[str, float]] = []
        self._t0 = time.perf_counter()
        self._tokens0 = 0.0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not logs or "harness/iteration" not in logs:
            return  # the end-of-training summary, or an eval log
        self._passes.append({k: float(v) for k, v in logs.items() if isinstance(v, int | float) and v is not None})
        updates = self.num_iterations * self.minis_per_pass  # optimizer steps per rollout batch
        if len(self._passes) < updates:
            return
        step = state.global_step // updates
        logs_of_step = self._passes
        self._passes = []
        # one entry per pass: its last optimizer step's log (which carries the pass diagnostics), with the
        # pass's mean gradient norm; generation-time metrics (rewards, lengths) are in the step's first log
        m = self.minis_per_pass
        passes = []
        for k in range(self.num_iterations):
            chunk = logs_of_step[k * m:(k + 1) * m]
            norms = [x["grad_norm"] for x in chunk if "grad_norm" in x]
            passes.append({**chunk[-1], **({"grad_norm": sum(norms) / len(norms)} if norms else {})})
        for key in _FIRST_PASS_KEYS.values():
            if key in logs_of_step[0]:
                passes[0][key] = logs_of_step[0][key]
        entry = self._merge(step, passes)
        if self.loss_kwargs is not None:
            entry[K.TAU_POS], entry[K.TAU_NEG] = self.loss_kwargs["tau_pos"], self.loss_kwargs["tau_neg"]
        self.history.append(entry)
        if self.schedule is not None and self.loss_kwargs is not None:
            self.schedule.observe(entry.get(K.pass_key(self.num_iterations, K.EUR), math.nan))
            self.loss_kwargs["tau_pos"], self.loss_kwargs["tau_neg"] = self.schedule.taus(step)  # step = s + 1, 0-based
        if self.on_step is not None:
            self.on_step(step, entry)

    def _merge(self, step: int, passes: list[dict[str, float]]) -> dict[str, float]:
        first, last = passes[0], passes[-1]
        entry: dict[str, float] = {K.STEP: float(step)}
        for k, logs in enumerate(passes, start=1):
            for key, value in logs.items():
                if key.startswith("harness/") and key != "harness/iteration":
                    entry[K.pass_key(k, key[len("harness/"):])] = value
            if "grad_norm" in logs:
                entry[K.pass_key(k, K.PASS_GRAD_NORM)] = logs["grad_norm"]
        for native, trl_key in _FIRST_PASS_KEYS.items():
            if trl_key in first:
                entry[native] = first[trl_key]
        if K.ZERO_VAR_FRAC in entry:
            entry[K.ZERO_VAR_GROUPS] = entry[K.ZERO_VAR_FRAC] * self.prompts_per_step
        entry[K.LR] = last.get("learning_rate", math.nan)
        entry[K.LOSS] = entry.get(K.pass_key(len(passes), K.PASS_LOSS), last.get("loss", math.nan))
        entry[K.GRAD_NORM] = last.get("grad_norm", math.nan)
        now = time.perf_counter()
        entry[K.STEP_TIME_S] = now - self._t0
        self._t0 = now
        if "num_tokens" in last:
            entry[K.TOKENS] = last["num_tokens"] - self._tokens0
            self._tokens0 = last["num_tokens"]
        entry.update({f"trl/{k}": v for k, v in first.items() if not k.startswith("harness/")})
        return entry

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its files (its RNG state) before the manifest
        if ckpt.is_dir() and state.is_world_process_zero:
            (ckpt / HISTORY_FILE).write_text(json.dumps(self.history))
            write_manifest(ckpt)  # last: transformers has written everything else by now
