"""The native GRPO/SAPO backend: end to end on the tiny model, determinism, resume, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from harness.backends import TrainResult, get_backend
from harness.backends.native import group_advantages, prompts_for_step, train
from harness.objective import aggregate, micro_batch_weight, policy_loss
from tests.conftest import compose, compose_at

SMALL = ["train.steps=2", "train.rollout_batch_size=32", "train.micro_batch_size=16", "train.save_every=1",
         "backend.progress=false", "backend.threads=1", "eval.enabled=false"]


def _cfg(tmp_path: Path, cache_dir: Path, *extra: str):
    return compose_at(tmp_path, [*SMALL, f"cache_dir={cache_dir}", *extra])


def _strip(history):
    return [{k: v for k, v in h.items() if k != "step_time_s"} for h in history]


def _assert_same(h1, h2):
    assert len(h1) == len(h2)
    for a, b in zip(_strip(h1), _strip(h2), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=0, abs_tol=1e-6) or (math.isnan(a[k]) and math.isnan(b[k])), k


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, cache_dir) -> TrainResult:
    return train(_cfg(tmp_path_factory.mktemp("run"), cache_dir))


def test_two_step_run_end_to_end(two_step_run: TrainResult):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = two_step_run
    assert [h["step"] for h in res.history] == [1.0, 2.0]
    assert len(res.checkpoints) == 2 and res.final_checkpoint == res.checkpoints[-1]
    AutoModelForCausalLM.from_pretrained(res.final_checkpoint)
    AutoTokenizer.from_pretrained(res.final_checkpoint)
    h = res.history[-1]
    for key in ("reward", "reward_format", "reward_accuracy", "response_length", "truncation_rate", "entropy",
                "grad_norm", "lr", "zero_var_groups", "it1/ratio_mean", "it2/abs_ratio_dev", "it2/gate_weight",
                "it2/frac_w_lt_0.5", "it2/ratio_p95_pos", "it1/eur", "it2/eur", "it2/eur_pos"):
        assert key in h and math.isfinite(h[key]), key
    # First update is on-policy (r == 1 up to float error); the second is not: the gate matters there.
    assert h["it1/abs_ratio_dev"] < 1e-5
    assert h["it2/abs_ratio_dev"] > 1e-4
    assert h["it1/eur"] == pytest.approx(1.0, abs=1e-6) and 0.0 < h["it2/eur"] <= 1.0


def test_second_update_is_off_policy_by_more_than_one_percent(tmp_path, cache_dir):
    res = train(_cfg(tmp_path, cache_dir, "train.steps=3", "train.lr=1e-3"))
    # a step without signal (every group's rewards equal) trains no row and has no ratio diagnostics
    assert max(h["it2/abs_ratio_dev"] for h in res.history if h["no_signal"] == 0) > 0.01


def test_same_seed_same_history(two_step_run, tmp_path, cache_dir):
    again = train(_cfg(tmp_path, cache_dir))
    _assert_same(two_step_run.history, again.history)


def test_gates_give_different_histories(two_step_run, tmp_path, cache_dir):
    other = train(_cfg(tmp_path, cache_dir, "gate=clip", "gate.eps_high=0.01", "gate.eps_low=0.01"))
    # Step 1's rollouts are identical (same seed, same weights); its updates, and so step 2, are not.
    assert two_step_run.history[0]["reward"] == other.history[0]["reward"]
    a, b = two_step_run.history[-1], other.history[-1]
    assert any(abs(a[k] - b[k]) > 1e-7 for k in ("it2/loss", "it2/grad_norm", "it2/gate_weight"))


def test_killed_and_resumed_run_matches_uninterrupted(two_step_run, tmp_path, cache_dir):
    class Killed(Exception):
        pass

    def kill_after_first(step, metrics):
        if step == 2:
            raise Killed  # dies after step 2's metrics, before its checkpoint

    cfg = _cfg(tmp_path, cache_dir)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after_first)
    assert (tmp_path / "checkpoints" / "step-000001").exists()
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    with open_dict(cfg):
        cfg.resume = True
    resumed = train(cfg)
    _assert_same(two_step_run.history, resumed.history)


def test_backend_registry():
    assert get_backend("native") is train
    with pytest.raises(ValueError, match="native"):
        get_backend("nope")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.rollout_batch_size=30", "divisible by train.num_generations"),
        ("train.micro_batch_size=7", "must divide train.rollout_batch_size"),
        ("train.mini_batch_size=12", "train.mini_batch_size=12 must be null or an integer"),
        ("train.mini_batch_size=8", "train.micro_batch_size=16 must divide"),
        ("backend.sampler=beam", "backend.sampler must be one of cached, generate"),
        ("task.name=nope", "nope"),
        ("data_dir=/does/not/exist", "/does/not/exist"),
        ("model.path=/no/such/model", "/no/such/model"),
        ("gate.name=nope", "known gates are"),
        ("gate.tau_pos=0", "tau_pos"),
        ("train.advantage=ppo", "train.advantage"),
    ],
)
def test_bad_config_fails_before_compute(tmp_path, cache_dir, override, match):
    with pytest.raises(ValueError, match=match):
        train(_cfg(tmp_path, cache_dir, override))
    assert not (tmp_path / "checkpoints").exists()


def test_group_advantages_zero_variance():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0])
    adv, zero_var = group_advantages(rewards, 4, "grpo", 1e-4)
    assert zero_var == 1
    assert torch.all(adv[:4] == 0)
    assert torch.allclose(adv[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3)
    adv_dr, _ = group_advantages(rewards, 4, "drgrpo", 1e-4)
    assert torch.allclose(adv_dr[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_prompt_order_is_a_per_epoch_permutation():
    seen = [i for step in range(5) for i in prompts_for_step(10, step, 2, seed=3)]
    assert sorted(seen) == list(range(10))
    assert prompts_for_step(10, 7, 2, seed=3) == prompts_for_step(10, 7, 2, seed=3)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_equals_full_batch(agg):
    torch.manual_seed(0)
    B, T = 8, 6
    logits = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logits.detach() + 0.1 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.rand(B, T) < 0.7
    mask[:, 0] = True
    full, _ = policy_loss(logits, old, adv, mask, gate="erf", agg=agg, diagnostics=False)
    (g_full,) = torch.autograd.grad(full, logits)
    acc = torch.zeros(())
    g_acc = torch.zeros_like(logits)
    for s in (slice(0, 3), slice(3, 8)):
        loss, _ = policy_loss(logits[s], old[s], adv[s], mask[s], gate="erf", agg=agg, diagnostics=False)
        w = micro_batch_weight(mask[s], mask, agg)
        (g,) = torch.autograd.grad(loss * w, logits)
        g_acc += g
        acc = acc + loss.detach() * w
    assert torch.allclose(acc, full.detach(), atol=1e-12)
    assert torch.allclose(g_acc, g_full, atol=1e-12)
    assert aggregate(torch.ones(B, T), mask, agg) > 0


def test_shared_prompt_forward_equals_full_forward(cache_dir):
    """token_logprobs with group_size=G (each prompt once, its KV cache repeated) gives the log-probs,
    entropies and parameter gradients of the plain forward over every full row, on real tiny-model rollouts
    with left-padded prompts and completions that end at different lengths."""
    from harness.backends.sampling import mask_through_first_eos, token_logprobs

    model, tok, enc = _tiny_prompts(cache_dir, 4)
    assert (enc.attention_mask == 0).any(), "the test needs left padding"
    G = 4
    torch.manual_seed(0)
    with torch.no_grad():
        seqs = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=24,
                              num_return_sequences=G, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    comp = seqs[:, enc.input_ids.shape[1]:]
    comp_mask = mask_through_first_eos(comp, tok.eos_token_id)
    assert not comp_mask.all(), "the test needs completions of different lengths"
    attn = torch.cat([enc.attention_mask.repeat_interleave(G, 0), comp_mask.long()], dim=1)

    results = []
    for group_size in (1, G):
        model.zero_grad()
        logp, ent = token_logprobs(model, seqs, attn, comp.shape[1], 0.7, with_entropy=True, group_size=group_size)
        (logp * comp_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logp.detach()[comp_mask], ent[comp_mask], grads))
    (lp1, e1, g1), (lpG, eG, gG) = results
    assert torch.allclose(lp1, lpG, atol=1e-4)
    assert torch.allclose(e1, eG, atol=1e-4)
    assert torch.allclose(g1, gG, atol=1e-4 * g1.abs().max().item())


def test_measuring_forward_equals_the_plain_one(cache_dir):
    """distinct_rows_logprobs (each distinct row once, prompts shared by index, small chunks on one CPU thread) gives
    rows_logprobs' numbers for rows in any order, chunked or not, and leaves the model's modes and the thread count
    as they were."""
    from harness.backends.sampling import (
        distinct_rows_logprobs,
        eval_no_grad,
        mask_through_first_eos,
        rows_logprobs,
        sample_completions,
    )

    model, tok, enc = _tiny_prompts(cache_dir, 4)
    G = 8
    torch.manual_seed(0)
    with torch.no_grad():
        seqs, _, _ = sample_completions(model, enc.input_ids, enc.attention_mask, num_generations=G, max_new_tokens=24,
                                     temperature=0.7, top_p=1.0, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    comp = seqs[:, enc.input_ids.shape[1]:]
    mask = mask_through_first_eos(comp, tok.eos_token_id)
    attn = torch.cat([enc.attention_mask.repeat_interleave(G, 0), mask.long()], dim=1)
    assert len(torch.unique(seqs, dim=0)) < len(seqs), "the test needs completions that repeat one another"
    kw = dict(seqs=seqs, attn=attn, n_completion=comp.shape[1], temperature=0.7)
    rows = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))
    model.train()
    model.model.layers[0].eval()  # a module with its own mode, which the measuring forward must give back
    threads = torch.get_num_threads()
    with torch.no_grad():
        plain = rows_logprobs(model, rows, group_size=1, **kw)
    for max_rows in (64, 5):
        with eval_no_grad(model):
            assert not model.training and not torch.is_grad_enabled()
            measured = distinct_rows_logprobs(model, rows, max_rows=max_rows, **kw)
        assert torch.allclose(measured[mask[rows]], plain[mask[rows]], atol=1e-5)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert torch.get_num_threads() == threads


def _tiny_prompts(cache_dir: Path, n: int):
    from harness.data import load_task
    from harness.models import load_model_and_tokenizer, model_prompt_config, resolve_model_path
    from harness.prompts import render_prompt

    cfg = compose([f"cache_dir={cache_dir}"])
    path = resolve_model_path(cfg.model, cache_dir=cache_dir)
    model, tok = load_model_and_tokenizer({"name": "hf", "path": str(path)}, device=torch.device("cpu"))
    tok.padding_side = "left"
    problems = load_task(cfg.task, "train", seed=0)[:n]
    prompts = [render_prompt(tok, p["problem"], model_prompt_config(cfg.model)) for p in problems]
    return model.eval(), tok, tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize(("temperature", "top_p", "max_new"), [(0.7, 1.0, 24), (1.3, 0.9, 24), (1.0, 1.0, 3)])
def test_cached_sampler_draws_what_generate_draws(cache_dir, temperature, top_p, max_new):
    """sample_completions (each prompt prefilled once, KV cache repeated G times) consumes the RNG as
    model.generate(do_sample=True, top_k=0) does, so for one seed it draws the same rollouts: a wrong position,
    mask, cache layout, temperature or nucleus rule shows up as different tokens. Rows may only differ where float
    rounding between a 16-row and a 128-row prefill flips a draw, so allow a few."""
    from harness.backends.sampling import mask_through_first_eos, sample_completions, token_logprobs

    model, tok, enc = _tiny_prompts(cache_dir, 16)
    assert (enc.attention_mask == 0).any(), "the test needs left padding"
    G = 8
    kw = dict(temperature=temperature, top_p=top_p, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=max_new, num_return_sequences=G, **kw)
    torch.manual_seed(1)
    with torch.no_grad():
        ours, entropy, _ = sample_completions(model, enc.input_ids, enc.attention_mask, num_generations=G,
                                           max_new_tokens=max_new, **kw)
    assert ours.shape == ref.shape
    assert (ours == ref).all(-1).float().mean() >= 0.95
    comp = ours[:, enc.input_ids.shape[1]:]
    if max_new == 24:  # some rows end early and are padded after their EOS, as generate pads them
        assert ((comp == tok.eos_token_id).any(-1)).any() and (comp == tok.pad_token_id).any()
    # the sampling-time entropies are those of the full forward over the finished rollouts
    mask = mask_through_first_eos(comp, tok.eos_token_id)
    attn = torch.cat([enc.attention_mask.repeat_interleave(G, 0), mask.long()], dim=1)
    with torch.no_grad():
        _, full = token_logprobs(model, ours, attn, comp.shape[1], temperature, with_entropy=True)
    assert entropy.shape == comp.shape
    assert torch.allclose(entropy[mask], full[mask], atol=1e-4)


def test_cached_sampler_greedy_limit_equals_greedy_generate(cache_dir):
    """With a nucleus so small that only the top token survives, sampling is greedy decoding: token for
    token what generate(do_sample=False) returns, for every one of the G rows of a prompt."""
    from harness.backends.sampling import sample_completions

    model, tok, enc = _tiny_prompts(cache_dir, 8)
    with torch.no_grad():
        greedy = model.generate(**enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
        ours, _, _ = sample_completions(model, enc.input_ids, enc.attention_mask, num_generations=3,
                                     max_new_tokens=24, temperature=1.0, top_p=1e-6, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, greedy.repeat_interleave(3, 0))


def test_sampler_choice_keeps_the_history(two_step_run, tmp_path, cache_dir):
    """backend.sampler=generate (transformers' generate) and the default cached sampler train identically."""
    other = train(_cfg(tmp_path, cache_dir, "backend.sampler=generate"))
    _assert_same(two_step_run.history, other.history)


def test_mini_batch_of_the_whole_batch_is_one_step_per_pass(two_step_run, tmp_path, cache_dir):
    """The default mini-batch (64) exceeds this run's rollout batch (32), so it is capped: one optimizer step
    per pass, the same run as mini_batch_size=null."""
    other = train(_cfg(tmp_path, cache_dir, "train.mini_batch_size=null"))
    _assert_same(two_step_run.history, other.history)


def test_mini_batches_step_within_a_pass(two_step_run, tmp_path, cache_dir):
    """Two mini-batches per pass: the first pass's second mini-batch already runs after an optimizer step, so
    its ratios move off 1 (behaviour log-probs were taken before any update), and the second pass moves further
    than with one optimizer step per pass."""
    res = train(_cfg(tmp_path, cache_dir, "train.mini_batch_size=16"))
    for h in res.history:
        assert h["it1/abs_ratio_dev"] > 1e-4
        assert h["it2/abs_ratio_dev"] > h["it1/abs_ratio_dev"]
    assert res.history[0]["reward"] == two_step_run.history[0]["reward"]  # same first rollouts
    assert res.history[0]["it2/abs_ratio_dev"] > two_step_run.history[0]["it2/abs_ratio_dev"]


def test_skipping_zero_advantage_groups_changes_no_update(tmp_path, cache_dir):
    """Groups with all-zero advantages add exactly 0 to the loss and its gradient, so leaving them out of the passes
    (the default) gives the same losses, gradient norms, and weights as training on every row. The run needs such
    groups and groups with signal in the same batch, and one group per mini-batch, so that some optimizer steps
    see no active row at all (they must still step: Adam's momentum moves the weights)."""
    from safetensors.torch import load_file

    extra = ("train.steps=3", "train.mini_batch_size=8", "train.micro_batch_size=8", "train.rollout_temperature=0.7",
             "gate=erf")
    runs = {}
    for skip in (True, False):
        out = tmp_path / str(skip)
        runs[skip] = train(_cfg(out, cache_dir, *extra, f"backend.skip_zero_advantage={skip}"))
    skipped, full = runs[True].history, runs[False].history
    assert any(0 < h["trained_frac"] < 1 for h in skipped)
    assert all(h["trained_frac"] == 1 for h in full)
    for a, b in zip(skipped, full, strict=True):
        for key in ("reward", "entropy", "it1/loss", "it2/loss", "it1/grad_norm", "it2/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), key
        # EUR is over every prompt whether its rows trained or only had their ratios measured (eq. 12)
        for key in ("it1/eur", "it2/eur", "it1/eur_neg", "it2/eur_neg", "it1/eur_pos", "it2/eur_pos"):
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-6), key
    w_skip = load_file(runs[True].final_checkpoint / "model.safetensors")
    w_full = load_file(runs[False].final_checkpoint / "model.safetensors")
    assert w_skip.keys() == w_full.keys()
    for name in w_skip:
        assert torch.allclose(w_skip[name], w_full[name], atol=1e-6), name


def test_killed_and_resumed_mini_batch_run_matches_uninterrupted(tmp_path, cache_dir):
    """The embedded default's shape (several optimizer steps per pass, zero-advantage groups skipped): a run
    killed after step 2 and resumed from its step-1 checkpoint ends exactly where an uninterrupted run ends,
    and a second uninterrupted run with the same seed repeats the first one."""
    from safetensors.torch import load_file

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 2:
            raise Killed

    extra = ("train.steps=3", "train.mini_batch_size=8", "train.micro_batch_size=8")
    straight = train(_cfg(tmp_path / "straight", cache_dir, *extra))
    again = train(_cfg(tmp_path / "again", cache_dir, *extra))
    _assert_same(straight.history, again.history)
    cfg = _cfg(tmp_path / "killed", cache_dir, *extra)
    with pytest.raises(Killed):
        train(cfg, on_step=kill)
    with open_dict(cfg):
        cfg.resume = True
    resumed = train(cfg)
    _assert_same(straight.history, resumed.history)
    a = load_file(straight.final_checkpoint / "model.safetensors")
    b = load_file(resumed.final_checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_signal_step_skips_the_passes_and_moves_weights_as_training_every_row(tmp_path, cache_dir):
    """A step whose groups all have equal rewards trains no row (counted as no_signal, no ratio statistics) yet takes
    its optimizer steps with zero gradients, so AdamW's momentum moves the weights exactly as when every row trains
    with advantage 0 (backend.skip_zero_advantage=false); the run summary warns when most steps are like that. Its EUR
    is still eq. 12 over every prompt: 1 on the first pass (nothing has moved, f'(1) = 1), and on the second what
    the ratios of the moved weights give, the same as when every row trains."""
    from tests import custom_rewards

    no_signal_after_step_1 = ["train.rewards.format_weight=0", "train.rewards.accuracy_weight=0",
                              "train.rewards.extra=[{path: 'tests.custom_rewards:signal_once', weight: 1.0}]",
                              "train.steps=3", "train.save_every=3", "train.lr=1e-3"]
    results = {}
    for skip in (True, False):
        custom_rewards.CALLS["signal_once"] = 0
        results[skip] = train(_cfg(tmp_path / str(skip), cache_dir, *no_signal_after_step_1,
                                   f"backend.skip_zero_advantage={str(skip).lower()}"))
    skipped, every_row = results[True].history, results[False].history
    assert [h["no_signal"] for h in skipped] == [0.0, 1.0, 1.0] == [h["no_signal"] for h in every_row]
    assert [h["trained_frac"] for h in skipped] == [1.0, 0.0, 0.0]
    assert [h["trained_frac"] for h in every_row] == [1.0, 1.0, 1.0]
    assert "it2/abs_ratio_dev" in skipped[0] and "it2/abs_ratio_dev" not in skipped[1]
    for a, b in zip(skipped[1:], every_row[1:], strict=True):
        assert a["it1/eur"] == 1.0 and set(k for k in a if "eur" in k) == {f"it{i}/eur{s}" for i in (1, 2)
                                                                           for s in ("", "_neg")}
        assert math.isclose(a["it2/eur"], b["it2/eur"], rel_tol=0, abs_tol=1e-6) and a["it2/eur"] < 1.0
    assert skipped[1]["it2/grad_norm"] == 0.0 and skipped[1]["loss"] == 0.0
    from safetensors.torch import load_file

    a = load_file(str(results[True].final_checkpoint / "model.safetensors"))
    b = load_file(str(results[False].final_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    start = load_file(str(Path(results[True].initial_checkpoint) / "model.safetensors"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the step with signal moved them; the two runs agree after the steps without

    from harness.stability import learning_signal, no_signal_warning

    signal = learning_signal(skipped)
    assert signal["steps"] == 3 and signal["no_signal_steps"] == 2
    assert "no learning signal in 2 of 3 steps" in no_signal_warning(signal)


# ----------------------------------------------------------------------------- EUR (arXiv 2602.19345 eq. 12)


def record_diagnostics(monkeypatch) -> list[dict]:
    """Record every diagnostics call the native backend makes to policy_loss (one per pass): its per-token log-probs,
    behaviour log-probs, advantages, mask and group ids, as float64."""
    from harness.backends import native

    calls: list[dict] = []
    real = native.policy_loss

    def recording(logp, old_logp, advantages, mask, **kw):
        if kw.get("diagnostics", True):
            calls.append({"logp": logp.detach().double().cpu(), "old": old_logp.detach().double().cpu(),
                          "adv": advantages.detach().double().cpu(), "mask": mask.bool().cpu(),
                          "groups": kw["groups"].cpu()})
        return real(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(native, "policy_loss", recording)
    return calls


def eq12(call: dict, weight) -> float:
    """EUR of one recorded pass, written out: for each prompt, the sum of f'(r) over its completions' tokens over
    their number, then the mean over the prompts. ``weight(r, A)`` is the gate's f' by hand."""
    r = torch.exp((call["logp"] - call["old"]).clamp(-20.0, 20.0))
    w = weight(r, call["adv"][:, None].expand_as(r))
    per_prompt = []
    for b in sorted(set(call["groups"].tolist())):
        rows = call["groups"] == b
        tokens = call["mask"][rows]
        per_prompt.append(float(w[rows][tokens].sum()) / int(tokens.sum()))
    return sum(per_prompt) / len(per_prompt)


# 2 steps of 4 prompts x 8 completions, 2 mini-batches per pass (the second one's update sees moved weights), 2
# passes, a learning rate at which the ratios move enough for every gate to act.
RECORDED = ("train.steps=2", "train.mini_batch_size=16", "train.lr=1e-3")


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign", "softsign_abs", "clip"])
def test_eur_is_eq_12_over_every_prompt_of_a_recorded_step(tmp_path, cache_dir, monkeypatch, gate):
    """Each pass's logged EUR equals eq. 12 computed here, independently, from the recorded per-token ratios,
    advantages, masks and group ids of every completion of the step: zero-variance groups, left out of the passes,
    included with their measured ratios (ratios that moved off 1)."""
    from tests.test_objective import EPS_HIGH, EPS_LOW, TAU_NEG, TAU_POS, closed_weight

    calls = record_diagnostics(monkeypatch)
    gate_keys = ([f"gate.eps_low={EPS_LOW}", f"gate.eps_high={EPS_HIGH}"] if gate == "clip" else
                 [f"gate.tau_pos={TAU_POS}", f"gate.tau_neg={TAU_NEG}", "gate.width=raw"])
    res = train(_cfg(tmp_path, cache_dir, *RECORDED, f"gate={gate}", *gate_keys))
    assert len(calls) == 4  # 2 steps x 2 passes
    idle_moved = False
    for k, call in enumerate(calls):
        step, it = divmod(k, 2)
        assert call["logp"].shape[0] == 32 and torch.equal(call["groups"], torch.arange(32) // 8)  # every prompt
        expected = eq12(call, lambda r, a: closed_weight(gate, r, a))
        assert res.history[step][f"it{it + 1}/eur"] == pytest.approx(expected, abs=1e-6)
        idle = call["adv"].view(4, 8).eq(0).all(-1).repeat_interleave(8)
        r = torch.exp(call["logp"] - call["old"])[idle][call["mask"][idle]]
        idle_moved |= bool(len(r)) and float((r - 1).abs().max()) > 1e-4
    assert any(h["trained_frac"] < 1 for h in res.history)  # the steps had zero-variance groups...
    assert idle_moved  # ...whose ratios were measured, not taken as 1
