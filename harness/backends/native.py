"""The native backend: a GRPO/SAPO loop in plain PyTorch over any Hugging Face causal LM.

One rollout batch per step, read top to bottom in :func:`train`:

1. take ``rollout_batch_size / num_generations`` prompts from the task's train split (a seeded
   shuffle per epoch, so step s always sees the same prompts, which makes resume exact);
2. sample ``num_generations`` completions per prompt at the rollout temperature;
3. reward = format_weight·[follows <think>…</think> <answer>…</answer>]
   + accuracy_weight·[the <answer> span equals the gold, by :func:`harness.scoring.score`]
   (+ extra reward functions);
4. group advantages A_i = (R_i − mean_g R) / (std_g R + eps) (``grpo``) or R_i − mean_g R
   (``drgrpo``);
5. behaviour log-probs log π_old are taken ONCE (by the first update's own forward pass when a pass is one
   optimizer step; by a no-grad pass before any update when it is several); then ``num_iterations`` passes
   over the same batch, each in mini-batches of ``mini_batch_size`` completions (one optimizer step each),
   each accumulating gradients over micro-batches. Once the weights have moved, r = π_θ/π_old ≠ 1 and the
   gate decides how far off-policy tokens count. Groups with all-zero advantages are left out of the passes
   (they add exactly 0 to the loss and gradient).

The loss is :func:`harness.objective.policy_loss` — the same function every backend calls.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.backends import StepCallback, TrainResult
from harness.data import load_task, resolve_data_dir
from harness.gates import get_gate
from harness.models import load_model_and_tokenizer, model_prompt_config, resolve_model_path
from harness.objective import micro_batch_weight, policy_loss
from harness.prompts import render_prompt
from harness.scoring import has_format, score_batch

STATE_FILE = "trainer_state.pt"
ADVANTAGE_MODES = ("grpo", "drgrpo")
LR_SCHEDULES = ("cosine", "constant")
SAMPLERS = ("cached", "generate")


# ----------------------------------------------------------------------------- config checks


def validate_train_config(cfg: Any) -> None:
    """Every check that can fail before compute starts, with the key and the allowed values."""
    t = cfg.train
    for key in ("steps", "rollout_batch_size", "num_generations", "micro_batch_size", "num_iterations",
                "max_new_tokens"):
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
    # Fails on an unknown gate / bad tau / bad eps / bad agg before any model is loaded.
    g = cfg.gate
    get_gate(g.name, eps_low=g.eps_low, eps_high=g.eps_high)
    dummy = torch.zeros(1, 2)
    policy_loss(dummy, dummy, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), **_loss_kwargs(cfg), diagnostics=False)
    for extra in t.rewards.extra or []:
        _import_reward(extra.path)


def mini_batch_size(t: Any) -> int:
    """Completions per optimizer step: ``train.mini_batch_size``, capped at the rollout batch (null: the whole
    rollout batch, one optimizer step per pass)."""
    return min(int(t.get("mini_batch_size") or t.rollout_batch_size), int(t.rollout_batch_size))


def _loss_kwargs(cfg: Any) -> dict[str, Any]:
    g, loss = cfg.gate, cfg.train.loss
    return dict(gate=g.name, tau_pos=g.tau_pos, tau_neg=g.tau_neg, width=g.width, eps_low=g.eps_low,
                eps_high=g.eps_high, ratio_level=loss.ratio_level, agg=loss.agg, kl_beta=loss.kl_beta,
                log_ratio_clip=loss.log_ratio_clip, norm_length=loss.norm_length)


def _import_reward(path: str) -> Callable[..., Sequence[float]]:
    from harness.gates import _import

    fn = _import(path)
    if not callable(fn):
        raise ValueError(f"train.rewards.extra: {path!r} is not callable")
    return fn


# ----------------------------------------------------------------------------- pieces of a step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"backend.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
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


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, n_completion: int,
                   temperature: float, with_entropy: bool = False,
                   group_size: int = 1) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the last ``n_completion`` tokens of each row under ``model`` (logits / temperature,
    matching the sampling distribution), and optionally the per-token entropy.

    ``group_size`` G > 1 says that consecutive runs of G rows share one prompt (the first
    ``L − n_completion`` tokens): each prompt then goes through the model once, and its keys/values are
    repeated for the G completions (gradients flow back through the repeat). Same numbers as G = 1 up to
    float rounding, with the prompt's share of the compute divided by G."""
    n_prompt = input_ids.shape[1] - n_completion
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if group_size > 1 and n_prompt > 0:
        prompt = model(input_ids=input_ids[::group_size, :n_prompt],
                       attention_mask=attention_mask[::group_size, :n_prompt],
                       position_ids=position_ids[::group_size, :n_prompt], use_cache=True)
        kv_cache = prompt.past_key_values
        kv_cache.batch_repeat_interleave(group_size)  # repeat_interleave per layer: differentiable
        rest = model(input_ids=input_ids[:, n_prompt:], attention_mask=attention_mask,
                     position_ids=position_ids[:, n_prompt:], past_key_values=kv_cache).logits
        # the first completion token is predicted by the prompt's last position
        logits = torch.cat([prompt.logits[:, -1:].repeat_interleave(group_size, 0), rest[:, :-1]], dim=1)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits[:, -n_completion - 1 : -1]
    logits = logits.float() / temperature
    targets = input_ids[:, -n_completion:]
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = tempered_entropy(logits, 1.0) if with_entropy else None  # logits are already tempered
    return logp, entropy


@cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer over a buffer allocated once: ``update`` writes the new positions in place and returns
        views of the filled part (same values as concatenation)."""

        def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
            super().__init__()
            b, h, n, d = keys.shape
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._keys = keys.new_empty(b, h, capacity, d)
            self._values = values.new_empty(b, h, capacity, d)
            self._keys[:, :, :n], self._values[:, :, :n] = keys, values
            self._length = n
            self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            n, m = self._length, key_states.shape[-2]
            self._keys[:, :, n:n + m] = key_states
            self._values[:, :, n:n + m] = value_states
            self._length = n + m
            self.keys, self.values = self._keys[:, :, :n + m], self._values[:, :, :n + m]
            return self.keys, self.values

    return ReservedLayer


def sample_completions(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, num_generations: int,
                       max_new_tokens: int, temperature: float, top_p: float, eos_token_id: int,
                       pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``num_generations`` sampled completions per (left-padded) prompt, as ``[B·G, P + T]`` token ids with
    the G rows of a prompt consecutive (the layout of ``generate(num_return_sequences=G)``), and the ``[B·G, T]``
    entropies of the tempered distributions (softmax(logits / temperature), before top-p) each token was drawn from.

    Each prompt is prefilled once and its KV cache repeated G times, then all B·G rows decode together;
    a row that has emitted EOS is padded with ``pad_token_id`` from then on, and decoding stops once every row
    has ended. Token t is drawn from softmax(logits / temperature), restricted to the smallest set of tokens
    whose probability reaches ``top_p`` (top_p = 1: the full distribution; no top-k). This is the same
    distribution as ``model.generate(do_sample=True, top_k=0, ...)``; what it saves is generate's G-fold prompt
    prefill and its per-token bookkeeping, which dominate on small models (``benchmarks/bench_trainer.py``)."""
    G = num_generations
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    kv_cache = out.past_key_values
    kv_cache.batch_repeat_interleave(G)
    _reserve_cache(kv_cache, max_new_tokens)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    mask = attention_mask.repeat_interleave(G, 0)
    next_position = position_ids[:, -1:].repeat_interleave(G, 0) + 1
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens, entropies = [], []
    for t in range(max_new_tokens):
        entropies.append(tempered_entropy(logits, temperature))
        token = _sample_token(logits, temperature, top_p).masked_fill(done, pad_token_id)
        tokens.append(token)
        done = done | (token == eos_token_id)
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                       past_key_values=kv_cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    seqs = torch.cat([input_ids.repeat_interleave(G, 0), torch.stack(tokens, dim=1)], dim=1)
    return seqs, torch.stack(entropies, dim=1)


def tempered_entropy(logits: Tensor, temperature: float) -> Tensor:
    """H(softmax(z)) = logsumexp(z) − Σ softmax(z)·z over the last axis, with z = logits / temperature."""
    with torch.no_grad():
        z = logits.float() / temperature
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def _reserve_cache(kv_cache: Any, extra: int) -> None:
    """Give every plain (non-sliding) layer of a transformers DynamicCache room for ``extra`` more positions, so
    decoding writes each new key/value in place. DynamicLayer concatenates instead, copying the whole cache at
    every token (O(L²) copies): on the tiny model, 16 prompts × 8 rollouts × 24 tokens took 0.29 s with this and
    0.35 s without (median of 15 interleaved runs, 2 threads)."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(kv_cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            kv_cache.layers[i] = _reserved_layer_class()(layer.keys, layer.values, layer.keys.shape[-2] + extra)


def _sample_token(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """One token per row from softmax(logits / temperature), nucleus-truncated at ``top_p``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (so the top token is always kept)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def _rows_logprobs(model: torch.nn.Module, rows: Tensor, *, seqs: Tensor, attn: Tensor, n_completion: int,
                   temperature: float, group_size: int) -> Tensor:
    """:func:`token_logprobs` of the given rows of a rollout batch."""
    return token_logprobs(model, seqs[rows], attn[rows], n_completion, temperature, group_size=group_size)[0]


def mask_through_first_eos(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """True for the tokens of each completion up to and including its first EOS."""
    is_eos = completion_ids == eos_token_id
    return (is_eos.cumsum(-1) - is_eos.long()) == 0


def group_advantages(rewards: Tensor, group_size: int, mode: str, eps: float) -> tuple[Tensor, int]:
    """Per-rollout advantages and the number of zero-variance groups (their advantages are 0)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, unbiased=False, keepdim=True)
    zero_var = int((std.squeeze(-1) < 1e-8).sum())
    adv = centred / (std + eps) if mode == "grpo" else centred
    return adv.reshape(-1), zero_var


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, tokenizer, optimizer, step: int, history: list[dict[str, float]]) -> Path:
    """HF-format weights + tokenizer, plus optimizer/RNG/history so training can resume exactly.
    Written to a temporary directory and renamed, so a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(), "history": history},
               tmp / STATE_FILE)
    tmp.rename(path)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


# ----------------------------------------------------------------------------- the loop


def train(cfg: Any, on_step: StepCallback | None = None) -> TrainResult:
    """Run GRPO/SAPO with the configured gate; see the module docstring."""
    validate_train_config(cfg)
    t, bk = cfg.train, cfg.backend
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    data_dir = resolve_data_dir(cfg.get("data_dir"))
    problems = load_task(cfg.task, "train", data_dir=data_dir, seed=cfg.seed)  # errors before the model loads
    if not problems:
        raise ValueError(f"task {cfg.task.name!r} has no training problems")
    model_path = resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
    prompt_cfg = model_prompt_config(cfg.model)

    if bk.get("threads"):
        torch.set_num_threads(int(bk.threads))
    device = pick_device(bk.device)
    use_bf16 = bool(bk.get("bf16", True)) and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    start_step, history, checkpoints = 0, [], []
    resume_from = latest_checkpoint(ckpt_dir) if cfg.get("resume") else None
    model, tokenizer = load_model_and_tokenizer(
        {**_plain(cfg.model), "path": str(resume_from or model_path)}, device=device, cache_dir=cfg.get("cache_dir"))
    tokenizer.padding_side = "left"
    ref_model = None
    if t.loss.kl_beta > 0:
        ref_model, _ = load_model_and_tokenizer({**_plain(cfg.model), "path": model_path}, device=device)
        ref_model.eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_step, history = state["step"], state["history"]
        checkpoints = sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())
    extra_rewards = [(_import_reward(e.path), float(e.weight)) for e in (t.rewards.extra or [])]
    loss_kwargs = _loss_kwargs(cfg)
    per_step = t.rollout_batch_size // t.num_generations
    G = t.num_generations
    mini_size = mini_batch_size(t)
    sampler = bk.get("sampler", "cached")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else _null_ctx()

    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=start_step, desc=f"train {cfg.gate.name}", disable=not bk.get("progress", True))

    for step in range(start_step, t.steps):
        t0 = time.perf_counter()
        lr = t.lr * lr_factor(step, t.steps, t.warmup_steps, t.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1-2. prompts and rollouts ------------------------------------------------------------
        batch = [problems[i] for i in prompts_for_step(len(problems), step, per_step, cfg.seed)]
        prompts = [render_prompt(tokenizer, p["problem"], prompt_cfg) for p in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        model.eval()
        with torch.no_grad(), autocast:
            if sampler == "cached":
                seqs, token_entropy = sample_completions(
                    model, enc.input_ids, enc.attention_mask, num_generations=G, max_new_tokens=t.max_new_tokens,
                    temperature=t.rollout_temperature, top_p=t.top_p, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
            else:
                out = model.generate(
                    **enc, do_sample=True, temperature=t.rollout_temperature, top_p=t.top_p, top_k=0,
                    max_new_tokens=t.max_new_tokens, num_return_sequences=G, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                seqs = out.sequences
                token_entropy = tempered_entropy(torch.stack(out.logits, dim=1), t.rollout_temperature)
        prompt_len = enc.input_ids.shape[1]
        completion_ids = seqs[:, prompt_len:]
        completion_mask = mask_through_first_eos(completion_ids, tokenizer.eos_token_id)
        truncated = ~(completion_ids == tokenizer.eos_token_id).any(-1)
        texts = tokenizer.batch_decode(completion_ids.masked_fill(~completion_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        golds = [p["answer"] for p in batch for _ in range(G)]

        # 3. rewards ------------------------------------------------------------------------------
        fmt = torch.tensor([float(has_format(x)) for x in texts])
        acc = torch.tensor([float(s.correct) for s in score_batch(texts, golds, fallbacks=())])
        rewards = t.rewards.format_weight * fmt + t.rewards.accuracy_weight * acc
        for fn, weight in extra_rewards:
            rewards = rewards + weight * torch.tensor([float(v) for v in fn(texts, golds, [p for p in batch
                                                                                          for _ in range(G)])])

        # 4. advantages ------------------------------------------------------------------------------
        advantages, zero_var = group_advantages(rewards, G, t.advantage, t.adv_eps)
        advantages = advantages.to(device)

        # 5. behaviour log-probs once, then num_iterations passes over the batch ----------------------------
        # Each pass walks the batch in mini-batches (one optimizer step each), each accumulated over micro-batches.
        # Groups whose advantages are all 0 (zero reward variance) add exactly 0 to every gate's loss and gradient,
        # so without a KL term they are left out of the forward/backward passes (backend.skip_zero_advantage); the
        # aggregation still divides by the whole mini-batch, so the update is the one over all rows.
        attn = torch.cat([enc.attention_mask.repeat_interleave(G, 0), completion_mask.long()], dim=1)
        n_comp = completion_ids.shape[1]
        n_rows = seqs.shape[0]
        active_group = advantages.view(-1, G).ne(0).any(-1)
        if ref_model is not None or not bk.get("skip_zero_advantage", True) or not bool(active_group.any()):
            active_group = torch.ones_like(active_group)
        active_row = active_group.repeat_interleave(G).cpu()
        minis = [torch.arange(i, i + mini_size) for i in range(0, n_rows, mini_size)]
        # row indices of each micro-batch of each mini-batch (active rows only, whole groups, in order)
        micros = [[c for c in torch.split(m[active_row[m]], t.micro_batch_size) if len(c)] for m in minis]
        rows = torch.cat([s for m in micros for s in m])  # the rows that train, in micro-batch order
        # Each prompt's forward is shared by its G completions when micro-batches hold whole groups.
        share = G if bk.get("share_prompt", True) and t.micro_batch_size % G == 0 else 1

        logprobs_of = partial(_rows_logprobs, seqs=seqs, attn=attn, n_completion=n_comp,
                              temperature=t.rollout_temperature, group_size=share)

        old_logp: Tensor | None = None
        ref_logp = None
        with torch.no_grad(), autocast:
            if ref_model is not None:
                ref_logp = torch.cat([logprobs_of(ref_model, s) for m in micros for s in m])
            # With one mini-batch the behaviour log-probs are the first update's own forward, detached: the
            # parameters do not change before its optimizer step, so a separate pass would compute the same
            # numbers. With several, later mini-batches of the first pass run after optimizer steps: take π_old now.
            if len(minis) > 1:
                old_logp = torch.cat([logprobs_of(model, s) for m in micros for s in m])

        model.train()
        metrics: dict[str, float] = {}
        for it in range(t.num_iterations):
            logps, loss_total, grad_norms, offset = [], 0.0, [], 0
            for mini, mini_micros in zip(minis, micros, strict=True):
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
                                              diagnostics=False, **loss_kwargs)
                    weight = micro_batch_weight(completion_mask[s], mini_mask, t.loss.agg)
                    (loss * weight).backward()
                    loss_total += float(loss.detach()) * weight / len(minis)
                    logps.append(logp.detach())
                for p in model.parameters():  # before the first backward of a run, gradients are None
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"non-finite gradient norm at step {step}, update {it + 1}")
                optimizer.step()
                grad_norms.append(float(grad_norm))
            if old_logp is None:
                old_logp = torch.cat(logps)
            # Diagnostics of this pass over the rows that trained: each token's ratio as its update saw it.
            _, diag = policy_loss(torch.cat(logps), old_logp, advantages[rows], completion_mask[rows],
                                  ref_logp=ref_logp, **loss_kwargs)
            metrics.update({f"it{it + 1}/{k}": v for k, v in diag.items()})
            metrics[f"it{it + 1}/loss"] = loss_total
            metrics[f"it{it + 1}/grad_norm"] = sum(grad_norms) / len(grad_norms)
        if not math.isfinite(metrics[f"it{t.num_iterations}/loss"]):
            raise FloatingPointError(f"NaN/inf loss at step {step}")

        lengths = completion_mask.sum(-1).float()
        metrics.update({
            "step": float(step + 1),
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "reward_format": float(fmt.mean()),
            "reward_accuracy": float(acc.mean()),
            "response_length": float(lengths.mean()),
            "truncation_rate": float(truncated.float().mean()),
            "entropy": float((token_entropy * completion_mask).sum() / completion_mask.sum()),
            "trained_frac": len(rows) / n_rows,
            "zero_var_groups": float(zero_var),
            "zero_var_frac": zero_var / per_step,
            "lr": lr,
            "loss": metrics[f"it{t.num_iterations}/loss"],
            "grad_norm": metrics[f"it{t.num_iterations}/grad_norm"],
            "step_time_s": time.perf_counter() - t0,
            "tokens": float(completion_mask.sum() + enc.attention_mask.sum() * G),
        })
        history.append(metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['reward_accuracy']:.3f}")
        bar.update(1)
        if on_step is not None:
            on_step(step + 1, metrics)
        if (step + 1) % t.save_every == 0 or step + 1 == t.steps:
            checkpoints.append(save_checkpoint(ckpt_dir / f"step-{step + 1:06d}", model, tokenizer, optimizer,
                                               step + 1, history))
    bar.close()
    (out_dir / "train_history.json").write_text(json.dumps(history))
    final = latest_checkpoint(ckpt_dir)
    assert final is not None
    return TrainResult(final_checkpoint=final, checkpoints=checkpoints, history=history,
                       initial_checkpoint=model_path)


class _null_ctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _plain(node: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
