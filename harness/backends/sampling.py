"""Rollouts and their log-probabilities for the native trainer: a cached sampler (each prompt prefilled once, its
KV cache repeated for the G completions and written in place), the per-token log-probs of a batch with the prompt's
forward shared by its group and the output head applied in checkpointed chunks (memory independent of
micro-batch × vocabulary), and the entropy of the distribution each token was drawn from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from harness import OMP_THREADS_SLEEP

# Rows of the output head per chunk, as a budget of logits elements: chunk_elements // V token positions at a time.
# 2**25 elements is 128 MiB of float32 logits, ~220 positions for Qwen2.5's 151,936-token vocabulary; a chunk's
# working set (head output, tempered copy, logsumexp's exponentials, and in backward the recomputed logits and their
# softmax-shaped gradient) stays well under 1 GiB whatever the micro-batch, where the full-vocabulary path needs
# B·T·V·4 bytes per copy (64 rows × 512 tokens: 20 GB each). A [220, hidden] × [hidden, V] product is still large
# enough to keep the GEMM efficient, and a micro-batch of 64 × 512 tokens is ~150 chunks, so the Python loop is noise.
LOGIT_CHUNK_ELEMENTS = 2**25
# Where torch's idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, as harness/__init__.py sets it), a measuring
# forward this small (distinct rows × tokens × hidden size, in hidden-state elements) runs on one CPU thread: its ops
# are too small to share out, and each parallel region would first wait for the sleeping threads to wake. The
# zero-variance groups of one mini-batch of the default cell (~15 distinct rows of the tiny model) measure about twice
# as fast on one thread of two. Where the threads spin, the pool is faster and the switch itself costs: left alone.
ONE_THREAD_ELEMENTS = 2**18 if OMP_THREADS_SLEEP else 0


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, n_completion: int,
                   temperature: float, with_entropy: bool = False, group_size: int = 1, *,
                   prompt_index: Tensor | None = None,
                   chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the last ``n_completion`` tokens of each row under ``model`` (logits / temperature,
    matching the sampling distribution), and optionally the per-token entropy (no gradient). With z the logits
    that predict token y_t and T the temperature::

        log π(y_t) = z_{y_t}/T − logsumexp(z/T)
        H_t        = logsumexp(z/T) − Σ_v softmax(z/T)_v · z_v/T

    ``group_size`` G > 1 says that consecutive runs of G rows share one prompt (the first
    ``L − n_completion`` tokens): each prompt then goes through the model once, and its keys/values are
    repeated for the G completions (gradients flow back through the repeat). Same numbers as G = 1 up to
    float rounding, with the prompt's share of the compute divided by G. ``prompt_index`` (B,) is the general
    form: rows with equal index share their prompt, in any order and any number (keys/values gathered per row).

    Memory: the decoder body runs once and returns hidden states; the output head is then applied to at most
    ``chunk_elements // V`` token positions at a time, each chunk under activation checkpointing, so neither the
    forward nor the backward ever holds [B, T, V] logits (backward recomputes one chunk's logits at a time). This
    needs the model's logits to be exactly ``get_output_embeddings()(decoder hidden states)``; models that
    post-process them (Gemma-2's final-logit soft-capping, Cohere's logit_scale, Granite's logits_scaling, ...) are
    detected once per model instance (:func:`_chunkable_head`) and take :func:`token_logprobs_reference`, the
    full-logits computation, instead. Values equal the reference's up to float rounding."""
    vocab = _chunkable_head(model, input_ids)
    if vocab is None:
        return token_logprobs_reference(model, input_ids, attention_mask, n_completion, temperature,
                                        with_entropy=with_entropy, group_size=group_size, prompt_index=prompt_index)
    head = model.get_output_embeddings()
    hidden = _completion_outputs(model.get_decoder(), "last_hidden_state", input_ids, attention_mask, n_completion,
                                 group_size, prompt_index)
    targets = input_ids[:, -n_completion:]
    step = max(1, chunk_elements // vocab)
    chunks = zip(hidden.reshape(-1, hidden.shape[-1]).split(step), targets.reshape(-1).split(step), strict=True)
    # Without autograd there is nothing to recompute, and checkpoint would only add overhead.
    grad = torch.is_grad_enabled()
    parts = [checkpoint(_head_logprobs, head, h, y, temperature, with_entropy, use_reentrant=False,
                        preserve_rng_state=False) if grad else _head_logprobs(head, h, y, temperature, with_entropy)
             for h, y in chunks]
    logp = torch.cat([p[0] for p in parts]).view(targets.shape)
    entropy = torch.cat([p[1] for p in parts]).view(targets.shape) if with_entropy else None
    return logp, entropy


def token_logprobs_reference(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, n_completion: int,
                             temperature: float, with_entropy: bool = False, group_size: int = 1,
                             prompt_index: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` from the full causal-LM forward: [B, T, V] logits for the whole batch at once, and what
    autograd keeps of them for backward. The path for models whose logits are not the output head of the decoder's
    hidden states, and the baseline the chunked path is tested and benchmarked against."""
    logits = _completion_outputs(model, "logits", input_ids, attention_mask, n_completion, group_size, prompt_index)
    return _logprobs_of_logits(logits, input_ids[:, -n_completion:], temperature, with_entropy)


def _completion_outputs(module: torch.nn.Module, output: str, input_ids: Tensor, attention_mask: Tensor,
                        n_completion: int, group_size: int, prompt_index: Tensor | None) -> Tensor:
    """``module``'s ``output`` (``last_hidden_state`` of a decoder, ``logits`` of a causal LM) at the positions that
    predict the ``n_completion`` completion tokens, [B, n_completion, ...]. With several rows per prompt, each
    distinct prompt goes through ``module`` once and every row's completion runs on its prompt's keys/values: the
    prompts are consecutive runs of ``group_size`` rows, or, with ``prompt_index``, the rows with equal index."""
    n_prompt = input_ids.shape[1] - n_completion
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if n_prompt == 0 or (group_size == 1 and prompt_index is None):
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return getattr(out, output)[:, -n_completion - 1 : -1]
    if prompt_index is None:
        first: Any = slice(None, None, group_size)

        def spread(t: Tensor) -> Tensor:
            return t.repeat_interleave(group_size, 0)
    else:
        rows = torch.arange(len(prompt_index), device=prompt_index.device)
        first = torch.full((int(prompt_index.max()) + 1,), len(rows), device=rows.device).scatter_reduce(
            0, prompt_index, rows, "amin")  # each prompt's first row

        def spread(t: Tensor) -> Tensor:
            return t[prompt_index]
    prompt = module(input_ids=input_ids[first, :n_prompt], attention_mask=attention_mask[first, :n_prompt],
                    position_ids=position_ids[first, :n_prompt], use_cache=True)
    kv_cache = prompt.past_key_values
    if prompt_index is None:
        kv_cache.batch_repeat_interleave(group_size)  # repeat_interleave per layer: differentiable
    else:
        kv_cache.batch_select_indices(prompt_index)
    rest = module(input_ids=input_ids[:, n_prompt:], attention_mask=attention_mask,
                  position_ids=position_ids[:, n_prompt:], past_key_values=kv_cache)
    # the first completion token is predicted by the prompt's last position
    return torch.cat([spread(getattr(prompt, output)[:, -1:]), getattr(rest, output)[:, :-1]], dim=1)


def _logprobs_of_logits(logits: Tensor, targets: Tensor, temperature: float,
                        with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature) at ``targets`` (gathered, not the whole log-softmax), and the entropy."""
    z = logits.float() / temperature
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return logp, tempered_entropy(z, 1.0) if with_entropy else None  # z is already tempered


def _head_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float,
                   with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    return _logprobs_of_logits(head(hidden), targets, temperature, with_entropy)


_CHUNKABLE_ATTR = "_harness_chunkable_head"


def _chunkable_head(model: torch.nn.Module, input_ids: Tensor) -> int | None:
    """The vocabulary size V if ``model``'s logits are exactly its output head applied to its decoder's hidden
    states (so the head can be applied chunk by chunk), else None.

    Decided once per model instance and cached on it: one forward of two tokens through the whole model and through
    decoder + head, in eval mode (dropout would make the two differ), compared to float tolerance. A model whose
    forward rescales, soft-caps or otherwise post-processes the head's output, or that has no separate
    decoder/head, gets None. Swapping a model's head or forward after its first call is not detected."""
    if _CHUNKABLE_ATTR in model.__dict__:
        return model.__dict__[_CHUNKABLE_ATTR]
    vocab = None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without a generic decoder
        decoder = head = None
    if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module) and decoder is not model:
        ids = input_ids[:1, -2:]
        training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits
                hidden = getattr(decoder(input_ids=ids, use_cache=False), "last_hidden_state", None)
                split = head(hidden) if isinstance(hidden, Tensor) else None
        finally:
            for m, mode in training.items():
                m.training = mode
        if (split is not None and split.shape == full.shape
                and torch.allclose(split.float(), full.float(), rtol=1e-6, atol=1e-6)):
            vocab = full.shape[-1]
    model.__dict__[_CHUNKABLE_ATTR] = vocab
    return vocab


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
                       pad_token_id: int, with_logprobs: bool = False, prompt_seeds: Sequence[int] | None = None,
                       synced: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """``num_generations`` sampled completions per (left-padded) prompt, as ``[B·G, P + T]`` token ids with
    the G rows of a prompt consecutive (the layout of ``generate(num_return_sequences=G)``), the ``[B·G, T]``
    entropies of the tempered distributions (softmax(logits / temperature), before top-p) each token was drawn from,
    and with ``with_logprobs`` the ``[B·G, T]`` log-probs of the drawn tokens under those distributions: the
    sampler's own behaviour log-probs, in whatever precision it ran (None without).

    Each prompt is prefilled once and its KV cache repeated G times, then all B·G rows decode together;
    a row that has emitted EOS is padded with ``pad_token_id`` from then on, and decoding stops once every row
    has ended. Token t is drawn from softmax(logits / temperature), restricted to the smallest set of tokens
    whose probability reaches ``top_p`` (top_p = 1: the full distribution; no top-k). This is the same
    distribution as ``model.generate(do_sample=True, top_k=0, ...)``; what it saves is generate's G-fold prompt
    prefill and its per-token bookkeeping, which dominate on small models (``benchmarks/bench_trainer.py``).

    Without ``prompt_seeds`` every token comes from ``torch.multinomial`` on the global generator, consuming it as
    ``generate`` does. With them (one integer per prompt), prompt i's G rows draw uniforms u ~ U[0, 1) from a
    generator seeded with ``prompt_seeds[i]`` (all of them up front) and token t of row j is the inverse CDF at
    1 − u: the first token k with Σ_{k' ≤ k} p_k' ≥ (1 − u)·Σ p. The same distribution, but a prompt's completions no
    longer depend on which other prompts share its batch or on which process samples it: one cell draws the same
    rollouts on 1 or N processes, up to the forward's float rounding at a CDF boundary.

    ``synced``: every process of the default process group decodes until all of them are done (one all-reduce of a
    flag per token). A sharded model (FSDP, ZeRO-3) gathers its parameters in every forward, a collective: a process
    that stopped at its own last token would leave the others waiting for its share (``generate``'s
    ``synced_gpus``). The extra steps are cut off, so what a process returns from this call does not change (without
    ``prompt_seeds`` they do draw from the global generator). Every process must pass the same ``max_new_tokens``:
    the last step skips the all-reduce on all of them alike."""
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
    uniforms = None
    if prompt_seeds is not None:
        if len(prompt_seeds) != input_ids.shape[0]:
            raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {input_ids.shape[0]} prompts")
        uniforms = torch.cat([torch.rand(G, max_new_tokens, device=logits.device,
                                         generator=torch.Generator(device=logits.device).manual_seed(int(seed)))
                              for seed in prompt_seeds])
    tokens, entropies, logprobs = [], [], []
    length = None  # steps until this process's own rows were all done
    for t in range(max_new_tokens):
        entropies.append(tempered_entropy(logits, temperature))
        token = _sample_token(logits, temperature, top_p, None if uniforms is None else uniforms[:, t])
        token = token.masked_fill(done, pad_token_id)
        tokens.append(token)
        if with_logprobs:
            logprobs.append(_logprobs_of_logits(logits, token, temperature, False)[0])
        done = done | (token == eos_token_id)
        if length is None and bool(done.all()):
            length = t + 1
        if t + 1 == max_new_tokens or (_all_processes_done(length is not None, logits.device) if synced
                                       else length is not None):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                       past_key_values=kv_cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    n = length or len(tokens)
    seqs = torch.cat([input_ids.repeat_interleave(G, 0), torch.stack(tokens[:n], dim=1)], dim=1)
    return seqs, torch.stack(entropies[:n], dim=1), torch.stack(logprobs[:n], dim=1) if with_logprobs else None


def _all_processes_done(done: bool, device: torch.device) -> bool:
    """Whether every process of the default process group is done (a MAX all-reduce of "still decoding")."""
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


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


def _sample_token(logits: Tensor, temperature: float, top_p: float, uniform: Tensor | None = None) -> Tensor:
    """One token per row from softmax(logits / temperature), nucleus-truncated at ``top_p``: by ``torch.multinomial``,
    or with ``uniform`` (one u ∈ [0, 1) per row) by the inverse CDF at 1 − u (> 0, so a token of probability 0 is
    never the answer)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (so the top token is always kept)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if uniform is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    cdf = probs.cumsum(-1)
    target = (1.0 - uniform.to(cdf.dtype)).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def logprobs_of_logits(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) at ``targets``: the log-probs of tokens drawn from those logits."""
    return _logprobs_of_logits(logits, targets, temperature, False)[0]


def rows_logprobs(model: torch.nn.Module, rows: Tensor, *, seqs: Tensor, attn: Tensor, n_completion: int,
                   temperature: float, group_size: int) -> Tensor:
    """:func:`token_logprobs` of the given rows of a rollout batch."""
    return token_logprobs(model, seqs[rows], attn[rows], n_completion, temperature, group_size=group_size)[0]


@contextmanager
def eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
    """A measuring forward inside training: no gradient, every module in eval mode (no dropout, so no random
    numbers drawn and no effect on the run), and each module's own training flag restored afterwards."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in training.items():
            m.training = mode


def distinct_rows_logprobs(model: torch.nn.Module, rows: Tensor, *, seqs: Tensor, attn: Tensor, n_completion: int,
                           temperature: float, max_rows: int) -> Tensor:
    """:func:`rows_logprobs` of a measuring pass (call it without gradient): each distinct row is computed once and
    copied to its duplicates (the G completions of a prompt often repeat one another word for word: on ``arith``
    about half the rows of zero-variance groups), each distinct prompt's forward is shared by its rows, and at most
    ``max_rows`` distinct rows go through the model at a time. The same numbers as :func:`rows_logprobs` up to float
    rounding. A chunk under :data:`ONE_THREAD_ELEMENTS` on CPU runs on one thread."""
    width = seqs.shape[1]
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    distinct, inverse = torch.unique(torch.cat([seqs[rows], attn[rows]], dim=1), dim=0, return_inverse=True)
    parts = []
    for chunk in distinct.split(max_rows):
        ids, mask = chunk[:, :width], chunk[:, width:]
        n_prompt = width - n_completion
        _, prompt_index = torch.unique(torch.cat([ids[:, :n_prompt], mask[:, :n_prompt]], dim=1), dim=0,
                                       return_inverse=True)
        small = ids.device.type == "cpu" and 0 < ids.numel() * hidden < ONE_THREAD_ELEMENTS
        with cpu_threads(1 if small else None):
            parts.append(token_logprobs(model, ids, mask, n_completion, temperature, prompt_index=prompt_index)[0])
    return torch.cat(parts)[inverse]


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` inside (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def mask_through_first_eos(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """True for the tokens of each completion up to and including its first EOS."""
    is_eos = completion_ids == eos_token_id
    return (is_eos.cumsum(-1) - is_eos.long()) == 0
