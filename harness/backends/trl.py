r"""The TRL backend: TRL's ``GRPOTrainer`` (generation, vLLM, accelerate/DeepSpeed, checkpoints) with the
harness objective as its per-token loss.

TRL 1.16 has no loss registry: its gates are an if/elif chain inside ``GRPOTrainer._compute_loss``.
:class:`HarnessGRPOTrainer` overrides that method (the pattern TRL's own experimental trainers use):
it takes the tensors TRL prepared (current log-probs from ``_get_per_token_logps_and_entropies``,
``old_per_token_logps`` — ``None`` when generation and optimisation are aligned, then the current
log-probs detached, so r = 1 — the per-sequence ``advantages``, the completion mask and, with a KL
term, ``ref_per_token_logps``) and returns

.. math::  \mathcal{L}_{micro} = c \cdot \texttt{policy\_loss}(\log\pi_\theta, \log\pi_{old}, A, M)

with :func:`harness.objective.policy_loss`, the one loss every backend calls, and the
gradient-accumulation factor c = 1/``current_gradient_accumulation_steps`` exactly as TRL's
``grpo``/``sapo`` branches do for ``seq-mean-token-mean`` (the micro-batches of one optimizer step
hold equally many sequences, so the accumulated gradient is the gradient of the batch loss). For
``token-mean`` / ``seq-mean-token-sum-norm`` c is :func:`harness.objective.micro_batch_weight`
against the whole accumulation window, which makes accumulation exact for those too.

Config mapping (harness → ``GRPOConfig``; one harness step = one rollout batch, as on the native
backend):

==============================  =====================================================================
harness                         TRL
==============================  =====================================================================
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
train.loss.agg                  loss_type grpo | bnpo | dr_grpo (same aggregation; for TRL's logs)
train.loss.kl_beta              beta (TRL then computes reference log-probs)
train.rewards.*                 reward_funcs [format (graded | binary), accuracy, extras...] + reward_weights
train.save_every                save_steps = save_every × optimizer steps per batch (HF-format checkpoints)
train.keep_checkpoints          save_total_limit (transformers deletes older checkpoints; each keeps its optimizer)
gate.*                          the harness loss (and epsilon / sapo temperatures, for TRL's logs)
==============================  =====================================================================

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
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from harness import keys as K
from harness.backends import StepCallback, TrainResult
from harness.backends.checkpoints import list_checkpoints, preflight, resume_checkpoint, write_manifest
from harness.backends.common import fit_prompts, mini_batch_size, start_training
from harness.backends.sampling import eval_no_grad
from harness.config import to_plain
from harness.models import load_model_and_tokenizer
from harness.objective import loss_kwargs, micro_batch_weight, policy_loss
from harness.prompts import render_prompt
from harness.rewards import accuracy_rewards, format_rewards, reward_spec
from harness.schedule import TauSchedule, schedule_from_config

HISTORY_FILE = "harness_history.json"
CHECKPOINT_PATTERN = r"checkpoint-\d+"  # transformers' checkpoint-<optimizer step>
# What a TRL checkpoint must hold to resume exactly (transformers writes them, the callback adds the history).
CHECKPOINT_REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", HISTORY_FILE)
TRL_LOSS_TYPE = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo"}
LR_SCHEDULER = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
VLLM_KEYS = ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
             "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
             "vllm_max_model_length", "vllm_enable_sleep_mode", "vllm_importance_sampling_correction")
# TRL features that act inside its own _compute_loss; the harness loss does not implement them.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_UNSUPPORTED = {"top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "entropy_coef": 0.0,
                "use_adaptive_entropy": False, "delta": None}


# ----------------------------------------------------------------------------- the loss


def gated_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    loss_kwargs: dict[str, Any],
    *,
    ref_per_token_logps: Tensor | None = None,
    is_weights: Tensor | None = None,
    scale: float = 1.0,
    diagnostics: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """The TRL backend's micro-batch loss: ``scale · policy_loss(...)`` on TRL's tensors.

    ``old_per_token_logps=None`` means "on-policy" (TRL skips computing them when generation and
    optimisation are aligned): the current log-probs, detached, so r = 1. ``advantages`` may be
    (B,), (B, 1) or (B, T). vLLM importance-sampling weights w ≥ 0 (``is_weights``, (B, T) or (B, 1))
    are folded into the advantages: s(r, wA) = w·s(r, A) for every gate, which is TRL's
    ``per_token_loss * importance_sampling_ratio``.
    """
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    adv = advantages.squeeze(-1) if advantages.dim() == 2 and advantages.shape[1] == 1 else advantages
    if is_weights is not None:
        w = torch.nan_to_num(is_weights.to(per_token_logps.dtype), nan=1.0)
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * w.expand_as(per_token_logps)
    loss, diag = policy_loss(per_token_logps, old, adv, mask, ref_logp=ref_per_token_logps,
                             diagnostics=diagnostics, **loss_kwargs)
    return loss * scale, diag


class HarnessGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is :func:`harness.objective.policy_loss` (see the module docstring).

    ``loss_kwargs``: the keyword arguments of ``policy_loss`` (gate, τ, ε, aggregation, KL β, ...), as
    built by :func:`harness.objective.loss_kwargs`.
    """

    def __init__(self, *args: Any, loss_kwargs: dict[str, Any], sampler: str = "generate",
                 skip_zero_advantage: bool = False, **kwargs: Any) -> None:
        cfg = kwargs.get("args")
        for key, neutral in _UNSUPPORTED.items():
            if cfg is not None and getattr(cfg, key, neutral) != neutral:
                raise ValueError(f"GRPOConfig.{key}={getattr(cfg, key)!r} acts inside TRL's own loss and is not "
                                 f"supported with the harness objective (leave it at {neutral!r})")
        self.harness_loss_kwargs = dict(loss_kwargs)
        self._harness_window: list[tuple[Tensor, ...]] = []
        self._harness_window_loss = 0.0
        self._harness_pending: dict[str, float] = {}
        self.harness_sampler = sampler  # cached: the native backend's sampler on the transformers path
        self.harness_skip_zero_advantage = skip_zero_advantage
        self._harness_sampled_entropy = False  # the generation batch's entropy came from the sampler
        super().__init__(*args, **kwargs)

    # Plain-text prompts: tokenize exactly like the native backend (no BOS/special tokens added), so the
    # rendered chat template is the whole prompt.
    def _tokenize_prompts(self, prompts: list) -> tuple[list, Any, dict]:
        if prompts and isinstance(prompts[0], str):
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}
        return super()._tokenize_prompts(prompts)

    def _generate_single_turn(self, prompt_ids: list, images: Any, multimodal_fields: dict, num_generations: int,
                              has_tool_images: bool = False) -> tuple[list, Any]:
        """TRL's transformers generation path with ``sampler="cached"``: the native backend's cached sampler
        (:func:`harness.backends.sampling.sample_completions`: each prompt prefilled once and its KV cache repeated
        for its G rollouts, instead of ``generate`` prefilling every prompt G times; the same distribution), which
        also gives the entropy of the distributions the tokens were drawn from. vLLM, continuous batching, images,
        tools and several EOS tokens keep TRL's own path."""
        G = num_generations
        cached = getattr(self, "harness_sampler", "generate") == "cached"
        plain = (cached and not self.use_vllm and not images and not multimodal_fields
                 and not getattr(self, "use_transformers_continuous_batching", False) and not self.tools
                 and len(self.eos_token_ids) == 1 and len(prompt_ids) % G == 0
                 and all(prompt_ids[i] == prompt_ids[i - i % G] for i in range(len(prompt_ids))))
        if not plain:
            self._harness_sampled_entropy = False
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        from trl.models import unwrap_model_for_generation

        from harness.backends.sampling import mask_through_first_eos, sample_completions

        device, pad, eos = self.accelerator.device, self._tokenizer.pad_token_id, self.eos_token_ids[0]
        prompts = prompt_ids[::G]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as unwrapped, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            seqs, entropy = sample_completions(unwrapped, ids, attention, num_generations=G,
                                               max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                               top_p=self.top_p, eos_token_id=eos, pad_token_id=pad)
        completion = seqs[:, width:]
        keep = mask_through_first_eos(completion, eos)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy"].append(self._global_masked_mean(entropy, keep.to(entropy.dtype)))
        self._harness_sampled_entropy = True
        return [c[m].tolist() for c, m in zip(completion.cpu(), keep.cpu(), strict=True)], None

    def _skips_zero_advantage(self, inputs: dict[str, Any]) -> bool:
        """Whether rows with A = 0 may be left out of this micro-batch's forward and backward
        (``skip_zero_advantage``): such a row adds exactly 0 to every gate's loss and gradient, so leaving it out
        changes no update (the loss is rescaled to the whole micro-batch); not with a KL term (those rows still carry
        its gradient) or a MoE load-balancing loss. The same answer on every process."""
        multimodal = any(inputs.get(k) is not None for k in _FORWARD_KEYS)
        return bool(getattr(self, "harness_skip_zero_advantage", False) and self.model.training
                    and not self.aux_loss_enabled and not multimodal
                    and not self.harness_loss_kwargs.get("kl_beta", 0.0))

    def _trained_rows(self, inputs: dict[str, Any]) -> Tensor | None:
        """With :meth:`_skips_zero_advantage`: the rows of this micro-batch that train (advantage ≠ 0), or None for
        all of them."""
        if not self._skips_zero_advantage(inputs):
            return None
        adv = inputs["advantages"]
        nonzero = (adv != 0) if adv.dim() == 1 else (adv != 0).reshape(adv.shape[0], -1).any(-1)
        # no row active: all of them (a zero update either way, through the usual forward and backward)
        return None if bool(nonzero.all()) or not bool(nonzero.any()) else nonzero.nonzero().squeeze(-1)

    def _left_out_rows(self, model: Any, inputs: dict[str, Any], rows: Tensor | None) -> tuple[Any, ...] | None:
        """The diagnostics window entry of the rows of the micro-batch ``inputs`` that :meth:`_trained_rows` left
        out (None when there are none): eq. 12's EUR averages over every prompt of the step, so their ratios count
        too. Where the weights are still those the behaviour log-probs were taken with (TRL passed none, or this is
        the first optimizer step on the generation batch) r = 1; after that, their log-probs come from a no-grad
        forward in eval mode (no dropout, no random numbers drawn)."""
        completion_mask = inputs["completion_mask"]
        n = completion_mask.shape[0]
        left_out = torch.ones(n, dtype=torch.bool, device=completion_mask.device)
        left_out[rows if rows is not None else slice(None)] = False
        old = inputs.get("old_per_token_logps")
        moved = old is not None and (self._step % (self.args.steps_per_generation * self.num_iterations)
                                     >= self.args.gradient_accumulation_steps)
        # Under several processes a forward can be a collective (DDP's buffer broadcast, FSDP / ZeRO-3 gathers):
        # whenever any process may measure, every process runs one forward, on a row it discards if it has none.
        together = moved and getattr(self.accelerator, "num_processes", 1) > 1
        if not bool(left_out.any()) and not together:
            return None
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        if moved:
            take = left_out if bool(left_out.any()) else torch.arange(n, device=left_out.device) == 0
            ids = torch.cat([inputs["prompt_ids"][take], inputs["completion_ids"][take]], dim=1)
            attention = torch.cat([inputs["prompt_mask"][take], completion_mask[take]], dim=1)
            # each distinct row once: the completions of a prompt often repeat one another word for word
            distinct, inverse = torch.unique(torch.cat([ids, attention], dim=1), dim=0, return_inverse=True)
            with eval_no_grad(model):
                logp, _, _ = self._get_per_token_logps_and_entropies(
                    model, distinct[:, :ids.shape[1]], distinct[:, ids.shape[1]:], inputs["completion_ids"].size(1))
            if not bool(left_out.any()):
                return None
            logp = logp[inverse]
            old = old[left_out].detach()
        else:
            on_policy = mask.new_zeros(mask[left_out].shape, dtype=torch.float32)  # TRL's r = 1 without old log-probs
            logp = old = on_policy if old is None else old[left_out].detach()
        adv = inputs["advantages"][left_out].detach()
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(logp).to(logp.dtype)
        groups = inputs.get("harness_group")
        return (logp.detach(), old, adv, mask[left_out].detach(), None,
                None if groups is None else groups[left_out], torch.zeros(len(logp), dtype=torch.bool))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollouts, plus each row's prompt index (``harness_group``) for the EUR diagnostic: TRL samples
        the G completions of a prompt as consecutive rows of the global batch and gives each process a contiguous
        slice, and its later shuffle permutes this tensor with the rest of the batch."""
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].shape[0]
        first = self.accelerator.process_index * n
        out["harness_group"] = (torch.arange(first, first + n) // self.num_generations).to(out["completion_ids"].device)
        return out

    def _harness_scale(self, mask: Tensor, train: bool) -> float:
        """Gradient-accumulation factor c of this micro-batch (module docstring)."""
        if not train:
            return 1.0
        agg = self.harness_loss_kwargs.get("agg", "seq-mean-token-mean")
        window = self._window_mask(mask)
        if agg == "seq-mean-token-mean" or window is None:
            return 1.0 / self.current_gradient_accumulation_steps  # TRL's grpo/sapo rule
        return micro_batch_weight(mask, window, agg)

    def _window_mask(self, like: Tensor) -> Tensor | None:
        """Completion masks of the current accumulation window: the micro-batches of this optimizer step, a
        slice of the buffered generation batch (all of it without mini-batches). While TRL computes a loss,
        ``self._step`` is the index of the current micro-step."""
        buffered = getattr(self, "_buffered_inputs", None)
        if not buffered:
            return None
        accumulation = self.args.gradient_accumulation_steps
        start = (self._step % self.args.steps_per_generation) // accumulation * accumulation
        masks = [b["completion_mask"] for b in buffered[start:start + accumulation]]
        width = max(m.shape[1] for m in masks)
        return torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]).to(like.device)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        rows = self._trained_rows(inputs)
        micro_batch = inputs
        kept = 1.0
        if rows is not None:  # zero-advantage rows left out; the loss scaled back to the whole micro-batch
            full_mask = inputs["completion_mask"]
            agg = self.harness_loss_kwargs.get("agg", "seq-mean-token-mean")
            kept = micro_batch_weight(full_mask[rows], full_mask, agg)
            inputs = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == full_mask.shape[0]
                      else v for k, v in inputs.items()}
            inputs["_harness_full_mask"] = full_mask
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # The same call as TRL's _compute_loss (multimodal fields pass through untouched).
        # the sampler gave the entropy of the rollouts already (over every row, not only those that train)
        with_entropy = not (getattr(self, "_harness_sampled_entropy", False) and self.model.training)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=with_entropy,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        train = self.model.training
        is_weights = None
        if getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False):
            is_weights = inputs.get("importance_sampling_ratio")
        ref = inputs.get("ref_per_token_logps") if self.harness_loss_kwargs.get("kl_beta", 0.0) else None
        full = inputs.get("_harness_full_mask", mask)
        loss, _ = gated_loss(per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask,
                             self.harness_loss_kwargs, ref_per_token_logps=ref, is_weights=is_weights,
                             scale=self._harness_scale(full, train) * kept)

        mode = "train" if train else "eval"
        if self.aux_loss_enabled and aux_loss is not None:  # MoE load balancing, scaled as TRL does
            accumulation = self.current_gradient_accumulation_steps if train else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        if entropies is not None:
            self._metrics[mode]["entropy"].append(self._global_masked_mean(entropies.detach(), mask))
        if train:
            old = inputs.get("old_per_token_logps")
            adv = inputs["advantages"].detach()
            adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(per_token_logps).to(per_token_logps.dtype)
            if is_weights is not None:  # the diagnostics see what the loss saw
                adv = adv * torch.nan_to_num(is_weights.to(adv.dtype), nan=1.0).expand_as(adv)
            self._harness_window.append((
                per_token_logps.detach(),
                per_token_logps.detach() if old is None else old.detach(),
                adv, mask.detach(), None if ref is None else ref.detach(), inputs.get("harness_group"),
                torch.ones(len(per_token_logps), dtype=torch.bool),
            ))
            if self._skips_zero_advantage(micro_batch):
                left_out = self._left_out_rows(model, micro_batch, rows)
                if left_out is not None:
                    self._harness_window.append(left_out)
            self._harness_window_loss += float(loss.detach())
        return loss

    def _global_masked_mean(self, x: Tensor, mask: Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]), reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1.0))

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        out = super().training_step(model, inputs, num_items_in_batch)
        # self._step was advanced by TRL; at the end of an accumulation window (one optimizer step) tag its log.
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._finish_window()
        return out

    def _finish_window(self) -> None:
        """Tag the finished optimizer step's log with its pass (iteration) over the generation batch; after the
        pass's last mini-batch, add the harness diagnostics over the whole pass."""
        gen_every = self.args.steps_per_generation * self.num_iterations
        iteration = ((self._step - 1) % gen_every) // self.args.steps_per_generation + 1
        self._harness_pending = {"harness/iteration": float(iteration)}
        if self._step % self.args.steps_per_generation:
            return  # more mini-batches of this pass to come
        minis = self.args.steps_per_generation // self.args.gradient_accumulation_steps
        rows = self._harness_window
        if not rows:  # no row of this pass trained (every group had equal rewards)
            self._harness_window_loss = 0.0
            return
        width = max(r[0].shape[1] for r in rows)  # one generation batch shares T; pad in case it does not

        def cat(i: int) -> Tensor | None:
            if rows[0][i] is None:
                return None
            return torch.cat([torch.nn.functional.pad(r[i], (0, width - r[i].shape[1])) for r in rows])

        logp, old, adv, mask, ref = (cat(i) for i in range(5))
        groups = None if rows[0][5] is None else torch.cat([r[5].to(logp.device) for r in rows])
        trained = torch.cat([r[6] for r in rows]).to(logp.device)  # EUR: every row; the other statistics: these
        _, diag = policy_loss(logp, old, adv, mask.bool(), ref_logp=ref, groups=groups, trained=trained,
                              **self.harness_loss_kwargs)
        self._harness_pending.update({f"harness/{k}": float(v) for k, v in diag.items()})
        self._harness_pending["harness/loss"] = self._harness_window_loss / minis  # mean over mini-batches
        self._harness_window, self._harness_window_loss = [], 0.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._harness_pending and "train_runtime" not in logs:
            logs.update(self._harness_pending)
            self._harness_pending = {}
        super().log(logs, start_time)


# ----------------------------------------------------------------------------- rewards


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


# ----------------------------------------------------------------------------- config mapping


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _use_cpu(device: str) -> bool:
    if device == "auto":
        return not torch.cuda.is_available()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"backend.device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
        if device != "cuda":
            raise ValueError(f"backend.device={device!r}: TRL places the model itself; use 'cuda' and choose GPUs "
                             "with CUDA_VISIBLE_DEVICES (several GPUs: accelerate launch)")
        return False
    if device == "cpu":
        return True
    raise ValueError(f"backend.device must be auto, cpu or cuda, got {device!r}")


def grpo_config_kwargs(cfg: Any, output_dir: str | Path, *, world_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``trl.GRPOConfig`` for the harness config ``cfg`` (the table in the module
    docstring). Pure: no model, data or GPU is touched."""
    t, g, bk = cfg.train, cfg.gate, cfg.backend
    world = _world_size() if world_size is None else world_size
    per_update = t.micro_batch_size * world
    mini = mini_batch_size(t)
    if mini % per_update:
        raise ValueError(f"train.mini_batch_size={mini} (null: train.rollout_batch_size) must be divisible by "
                         f"train.micro_batch_size x processes = {t.micro_batch_size} x {world}")
    accumulation = mini // per_update
    updates = t.num_iterations * (t.rollout_batch_size // mini)  # optimizer steps per rollout batch
    if t.loss.agg not in TRL_LOSS_TYPE:
        raise ValueError(f"train.loss.agg must be one of {', '.join(TRL_LOSS_TYPE)}, got {t.loss.agg!r}")
    use_cpu = _use_cpu(str(bk.device))
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
        epsilon=float(g.eps_low),
        epsilon_high=float(g.eps_high),
        sapo_temperature_pos=float(g.tau_pos),
        sapo_temperature_neg=float(g.tau_neg),
        reward_weights=None,  # set with the reward functions
        mask_truncated_completions=False,
        disable_dropout=bool(bk.get("disable_dropout", True)),
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


def validate_trl_config(cfg: Any) -> None:
    """Checks on top of the native backend's, before anything is loaded."""
    grpo_config_kwargs(cfg, "unused")
    for key, value in (cfg.backend.get("grpo_config") or {}).items():
        if key in _UNSUPPORTED and value != _UNSUPPORTED[key]:
            raise ValueError(f"backend.grpo_config.{key}={value!r}: acts inside TRL's own loss; not supported with the "
                             f"harness objective (leave it at {_UNSUPPORTED[key]!r})")


# ----------------------------------------------------------------------------- per-step history


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
        if ckpt.is_dir() and state.is_world_process_zero:
            (ckpt / HISTORY_FILE).write_text(json.dumps(self.history))
            write_manifest(ckpt)  # last: transformers has written everything else by now


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """TRL/transformers checkpoints (``checkpoint-<optimizer step>``), oldest first."""
    return list_checkpoints(ckpt_dir, CHECKPOINT_PATTERN)


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
    args = GRPOConfig(**{**grpo_config_kwargs(cfg, ckpt_dir), "reward_weights": weights})

    history: list[dict[str, float]] = []
    # the newest checkpoint that verifies (newer broken ones are named in the log and set aside)
    resume_from = resume_checkpoint(ckpt_dir, CHECKPOINT_PATTERN, CHECKPOINT_REQUIRED) if cfg.get("resume") else None
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

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / K.HISTORY_FILE).write_text(json.dumps(history))
    checkpoints = _checkpoints(ckpt_dir)
    if not checkpoints:
        raise RuntimeError(f"TRL saved no checkpoint under {ckpt_dir}")
    return TrainResult(final_checkpoint=checkpoints[-1], checkpoints=checkpoints, history=history,
                       initial_checkpoint=model_path)
