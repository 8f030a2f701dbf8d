"""Rollouts and their log-probabilities for the native trainer: a cached sampler (each prompt prefilled once, its
KV cache repeated for the G completions and written in place), the per-token log-probs of a batch with the prompt's
forward shared by its group, and the entropy of the distribution each token was drawn from."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor


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
    every token (O(L²) copies); ``benchmarks/bench_trainer.py`` measures what the cached sampler saves."""
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


def rows_logprobs(model: torch.nn.Module, rows: Tensor, *, seqs: Tensor, attn: Tensor, n_completion: int,
                   temperature: float, group_size: int) -> Tensor:
    """:func:`token_logprobs` of the given rows of a rollout batch."""
    return token_logprobs(model, seqs[rows], attn[rows], n_completion, temperature, group_size=group_size)[0]


def mask_through_first_eos(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """True for the tokens of each completion up to and including its first EOS."""
    is_eos = completion_ids == eos_token_id
    return (is_eos.cumsum(-1) - is_eos.long()) == 0
