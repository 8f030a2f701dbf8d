r"""The TRL backend's trainer: :class:`HarnessGRPOTrainer`, TRL's ``GRPOTrainer`` with the harness objective as its
per-token loss.

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

Every optimizer step the trainer adds the harness diagnostics of the pass to TRL's logs as ``harness/<name>``
(:mod:`harness.backends.trl` says over which rows); :mod:`harness.backends.trl_history` turns those logs into the
harness's per-step history.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer

from harness.backends.sampling import eval_no_grad
from harness.backends.trl_config import UNSUPPORTED
from harness.objective import micro_batch_weight, policy_loss

# The multimodal fields TRL hands to its forward: they pass through to the same call untouched.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


# ----------------------------------------------------------------------------- the loss


def _nonzero_rows(advantages: Tensor) -> Tensor:
    """Per row, whether its advantage (one per sequence, or one per token) is anywhere ≠ 0."""
    nonzero = advantages != 0
    return nonzero if advantages.dim() == 1 else nonzero.reshape(advantages.shape[0], -1).any(-1)


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
        for key, neutral in UNSUPPORTED.items():
            if cfg is not None and getattr(cfg, key, neutral) != neutral:
                raise ValueError(f"GRPOConfig.{key}={getattr(cfg, key)!r} acts inside TRL's own loss and is not "
                                 f"supported with the harness objective (leave it at {neutral!r})")
        self.harness_loss_kwargs = dict(loss_kwargs)
        self._harness_window: list[tuple[Tensor, ...]] = []
        self._harness_window_loss = 0.0
        self._harness_pending: dict[str, float] = {}
        # cached: the native backend's sampler on the transformers path; prompt_seeded: the same with a random stream
        # per prompt (prompt_seeds below)
        self.harness_sampler = sampler
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
        also gives the entropy of the distributions the tokens were drawn from; ``sampler="prompt_seeded"`` also gives
        each prompt its own random stream (:meth:`_prompt_seeds`). vLLM, continuous batching, images, tools and
        several EOS tokens keep TRL's own path."""
        G = num_generations
        cached = getattr(self, "harness_sampler", "generate") in ("cached", "prompt_seeded")
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
            seeds = self._prompt_seeds(prompts) if self.harness_sampler == "prompt_seeded" else None
            seqs, entropy, _ = sample_completions(unwrapped, ids, attention, num_generations=G,
                                               max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                               top_p=self.top_p, eos_token_id=eos, pad_token_id=pad,
                                               prompt_seeds=seeds, synced=self._forwards_are_collective())
        completion = seqs[:, width:]
        keep = mask_through_first_eos(completion, eos)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy"].append(self._global_masked_mean(entropy, keep.to(entropy.dtype)))
        self._harness_sampled_entropy = True
        return [c[m].tolist() for c, m in zip(completion.cpu(), keep.cpu(), strict=True)], None

    def _forwards_are_collective(self) -> bool:
        """Whether a generation forward needs every process: FSDP gathers each layer's parameters in it, ZeRO-3 too
        unless TRL gathered them all for generation (``ds3_gather_for_generation``); DDP's forward is local."""
        if self.accelerator.num_processes == 1:
            return False
        if self.is_fsdp_enabled:
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3 and not self.args.ds3_gather_for_generation

    def _prompt_seeds(self, prompts: list) -> list[int]:
        """One seed per prompt of this generation batch: SHA-256 of (run seed, optimizer step, the prompt's token ids,
        how many identical prompts came before it in this process's slice). Every process computes the seed of a
        prompt alike, and a resumed run alike, so the rollouts do not depend on the process count; a prompt drawn
        twice into one batch whose copies land on different processes is the one exception."""
        seen: dict[tuple[int, ...], int] = {}
        seeds = []
        for prompt in prompts:
            key = tuple(int(t) for t in prompt)
            seen[key] = seen.get(key, -1) + 1
            text = f"{self.args.seed}:{self.state.global_step}:{seen[key]}:{','.join(map(str, key))}"
            seeds.append(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1)
        return seeds

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
        nonzero = _nonzero_rows(inputs["advantages"])
        # no row active: all of them (a zero update either way, through the usual forward and backward)
        return None if bool(nonzero.all()) or not bool(nonzero.any()) else nonzero.nonzero().squeeze(-1)

    def _trained_flags(self, inputs: dict[str, Any], rows: Tensor | None, n: int) -> Tensor:
        """Which of the ``n`` rows that went through this micro-batch's forward count as trained in the diagnostics:
        all of them, except where zero-advantage rows are skipped and every row of the micro-batch had A = 0 (then
        none: they went through the forward only because nothing else did). So the statistics are over the rows
        with A ≠ 0 whichever micro-batch, or process, a row lands in."""
        if rows is not None or not self._skips_zero_advantage(inputs):
            return torch.ones(n, dtype=torch.bool)
        return torch.full((n,), bool(_nonzero_rows(inputs["advantages"]).any()), dtype=torch.bool)

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
        # DDP averages the processes' gradients: weighing against every process's window, times N, makes the sum
        # the aggregate over the whole optimizer step (token-mean's token count differs between processes)
        processes = self.accelerator.num_processes
        return processes * micro_batch_weight(mask, self._gather_rows(window), agg)

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """``rows`` of every process, stacked in rank order (2-D tensors padded with 0 to the widest): the whole
        optimizer step or pass rather than this process's share. Every process must call it at the same point."""
        if self.accelerator.num_processes == 1:
            return rows
        if rows.dtype == torch.bool:  # collectives move numbers
            return self._gather_rows(rows.to(torch.uint8)).bool()
        if rows.dim() == 2:
            rows = self.accelerator.pad_across_processes(rows, dim=1)
        return self.accelerator.gather(rows)

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
                self._trained_flags(micro_batch, rows, len(per_token_logps)),
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
        if not rows:  # no micro-batch reached the loss; in training every process computes one for each of its
            # micro-batches (all-zero-advantage ones too), so all processes agree and none waits in the gather
            self._harness_window_loss = 0.0
            return
        width = max(r[0].shape[1] for r in rows)  # one generation batch shares T; pad in case it does not

        def cat(i: int) -> Tensor | None:
            if rows[0][i] is None:
                return None
            return torch.cat([torch.nn.functional.pad(r[i], (0, width - r[i].shape[1])) for r in rows])

        # the diagnostics and the loss of the whole pass: every process's rows (only rank 0 logs them)
        gather = self._gather_rows
        logp, old, adv, mask, ref = (None if x is None else gather(x) for x in (cat(i) for i in range(5)))
        groups = None if rows[0][5] is None else gather(torch.cat([r[5].to(logp.device) for r in rows]))
        # EUR: every row; the other statistics: these
        trained = gather(torch.cat([r[6] for r in rows]).to(logp.device))
        _, diag = policy_loss(logp, old, adv, mask.bool(), ref_logp=ref, groups=groups, trained=trained,
                              **self.harness_loss_kwargs)
        self._harness_pending.update({f"harness/{k}": float(v) for k, v in diag.items()})
        loss = torch.tensor(self._harness_window_loss / minis, device=logp.device)  # mean over mini-batches
        self._harness_pending["harness/loss"] = float(self.accelerator.reduce(loss, reduction="mean"))
        self._harness_window, self._harness_window_loss = [], 0.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._harness_pending and "train_runtime" not in logs:
            logs.update(self._harness_pending)
            self._harness_pending = {}
        super().log(logs, start_time)
