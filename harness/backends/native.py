"""The native backend: a GRPO/SAPO loop in plain PyTorch over any Hugging Face causal LM.

One rollout batch per step, read top to bottom in :func:`train`:

1. take ``rollout_batch_size / num_generations`` prompts from the task's train split (a seeded
   shuffle per epoch, so step s always sees the same prompts, which makes resume exact);
2. sample ``num_generations`` completions per prompt at the rollout temperature;
3. reward = format_weight·format + accuracy_weight·[the <answer> span equals the gold, by
   :func:`harness.scoring.score`] (+ extra reward functions), with the paper's graded format reward
   (:func:`harness.scoring.format_reward`: 1 / 0.5 / 0.25 / 0) or the 0/1 exact template (``train.rewards.format``);
4. group advantages A_i = (R_i − mean_g R) / (std_g R + eps) (``grpo``) or R_i − mean_g R
   (``drgrpo``);
5. behaviour log-probs log π_old are taken ONCE (for the first mini-batch by its first update's own forward pass;
   for later mini-batches by a no-grad pass before any update); then ``num_iterations`` passes
   over the same batch, each in mini-batches of ``mini_batch_size`` completions (one optimizer step each),
   each accumulating gradients over micro-batches. Once the weights have moved, r = π_θ/π_old ≠ 1 and the
   gate decides how far off-policy tokens count. Groups with all-zero advantages are left out of the passes
   (they add exactly 0 to the loss and gradient);
6. diagnostics per pass (:func:`harness.objective.policy_loss`): the ratio statistics over the rows that trained, the
   EUR (arXiv 2602.19345 eq. 12) over every prompt of the step, zero-variance groups included, also on a step where
   every group has zero variance (``train/no_signal``; then EUR is the only diagnostic). The rows left out of the
   passes still have ratios: their log-probs come from no-grad forwards (each distinct completion once) at the
   behaviour weights and at the weights their mini-batch's update saw; none where those are the behaviour weights
   (the first optimizer step on the batch: r = 1, f'(1) = 1), none at all with one optimizer step per batch.

Off-policy regimes (docs/off-policy.md): with ``train.staleness`` k > 0 the rollouts of step s come from a queue
filled k steps ahead (:class:`RolloutBatch`, drawn by the weights of step s − k and saved in checkpoints), and with
``train.rollout_dtype`` they are sampled in another precision. Then the sampler's own log-probs are the behaviour
policy π_b: the gate sees π_θ/π_b (``train.loss.off_policy.mode=none``), or π_θ/π_old with the importance weights
π_old/π_b of a correction, π_old taken as in step 5.

The loss is :func:`harness.objective.policy_loss` — the same function every backend calls. The sampler and the
per-token log-probs live in :mod:`harness.backends.sampling`, checkpoints in :mod:`harness.backends.checkpoints`,
and every metric name in :mod:`harness.keys`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness import keys as K
from harness.backends import StepCallback, TrainResult
from harness.backends.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_state,
    preflight,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from harness.backends.common import check_cuda, fit_prompts, mini_batch_size, start_training
from harness.backends.sampling import (
    distinct_rows_logprobs,
    eval_no_grad,
    logprobs_of_logits,
    mask_through_first_eos,
    rows_logprobs,
    sample_completions,
    tempered_entropy,
)
from harness.config import to_plain
from harness.models import load_model_and_tokenizer, torch_dtype
from harness.objective import loss_kwargs, micro_batch_weight, policy_loss
from harness.prompts import render_prompt
from harness.rewards import reward_spec, rollout_rewards
from harness.schedule import schedule_from_config

# ----------------------------------------------------------------------------- pieces of a step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_cuda(name)
    return torch.device(name)


def prompts_for_step(n_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the problems used at ``step``: consecutive slices of a seeded per-epoch shuffle."""
    out = []
    start = step * per_step
    for pos in range(start, start + per_step):
        epoch, idx = divmod(pos, n_problems)
        order = np.random.default_rng([seed, epoch]).permutation(n_problems)
        out.append(int(order[idx]))
    return out


def group_advantages(rewards: Tensor, group_size: int, mode: str, eps: float) -> tuple[Tensor, int]:
    """Per-rollout advantages and the number of zero-variance groups (their advantages are 0)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, unbiased=False, keepdim=True)
    zero_var = int((std.squeeze(-1) < 1e-8).sum())
    adv = centred / (std + eps) if mode == "grpo" else centred
    return adv.reshape(-1), zero_var


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at 0-based ``step``: linear warmup over ``warmup`` steps, then ``constant``, half a ``cosine``
    or a ``linear`` decay, the decays reaching 0 after the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rows_in_place(n_rows: int, parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """One ``(n_rows, ...)`` tensor from ``(row indices, values)`` pieces that together cover every row once."""
    out = parts[0][1].new_empty((n_rows, *parts[0][1].shape[1:]))
    for index, v in parts:
        out[index.to(out.device)] = v
    return out


@dataclass
class RolloutBatch:
    """One step's rollouts as the sampler delivered them: what the staleness queue (and a checkpoint) holds."""

    step: int  # the 0-based step that trains on it
    drawn_at: int  # the step whose weights drew it (step - drawn_at is the policy lag)
    prompt_mask: Tensor  # (P, Lp) attention mask of the left-padded prompts
    seqs: Tensor  # (P·G, Lp + T) prompt and completion ids, a prompt's G rows consecutive
    completion_mask: Tensor  # (P·G, T) the tokens up to and including the first EOS
    truncated: Tensor  # (P·G,) no EOS within max_new_tokens
    token_entropy: Tensor  # (P·G, T) entropy of the distribution each token was drawn from
    rewards: Tensor  # (P·G,) total reward, and its format and accuracy parts
    reward_format: Tensor
    reward_accuracy: Tensor
    behaviour_logp: Tensor | None  # (P·G, T) the sampler's log-probs of its tokens; None: the trainer's are used

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor)
                               else getattr(self, f.name) for f in fields(self)})


def draw_rollouts(model: torch.nn.Module, tokenizer: Any, batch: list[dict], *, step: int, drawn_at: int, t: Any,
                  sampler: str, prompt_cfg: Any, rewards_of: Any, device: torch.device,
                  with_logprobs: bool) -> RolloutBatch:
    """Sample ``num_generations`` completions per problem of ``batch`` with ``model`` as it is now (call it under
    the sampling autocast) and score them: steps 2-3 of the module docstring."""
    G = t.num_generations
    prompts = [render_prompt(tokenizer, p["problem"], prompt_cfg) for p in batch]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    model.eval()
    with torch.no_grad():
        if sampler == "cached":
            seqs, token_entropy, behaviour_logp = sample_completions(
                model, enc.input_ids, enc.attention_mask, num_generations=G, max_new_tokens=t.max_new_tokens,
                temperature=t.rollout_temperature, top_p=t.top_p, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, with_logprobs=with_logprobs)
        else:
            out = model.generate(
                **enc, do_sample=True, temperature=t.rollout_temperature, top_p=t.top_p, top_k=0,
                max_new_tokens=t.max_new_tokens, num_return_sequences=G, output_logits=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            seqs = out.sequences
            logits = torch.stack(out.logits, dim=1)
            token_entropy = tempered_entropy(logits, t.rollout_temperature)
            behaviour_logp = (logprobs_of_logits(logits, seqs[:, enc.input_ids.shape[1]:], t.rollout_temperature)
                              if with_logprobs else None)
    completion_ids = seqs[:, enc.input_ids.shape[1]:]
    completion_mask = mask_through_first_eos(completion_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(~completion_mask, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    golds = [p["answer"] for p in batch for _ in range(G)]
    scored = rollout_rewards(texts, golds, [p for p in batch for _ in range(G)], rewards_of)
    rewards, fmt, acc = (torch.tensor(v) for v in (scored.total, scored.format, scored.accuracy))
    return RolloutBatch(step=step, drawn_at=drawn_at, prompt_mask=enc.attention_mask, seqs=seqs,
                        completion_mask=completion_mask,
                        truncated=~(completion_ids == tokenizer.eos_token_id).any(-1), token_entropy=token_entropy,
                        rewards=rewards, reward_format=fmt, reward_accuracy=acc,
                        behaviour_logp=None if behaviour_logp is None else behaviour_logp.float())


# ----------------------------------------------------------------------------- the loop


def train(cfg: Any, on_step: StepCallback | None = None) -> TrainResult:
    """Run GRPO/SAPO with the configured gate; see the module docstring."""
    problems, model_path, prompt_cfg = start_training(cfg)
    t, bk = cfg.train, cfg.backend
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = pick_device(bk.device)
    use_bf16 = bool(bk.get("bf16", True)) and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    start_step, history, checkpoints = 0, [], []
    queue: list[RolloutBatch] = []  # rollout batches drawn ahead of the step that trains on them (train.staleness)
    # the newest checkpoint that verifies against its manifest (newer broken ones are named in the log, set aside)
    resume_from = resume_checkpoint(ckpt_dir) if cfg.get("resume") else None
    # float32 master weights whatever the checkpoint stores (transformers 5 loads Qwen2.5 in bf16): AdamW on bf16
    # weights rounds updates of lr ~1e-6 away; bf16 compute comes from the autocast below.
    model, tokenizer = load_model_and_tokenizer(
        {**to_plain(cfg.model), "path": str(resume_from or model_path)}, device=device, dtype="float32",
        cache_dir=cfg.get("cache_dir"))
    tokenizer.padding_side = "left"
    problems = fit_prompts(problems, tokenizer, prompt_cfg, t.get("max_prompt_tokens"))
    ref_model = None
    if t.loss.kl_beta > 0:
        ref_model, _ = load_model_and_tokenizer({**to_plain(cfg.model), "path": model_path}, device=device)
        ref_model.eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=float(t.get("adam_eps", 1e-8)),
                                  weight_decay=t.weight_decay)
    if resume_from is not None:
        state = load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, history = state["step"], state["history"]
        queue = [RolloutBatch(**b).to(device) for b in state.get("rollout_queue", [])]
        checkpoints = [p for p in list_checkpoints(ckpt_dir) if p <= resume_from]
    rewards_of = reward_spec(t.rewards)
    save_dtype = torch_dtype(t.get("save_dtype"))
    keep = t.get("keep_checkpoints")
    n_saves = len({min(s, t.steps) for s in range(t.save_every, t.steps + t.save_every, t.save_every)})
    preflight(model, ckpt_dir, n_saves=n_saves, keep=keep, save_dtype=save_dtype)  # before any step, not after
    base_loss_kw = loss_kwargs(cfg)
    schedule = schedule_from_config(cfg)  # τ per step: constant, linear/cosine, or the EUR controller
    eur_key = K.pass_key(t.num_iterations, K.EUR)
    schedule.replay(history, eur_key, K.TAU_POS)  # a resumed run's controller continues where it was
    per_step = t.rollout_batch_size // t.num_generations
    G = t.num_generations
    mini_size = mini_batch_size(t)
    sampler = bk.get("sampler", "cached")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    # Off-policy regimes (docs/off-policy.md): rollouts drawn `staleness` steps ahead, and/or sampled in another
    # precision than the trainer's. Then the sampler's own log-probs are the behaviour policy π_b; otherwise the
    # sampler is the trainer at the start of the step and its log-probs are taken by the trainer as before.
    staleness = int(t.get("staleness", 0))
    rollout_dtype = torch_dtype(t.get("rollout_dtype"))
    rollout_autocast = (torch.autocast(device.type, dtype=rollout_dtype) if rollout_dtype is not None else autocast)
    off_policy = t.loss.off_policy.mode
    measure_behaviour = staleness > 0 or rollout_dtype is not None or off_policy != "none"

    def draw(for_step: int, drawn_at: int) -> RolloutBatch:
        batch = [problems[i] for i in prompts_for_step(len(problems), for_step, per_step, cfg.seed)]
        return draw_rollouts(model, tokenizer, batch, step=for_step, drawn_at=drawn_at, t=t, sampler=sampler,
                             prompt_cfg=prompt_cfg, rewards_of=rewards_of, device=device,
                             with_logprobs=measure_behaviour)

    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=start_step, desc=f"train {cfg.gate.name}", disable=not bk.get("progress", True))

    for step in range(start_step, t.steps):
        t0 = time.perf_counter()
        lr = t.lr * lr_factor(step, t.steps, t.warmup_steps, t.lr_schedule)
        tau_pos, tau_neg = schedule.taus(step)
        loss_kw = {**base_loss_kw, "tau_pos": tau_pos, "tau_neg": tau_neg}
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1-3. prompts, rollouts and rewards: drawn `staleness` steps ahead by the weights of that time -----------
        # An asynchronous rollout worker k batches ahead: at step s the queue holds the batches of steps s..s+k,
        # the one for s+k drawn now by the current weights (at the first step, all k+1 by the initial weights).
        # With k = 0 this is the synchronous loop: draw step s's batch, train on it.
        while not queue or queue[-1].step < step + staleness:
            next_step = queue[-1].step + 1 if queue else step
            with rollout_autocast:
                queue.append(draw(next_step, drawn_at=step))
        rollout = queue.pop(0)
        assert rollout.step == step, (rollout.step, step)
        enc_mask, seqs, completion_mask = rollout.prompt_mask, rollout.seqs, rollout.completion_mask
        rewards, behaviour_logp = rollout.rewards, rollout.behaviour_logp

        # 4. advantages ------------------------------------------------------------------------------
        advantages, zero_var = group_advantages(rewards, G, t.advantage, t.adv_eps)
        advantages = advantages.to(device)

        # 5. behaviour log-probs once, then num_iterations passes over the batch ----------------------------
        # Each pass walks the batch in mini-batches (one optimizer step each), each accumulated over micro-batches.
        # Groups whose advantages are all 0 (zero reward variance) add exactly 0 to every gate's loss and gradient,
        # so without a KL term they are left out of the forward/backward passes (backend.skip_zero_advantage); the
        # aggregation still divides by the whole mini-batch, so the update is the one over all rows.
        attn = torch.cat([enc_mask.repeat_interleave(G, 0), completion_mask.long()], dim=1)
        n_comp = completion_mask.shape[1]
        n_rows = seqs.shape[0]
        active_group = advantages.view(-1, G).ne(0).any(-1)
        # No signal: every group's rewards are equal, so every advantage is 0 and, without a KL term, every gradient
        # is exactly 0. The passes are skipped (counted as train/no_signal) but their optimizer steps are taken with
        # zero gradients, so AdamW's moments and the weights move exactly as they would have.
        no_signal = ref_model is None and not bool(active_group.any())
        if ref_model is not None or not bk.get("skip_zero_advantage", True):
            active_group = torch.ones_like(active_group)
        active_row = active_group.repeat_interleave(G).cpu()
        minis = [torch.arange(i, i + mini_size) for i in range(0, n_rows, mini_size)]
        # row indices of each micro-batch of each mini-batch (active rows only, whole groups, in order)
        micros = [[c for c in torch.split(m[active_row[m]], t.micro_batch_size) if len(c)] for m in minis]
        rows = torch.cat([s for m in micros for s in m] or [torch.zeros(0, dtype=torch.long)])  # rows that train
        # Rows left out of the passes (whole groups), per mini-batch: no update needs them, but eq. 12's EUR averages
        # over every prompt of the step, so their ratios are measured where their mini-batch's update would have
        # seen them. With one optimizer step per batch nothing moves before it, r = 1: no forward at all.
        idle = [m[~active_row[m]] for m in minis]
        idle_rows = torch.cat(idle)
        # Without a correction, the gate of rollouts from another policy sees π_θ/π_b with the sampler's log-probs:
        # every row's denominator is known before any forward, and no ratio is 1 even at the first update.
        gate_on_sampler = behaviour_logp is not None and off_policy == "none"
        measure_idle = len(idle_rows) > 0 and (len(minis) > 1 or t.num_iterations > 1 or gate_on_sampler)
        # Each prompt's forward is shared by its G completions when micro-batches hold whole groups.
        share = G if bk.get("share_prompt", True) and t.micro_batch_size % G == 0 else 1

        logprobs_of = partial(rows_logprobs, seqs=seqs, attn=attn, n_completion=n_comp,
                              temperature=t.rollout_temperature, group_size=share)
        measured_logprobs_of = partial(distinct_rows_logprobs, seqs=seqs, attn=attn, n_completion=n_comp,
                                       temperature=t.rollout_temperature, max_rows=t.micro_batch_size)

        old_logp: Tensor | None = behaviour_logp[rows] if gate_on_sampler else None
        ref_logp = None
        no_logp = completion_mask.new_zeros((0, n_comp), dtype=torch.float32)
        # The first mini-batch's behaviour log-probs are its first update's own forward, detached: the parameters do
        # not change before its optimizer step, so a separate pass would compute the same numbers. The rows that
        # train in later mini-batches (which run after optimizer steps), and the rows left out whose ratios are
        # measured, get theirs now, in one no-grad pass (each distinct row once).
        later_rows = torch.cat([s for m in micros[1:] for s in m] or [rows[:0]])
        behaviour_rows = torch.cat([later_rows, idle_rows if measure_idle else idle_rows[:0]])
        later_old, idle_old = no_logp, completion_mask.new_zeros((len(idle_rows), n_comp), dtype=torch.float32)
        if gate_on_sampler:
            assert behaviour_logp is not None
            behaviour_rows, idle_old = behaviour_rows[:0], behaviour_logp[idle_rows]
        with torch.no_grad(), autocast:
            if ref_model is not None:
                ref_logp = torch.cat([logprobs_of(ref_model, s) for m in micros for s in m])
            if len(behaviour_rows):
                behaviour = measured_logprobs_of(model, behaviour_rows)
                later_old = behaviour[:len(later_rows)]
                if measure_idle:
                    idle_old = behaviour[len(later_rows):]
        idle_old_of = torch.split(idle_old, [len(m) for m in idle])  # per mini-batch

        model.train()
        metrics: dict[str, float] = {}
        for it in range(t.num_iterations):
            logps, idle_logps, loss_total, grad_norms, offset = [], [], 0.0, [], 0
            for j, (mini, mini_micros) in enumerate(zip(minis, micros, strict=True)):
                optimizer.zero_grad(set_to_none=False)  # zeros: a mini-batch without active rows steps as with all rows
                mini_mask = completion_mask[mini]
                for s in mini_micros:
                    k = slice(offset, offset + len(s))  # these rows' place in `rows` (and old_logp / ref_logp)
                    offset += len(s)
                    with autocast:
                        logp = logprobs_of(model, s)
                        behaviour = logp.detach() if old_logp is None else old_logp[k]
                        loss, _ = policy_loss(logp, behaviour, advantages[s], completion_mask[s],
                                              ref_logp=None if ref_logp is None else ref_logp[k],
                                              behaviour_logp=None if behaviour_logp is None else behaviour_logp[s],
                                              diagnostics=False, **loss_kw)
                    weight = micro_batch_weight(completion_mask[s], mini_mask, t.loss.agg)
                    (loss * weight).backward()
                    loss_total += float(loss.detach()) * weight / len(minis)
                    logps.append(logp.detach())
                # at (0, 0) the weights are still the ones the idle rows' denominators were taken at (unless those
                # came from the sampler)
                if measure_idle and len(idle[j]) and ((it, j) != (0, 0) or gate_on_sampler):
                    with eval_no_grad(model), autocast:  # as the behaviour pass: no dropout, no random numbers
                        idle_logps.append(measured_logprobs_of(model, idle[j]))
                else:
                    idle_logps.append(idle_old_of[j])
                if old_logp is None and len(minis) > 1:  # after the first mini-batch: π_old of every row that trains
                    old_logp = torch.cat([*logps, later_old])
                for p in model.parameters():  # before the first backward of a run, gradients are None
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"non-finite gradient norm at step {step}, update {it + 1}")
                optimizer.step()
                grad_norms.append(float(grad_norm))
            trained_logp = torch.cat(logps) if logps else no_logp
            if old_logp is None:
                old_logp = trained_logp
            # Diagnostics of this pass, each token's ratio as its update saw it: the ratio statistics over the rows
            # that trained, EUR over every row (eq. 12 averages over every prompt of the step).
            every_logp = rows_in_place(n_rows, [(rows, trained_logp), (idle_rows, torch.cat(idle_logps))])
            every_old = rows_in_place(n_rows, [(rows, old_logp), (idle_rows, idle_old)])
            _, diag = policy_loss(every_logp, every_old, advantages, completion_mask, ref_logp=ref_logp,
                                  groups=torch.arange(n_rows, device=device) // G, trained=active_row.to(device),
                                  behaviour_logp=behaviour_logp, **loss_kw)
            metrics.update({K.pass_key(it + 1, k): v for k, v in diag.items()})
            metrics[K.pass_key(it + 1, K.PASS_LOSS)] = loss_total
            metrics[K.pass_key(it + 1, K.PASS_GRAD_NORM)] = sum(grad_norms) / len(grad_norms)
        last_pass = t.num_iterations
        if not math.isfinite(metrics[K.pass_key(last_pass, K.PASS_LOSS)]):
            raise FloatingPointError(f"NaN/inf loss at step {step}")

        lengths = completion_mask.sum(-1).float()
        metrics.update({
            K.STEP: float(step + 1),
            K.REWARD: float(rewards.mean()),
            K.REWARD_STD: float(rewards.std(unbiased=False)),
            K.REWARD_FORMAT: float(rollout.reward_format.mean()),
            K.REWARD_ACCURACY: float(rollout.reward_accuracy.mean()),
            K.RESPONSE_LENGTH: float(lengths.mean()),
            K.TRUNCATION_RATE: float(rollout.truncated.float().mean()),
            K.ENTROPY: float((rollout.token_entropy * completion_mask).sum() / completion_mask.sum()),
            K.TRAINED_FRAC: len(rows) / n_rows,
            K.ZERO_VAR_GROUPS: float(zero_var),
            K.ZERO_VAR_FRAC: zero_var / per_step,
            K.NO_SIGNAL: float(no_signal),
            K.REWARD_ZERO_FRAC: float((rewards == 0).float().mean()),
            K.LR: lr,
            K.LOSS: metrics[K.pass_key(last_pass, K.PASS_LOSS)],
            K.TAU_POS: tau_pos,
            K.TAU_NEG: tau_neg,
            K.GRAD_NORM: metrics[K.pass_key(last_pass, K.PASS_GRAD_NORM)],
            K.STEP_TIME_S: time.perf_counter() - t0,
            K.TOKENS: float(completion_mask.sum() + enc_mask.sum() * G),
        })
        if measure_behaviour:  # a synchronous run's history keeps its keys
            metrics[K.POLICY_LAG] = float(step - rollout.drawn_at)
        history.append(metrics)
        schedule.observe(metrics.get(eur_key, math.nan))
        bar.set_postfix(reward=f"{metrics[K.REWARD]:.3f}", acc=f"{metrics[K.REWARD_ACCURACY]:.3f}")
        bar.update(1)
        if on_step is not None:
            on_step(step + 1, metrics)
        if (step + 1) % t.save_every == 0 or step + 1 == t.steps:
            save_checkpoint(ckpt_dir / f"step-{step + 1:06d}", model, tokenizer, optimizer, step + 1, history,
                            save_dtype=save_dtype,
                            extra={"rollout_queue": [vars(b.to(torch.device("cpu"))) for b in queue]})
            checkpoints = prune_checkpoints(ckpt_dir, keep)
    bar.close()
    (out_dir / K.HISTORY_FILE).write_text(json.dumps(history))
    final = latest_checkpoint(ckpt_dir)
    assert final is not None
    return TrainResult(final_checkpoint=final, checkpoints=checkpoints, history=history,
                       initial_checkpoint=model_path)
