"""The chunked per-token log-probs (:func:`harness.backends.sampling.token_logprobs`): same log-probs, entropies and
parameter gradients as the full-logits reference on a tiny random Qwen2 with left-padded prompts and completions of
different lengths, with the prompt shared by its group or not; the full-logits fallback for models whose logits are
post-processed; and the output head never applied to more positions than the chunk budget, nor its logits kept for
backward."""

from __future__ import annotations

import pytest
import torch

from harness.backends.sampling import _CHUNKABLE_ATTR, token_logprobs, token_logprobs_reference

V = 1000
N_PROMPTS, G, P, T = 3, 4, 7, 9
CHUNK = 5  # positions per chunk in most tests: N_PROMPTS·G·T = 108 positions → 22 chunks, the last one partial


def _config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, tie_word_embeddings=True)


def _model(cls=None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config()) if cls is None else cls(_config())
    return model.to(dtype)


def _batch():
    """[N·G, P + T] ids whose G consecutive rows share a left-padded prompt, and completions that end (mask 0 after
    their end) at different lengths."""
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, V, (N_PROMPTS, P), generator=gen)
    prompt_mask = torch.ones(N_PROMPTS, P, dtype=torch.long)
    for i, pad in enumerate((0, 2, 4)):
        prompts[i, :pad], prompt_mask[i, :pad] = 0, 0
    completions = torch.randint(1, V, (N_PROMPTS * G, T), generator=gen)
    lengths = torch.randint(1, T + 1, (N_PROMPTS * G,), generator=gen)
    lengths[0] = T
    comp_mask = (torch.arange(T) < lengths[:, None]).long()
    completions = completions.masked_fill(comp_mask == 0, 0)
    ids = torch.cat([prompts.repeat_interleave(G, 0), completions], dim=1)
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), comp_mask], dim=1)
    return ids, attn, comp_mask.bool()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def model64():
    return _model(dtype=torch.float64)


def _run(fn, model, ids, attn, temperature, group_size, weights, **kw):
    """Log-probs, entropies and the parameter gradient of Σ weights·log-probs."""
    model.zero_grad(set_to_none=True)
    logp, entropy = fn(model, ids, attn, T, temperature, with_entropy=True, group_size=group_size, **kw)
    (logp * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("group_size", [1, G])
def test_chunked_equals_full_logits(model, group_size, temperature):
    """float32: log-probs and entropies to 1e-6; gradients to 1e-6 of their largest entry, since the head's weight
    gradient is a sum over positions that chunking (and the reference's zero gradients at the prompt positions)
    adds up in another order."""
    ids, attn, mask = _batch()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    lp_ref, ent_ref, g_ref = _run(token_logprobs_reference, model, ids, attn, temperature, group_size, weights)
    lp, ent, g = _run(token_logprobs, model, ids, attn, temperature, group_size, weights, chunk_elements=CHUNK * V)
    assert model.__dict__[_CHUNKABLE_ATTR] == V, "a plain Qwen2 must take the chunked path"
    assert model.training, "the one-time check must leave the model's mode as it found it"
    assert not ent.requires_grad
    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=1e-6 * g_ref.abs().max().item(), rtol=0)
    with torch.no_grad():  # the behaviour/reference log-probs of the trainer: no checkpointing
        lp_ng, _ = token_logprobs(model, ids, attn, T, temperature, group_size=group_size, chunk_elements=CHUNK * V)
    torch.testing.assert_close(lp_ng, lp_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group_size", [1, G])
def test_chunked_equals_full_logits_float64(model64, group_size):
    """In float64 the summation order no longer shows: everything agrees to 1e-12."""
    ids, attn, mask = _batch()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * mask
    ref = _run(token_logprobs_reference, model64, ids, attn, 0.7, group_size, weights)
    new = _run(token_logprobs, model64, ids, attn, 0.7, group_size, weights, chunk_elements=CHUNK * V)
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_reference_is_log_softmax_of_the_full_forward(model):
    """The reference against torch's own log-softmax and categorical entropy over the plain forward, so that the
    arithmetic both paths share is checked on its own."""
    ids, attn, _ = _batch()
    temperature = 0.7
    with torch.no_grad():
        lp, ent = token_logprobs(model, ids, attn, T, temperature, with_entropy=True, chunk_elements=CHUNK * V)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        z = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[:, -T - 1 : -1] / temperature
    expected = torch.log_softmax(z, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=z).entropy(), atol=1e-5, rtol=0)


def _scaled_qwen2():
    from transformers import Qwen2ForCausalLM

    class ScaledLogitsQwen2(Qwen2ForCausalLM):
        """Logits = 0.5 · lm_head(h), as Cohere's logit_scale or Granite's logits_scaling post-process them."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    return ScaledLogitsQwen2


@pytest.mark.parametrize("group_size", [1, G])
def test_post_processed_logits_take_the_full_logits_path(group_size):
    model = _model(_scaled_qwen2())
    ids, attn, mask = _batch()
    weights = mask.float()
    lp_ref, ent_ref, g_ref = _run(token_logprobs_reference, model, ids, attn, 0.7, group_size, weights)
    lp, ent, g = _run(token_logprobs, model, ids, attn, 0.7, group_size, weights, chunk_elements=CHUNK * V)
    assert model.__dict__[_CHUNKABLE_ATTR] is None
    assert torch.equal(lp, lp_ref) and torch.equal(ent, ent_ref) and torch.equal(g, g_ref)
    # the head alone would have given other numbers: the fallback is what keeps them right
    with torch.no_grad():
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
        z = model.lm_head(hidden[:, -T - 1 : -1]) / 0.7
    unscaled = torch.log_softmax(z, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
    assert (unscaled - lp).abs().max() > 1e-2


class _CountingHead(torch.nn.Module):
    """The model's output head, recording how many positions each call sees and whether autograd records it."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.calls: list[tuple[int, bool]] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append((hidden.shape[:-1].numel(), torch.is_grad_enabled()))
        return self.head(hidden)


@pytest.mark.parametrize("group_size", [1, G])
def test_head_sees_at_most_the_chunk_budget(group_size):
    """Neither forward nor backward applies the head to more than ``chunk_elements // V`` positions, and no logits
    are kept for backward outside the checkpointed chunks (backward recomputes each chunk's instead). The full-logits
    reference, for contrast, applies it to every position at once and keeps [B, T, V] for backward."""
    model = _model()
    head = model.lm_head = _CountingHead(model.lm_head)
    assert model.get_output_embeddings() is head
    ids, attn, mask = _batch()
    budget = 7
    n_chunks = -(-ids.shape[0] * T // budget)
    kept: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(model, ids, attn, T, 0.7, group_size=group_size, chunk_elements=budget * V)
    forward_calls = len(head.calls)
    (logp * mask).sum().backward()
    assert max(n for n, _ in head.calls) <= budget
    assert forward_calls >= n_chunks  # (plus the one-time two-position check)
    assert sum(grad for _, grad in head.calls[forward_calls:]) == n_chunks, "backward recomputes every chunk once"
    assert not [s for s in kept if s[-1] == V], "logits saved for backward outside the checkpoints"

    head.calls.clear()
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs_reference(model, ids, attn, T, 0.7, group_size=group_size)
    assert max(n for n, _ in head.calls) >= ids.shape[0] * T // group_size
    assert any(s[-1] == V and s[:-1].numel() >= ids.shape[0] * T for s in map(torch.Size, kept))
