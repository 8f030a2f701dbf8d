"""The TRL backend: loss parity with the harness objective and TRL's own losses, config mapping, a CPU run."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer

from harness.backends.trl_config import grpo_config_kwargs
from harness.backends.trl_rewards import accuracy_reward, format_reward
from harness.backends.trl_trainer import HarnessGRPOTrainer, gated_loss
from harness.gates import BUILTIN_GATES
from harness.objective import aggregate, policy_loss
from tests.conftest import compose

TAU_POS, TAU_NEG, GA = 1.0, 1.05, 4


# ----------------------------------------------------------------------------- loss parity on random tensors


def _tensors(seed: int = 0, B: int = 6, T: int = 9, P: int = 3) -> dict[str, torch.Tensor]:
    """Random float64 TRL inputs: ratios exp(±~0.6), mixed-sign advantages, ragged completion masks."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate(torch.randint(1, T + 1, (B,), generator=g).tolist()):
        mask[i, n:] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = 0.0  # A = 0 takes tau_neg
    return {"prompt_ids": torch.ones(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
            "advantages": adv, "old_per_token_logps": old, "_logp": logp}


def _fake_trainer(cls: type, logp: torch.Tensor, **attrs):
    """An instance of ``cls`` with only what ``_compute_loss`` reads: the model forward is replaced by a
    leaf tensor of log-probs, so ``_compute_loss`` runs unmodified on constructed inputs."""
    obj = cls.__new__(cls)
    args = SimpleNamespace(delta=None, sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG,
                           use_bias_correction_kl=False, steps_per_generation=GA, gradient_accumulation_steps=GA)
    common = dict(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, args=args,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=GA, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t),
        _harness_window=[], _harness_window_loss=0.0, _harness_pending={},
    )
    for key, value in {**common, **attrs}.items():
        object.__setattr__(obj, key, value)
    return obj


def _run(cls: type, data: dict, **attrs) -> tuple[float, torch.Tensor]:
    logp = data["_logp"].clone().requires_grad_(True)
    inputs = {k: v for k, v in data.items() if not k.startswith("_")}
    trainer = _fake_trainer(cls, logp, **attrs)
    loss = cls._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return float(loss.detach()), grad


STUDENT_NU = 4.0  # the tail index the Student-t gate is checked at


def _nu(gate: str) -> float | None:
    return STUDENT_NU if gate == "student" else None


def _reference(data: dict, gate: str) -> tuple[float, torch.Tensor]:
    logp = data["_logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, data["old_per_token_logps"], data["advantages"], data["completion_mask"], gate=gate,
                          tau_pos=TAU_POS, tau_neg=TAU_NEG, diagnostics=False, nu=_nu(gate))
    loss = loss / GA  # TRL divides every micro-batch loss by the accumulation steps
    (grad,) = torch.autograd.grad(loss, logp)
    return float(loss.detach()), grad


def _harness_kwargs(gate: str) -> dict:
    return dict(gate=gate, nu=_nu(gate), tau_pos=TAU_POS, tau_neg=TAU_NEG, width="raw", eps_low=0.2, eps_high=0.2,
                ratio_level="token", agg="seq-mean-token-mean", kl_beta=0.0, log_ratio_clip=20.0, norm_length=None)


@pytest.mark.parametrize("gate", [*BUILTIN_GATES, "student"])
def test_compute_loss_equals_harness_objective(gate: str):
    """HarnessGRPOTrainer._compute_loss == policy_loss / gradient-accumulation steps, value and gradient."""
    worst = 0.0
    for seed in range(3):
        data = _tensors(seed)
        got, g_got = _run(HarnessGRPOTrainer, data, harness_loss_kwargs=_harness_kwargs(gate))
        ref, g_ref = _reference(data, gate)
        worst = max(worst, abs(got - ref), float((g_got - g_ref).abs().max()))
    assert worst <= 1e-6, f"{gate}: max abs diff {worst:.3g}"


def test_compute_loss_without_old_logps_is_on_policy():
    """old_per_token_logps=None (TRL skips them when aligned): r = 1, every gate gives the plain PG gradient."""
    data = _tensors(1)
    data.pop("old_per_token_logps")
    grads = [_run(HarnessGRPOTrainer, data, harness_loss_kwargs=_harness_kwargs(g))[1] for g in BUILTIN_GATES]
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-12, rtol=0)
    mask = data["completion_mask"].double()
    expected = -data["advantages"][:, None] * mask / mask.sum(-1, keepdim=True) / mask.shape[0] / GA
    assert torch.allclose(grads[0], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("gate", "loss_type"), [("sigmoid", "sapo"), ("clip", "grpo")])
def test_compute_loss_matches_trl_builtin(gate: str, loss_type: str):
    """Gradients equal TRL's own sapo / grpo loss exactly; values too after removing the constant
    (1 − 2/τ)·A (aggregated) by which SAPO's (4/τ)σ(τ(r − 1)) differs from the harness sigmoid gate."""
    for seed in range(3):
        data = _tensors(seed)
        got, g_got = _run(HarnessGRPOTrainer, data, harness_loss_kwargs=_harness_kwargs(gate))
        trl, g_trl = _run(GRPOTrainer, data, loss_type=loss_type)
        offset = 0.0
        if gate == "sigmoid":
            adv = data["advantages"][:, None].expand_as(data["_logp"])
            tau = torch.where(adv > 0, TAU_POS, TAU_NEG)
            offset = float(aggregate((1 - 2 / tau) * adv, data["completion_mask"].bool())) / GA
        assert abs(trl - (got + offset)) <= 1e-6, (trl, got, offset)
        assert float((g_trl - g_got).abs().max()) <= 1e-6


def test_vllm_importance_weights_fold_into_advantages():
    """TRL multiplies the per-token loss by vLLM importance weights w >= 0; gated_loss folds w into A. Same result."""
    data = _tensors(2)
    w = torch.rand(data["_logp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    data["importance_sampling_ratio"] = w
    vllm = dict(use_vllm=True, vllm_importance_sampling_correction=True)
    got, g_got = _run(HarnessGRPOTrainer, data, harness_loss_kwargs=_harness_kwargs("clip"), **vllm)
    trl, g_trl = _run(GRPOTrainer, data, loss_type="grpo", **vllm)
    assert abs(got - trl) <= 1e-12 and float((g_got - g_trl).abs().max()) <= 1e-12


def test_gated_loss_accepts_trl_advantage_shapes():
    data = _tensors(3)
    kw = _harness_kwargs("erf")
    args = (data["_logp"], data["old_per_token_logps"])
    a, _ = gated_loss(*args, data["advantages"], data["completion_mask"], kw)
    b, _ = gated_loss(*args, data["advantages"][:, None], data["completion_mask"], kw)
    c, _ = gated_loss(*args, data["advantages"][:, None].expand_as(data["_logp"]), data["completion_mask"], kw)
    assert float(a) == float(b) == float(c)


# ----------------------------------------------------------------------------- rewards and config


def test_reward_functions_take_text_and_messages():
    good = "<think> 2+3=5 </think> <answer> 5 </answer>"
    assert format_reward([good, "5"]) == [1.0, 0.0]
    assert accuracy_reward([good, "<think></think> <answer>6</answer>"], answer=["5", "5"]) == [1.0, 0.0]
    # conversational prompts make TRL pass message lists
    assert accuracy_reward([[{"role": "assistant", "content": good}]], answer=["5"]) == [1.0]


def test_paper_preset_maps_onto_grpo_config():
    from trl import GRPOConfig

    cfg = compose(["backend=trl", "train=paper", "backend.device=cpu", "output_dir=/tmp/unused"])
    # The paper's 8 GPUs (Table 2): per-device batch 1, 16 accumulation steps, 128 completions per optimizer step.
    kw = grpo_config_kwargs(cfg, "/tmp/unused", world_size=8)
    assert kw["num_generations"] == 8 and kw["max_completion_length"] == 512
    assert kw["per_device_train_batch_size"] == 1 and kw["gradient_accumulation_steps"] == 16
    assert kw["steps_per_generation"] == 16 and kw["num_iterations"] == 2
    assert kw["loss_type"] == "grpo"  # seq-mean-token-mean, SAPO's aggregation
    assert kw["max_steps"] == 5000 and kw["use_cpu"] and not kw["bf16"] and not kw["use_vllm"]
    assert (kw["learning_rate"], kw["warmup_steps"], kw["lr_scheduler_type"]) == (1e-6, 0, "linear")
    assert (kw["adam_beta1"], kw["adam_beta2"], kw["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    # the gate's own keys only: τ for the default sigmoid, ε for clip
    assert (kw["sapo_temperature_pos"], kw["sapo_temperature_neg"]) == (1.0, 1.05) and "epsilon" not in kw
    clip = grpo_config_kwargs(compose(["backend=trl", "train=paper", "backend.device=cpu", "output_dir=/tmp/unused",
                                       "gate=clip", "gate.eps_high=0.28"]), "/tmp/unused", world_size=8)
    assert (clip["epsilon"], clip["epsilon_high"]) == (0.2, 0.28) and "sapo_temperature_pos" not in clip
    # one process: the same 128-completion batch, accumulated over 128 micro-batches of 1
    one = grpo_config_kwargs(cfg, "/tmp/unused", world_size=1)
    assert one["gradient_accumulation_steps"] == one["steps_per_generation"] == 128 and one["max_steps"] == 5000
    args = GRPOConfig(**{**one, "reward_weights": [1.0, 1.0]})
    assert args.generation_batch_size == 128 and args.generation_batch_size % args.num_generations == 0


def test_config_errors_name_the_key():
    cfg = compose(["backend=trl", "backend.device=cpu", "backend.use_vllm=true", "output_dir=/tmp/unused"])
    with pytest.raises(ValueError, match="use_vllm"):
        grpo_config_kwargs(cfg, "/tmp/unused")
    cfg = compose(["backend=trl", "backend.device=cuda:1", "output_dir=/tmp/unused"])
    with pytest.raises(ValueError, match=r"backend\.device"):
        grpo_config_kwargs(cfg, "/tmp/unused")
    cfg = compose(["backend=trl", "backend.device=cpu", "+backend.grpo_config.top_entropy_quantile=0.5",
                   "output_dir=/tmp/unused"])
    from harness.backends.trl_config import validate_trl_config

    with pytest.raises(ValueError, match="top_entropy_quantile"):
        validate_trl_config(cfg)


# ----------------------------------------------------------------------------- a real run on CPU


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory, cache_dir: Path):
    from omegaconf import open_dict

    from harness.backends.trl import train

    out = tmp_path_factory.mktemp("trl")
    cfg = compose(["backend=trl", "backend.device=cpu", "backend.threads=2", "backend.progress=false",
                   "train.steps=3", "train.rollout_batch_size=16", "train.num_generations=8",
                   "train.micro_batch_size=8", "train.max_new_tokens=16", "train.warmup_steps=0",
                   "train.rollout_temperature=1.0", "train.save_every=3", "eval.enabled=false",
                   f"cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    calls: list[tuple[int, dict]] = []
    result = train(cfg, on_step=lambda step, metrics: calls.append((step, metrics)))
    return result, calls


def test_trl_trains_tiny_model_on_cpu(trl_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, calls = trl_run
    assert [s for s, _ in calls] == [1, 2, 3]
    assert [h["step"] for h in result.history] == [1.0, 2.0, 3.0]
    for h in result.history:
        for key in ("reward", "reward_format", "reward_accuracy", "response_length", "entropy", "loss", "grad_norm",
                    "lr", "it1/abs_ratio_dev", "it2/abs_ratio_dev", "it2/gate_weight", "it2/ratio_p95", "it2/eur"):
            assert key in h and math.isfinite(h[key]), key
        assert h["it1/eur"] == 1.0 and 0.0 < h["it2/eur"] <= 1.0  # EUR by prompt group (eq. 12)
        # first pass on-policy (TRL passes no old log-probs: r == 1 exactly); the second is off-policy unless
        # every group had equal rewards (zero gradient, and Adam's first step with zero moments moves nothing)
        assert h["it1/abs_ratio_dev"] == 0.0
        assert h["it2/abs_ratio_dev"] > 0.0 or h["zero_var_frac"] == 1.0
    assert any(h["it2/abs_ratio_dev"] > 0.0 for h in result.history)
    assert result.final_checkpoint == result.checkpoints[-1]
    assert result.final_checkpoint.name == "checkpoint-6"  # 3 steps x 2 optimizer updates
    AutoModelForCausalLM.from_pretrained(result.final_checkpoint)
    AutoTokenizer.from_pretrained(result.final_checkpoint)


def test_mini_batches_map_onto_steps_per_generation(tmp_path, cache_dir: Path):
    """train.mini_batch_size: TRL generates once per rollout batch (steps_per_generation) and steps the optimizer
    once per mini-batch (gradient_accumulation_steps); the harness history still has one entry per rollout batch,
    and the first pass is already off-policy after its first mini-batch."""
    from omegaconf import open_dict

    from harness.backends.trl import train

    cfg = compose(["backend=trl", "backend.device=cpu", "backend.threads=2", "backend.progress=false",
                   "train.steps=2", "train.rollout_batch_size=16", "train.num_generations=8",
                   "train.mini_batch_size=8", "train.micro_batch_size=4", "train.max_new_tokens=16",
                   "train.warmup_steps=0", "train.rollout_temperature=1.0", "train.save_every=2",
                   "train.lr=1e-3", "eval.enabled=false", f"cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    kw = grpo_config_kwargs(cfg, tmp_path, world_size=1)
    assert (kw["steps_per_generation"], kw["gradient_accumulation_steps"], kw["max_steps"]) == (4, 2, 8)
    calls: list[int] = []
    result = train(cfg, on_step=lambda step, metrics: calls.append(step))
    assert calls == [1, 2] and [h["step"] for h in result.history] == [1.0, 2.0]
    assert result.final_checkpoint.name == "checkpoint-8"  # 2 steps x 2 passes x 2 mini-batches
    trained = [h for h in result.history if h["zero_var_frac"] < 1]
    assert trained
    for h in result.history:
        # the ratio statistics are over rows with A != 0: a step where every group has zero variance has none (as
        # on the native backend), whichever micro-batch or process its rows landed in
        ratio_keys = ("it1/abs_ratio_dev", "it2/abs_ratio_dev") if h in trained else ()
        for key in ("reward", "reward_accuracy", "grad_norm", "it2/loss", "it2/eur", *ratio_keys):
            assert key in h and math.isfinite(h[key]), key
        assert h in trained or "it1/abs_ratio_dev" not in h
    assert any(h["it1/abs_ratio_dev"] > 1e-4 for h in trained)
    assert any(h["it2/abs_ratio_dev"] > h["it1/abs_ratio_dev"] for h in trained)


# ----------------------------------------------------------------------------- EUR: TRL and native on one batch


def test_eur_agrees_with_the_native_backend_on_the_same_batch(tmp_path, cache_dir: Path, monkeypatch):
    """A native step recorded per pass (every completion's log-probs, behaviour log-probs, advantages, mask) goes
    through the TRL backend's own code, ``_compute_loss`` per micro-batch (the native mini-batches, rows shuffled
    within them; zero-advantage rows left out of the forward, their log-probs from the measuring forward once the
    weights have moved, r = 1 before) and ``_finish_window`` per pass: its EUR (eq. 12 over every prompt) equals
    the native backend's."""
    from harness.backends.native import train as native_train
    from harness.objective import loss_kwargs
    from tests.test_native_trainer import RECORDED, _cfg, record_diagnostics

    calls = record_diagnostics(monkeypatch)
    cfg = _cfg(tmp_path, cache_dir, *RECORDED, "gate=erf")
    step = native_train(cfg).history[0]
    passes = calls[:2]  # the first step's two passes
    T = passes[0]["logp"].shape[1]
    adv, mask, old = passes[0]["adv"], passes[0]["mask"].long(), passes[0]["old"]
    assert torch.equal(passes[1]["old"], old)
    minis = [torch.randperm(16, generator=torch.Generator().manual_seed(m)) + 16 * m for m in range(2)]
    mixed = [bool((adv[m] == 0).any() and (adv[m] != 0).any()) for m in minis]
    assert any(mixed), "the batch needs a micro-batch that mixes zero-variance and learning groups"

    table: list[torch.Tensor] = []  # the current pass's log-probs, looked up by the row id in the prompt

    def forward(model, input_ids, attention_mask, logits_to_keep, **_):
        logp = table[0][input_ids[:, 0]].clone().requires_grad_(True)
        return logp, torch.zeros_like(logp), None

    args = SimpleNamespace(steps_per_generation=2, gradient_accumulation_steps=1)
    trainer = _fake_trainer(HarnessGRPOTrainer, passes[0]["logp"], _get_per_token_logps_and_entropies=forward,
                            args=args, num_iterations=2, current_gradient_accumulation_steps=1,
                            harness_loss_kwargs=loss_kwargs(cfg), harness_skip_zero_advantage=True,
                            accelerator=SimpleNamespace(reduce=lambda t, reduction="sum": t, num_processes=1))
    for p in range(2):
        table[:] = [passes[p]["logp"]]
        for m, rows in enumerate(minis):
            trainer._step = 2 * p + m  # TRL's micro-step index while it computes a loss
            inputs = {"prompt_ids": rows[:, None], "prompt_mask": torch.ones(len(rows), 1, dtype=torch.long),
                      "completion_ids": torch.zeros(len(rows), T, dtype=torch.long), "completion_mask": mask[rows],
                      "advantages": adv[rows], "old_per_token_logps": old[rows], "harness_group": rows // 8}
            HarnessGRPOTrainer._compute_loss(trainer, torch.nn.Module(), inputs)
        trainer._step = 2 * p + 2
        trainer._finish_window()
        logged = trainer._harness_pending
        for key in ("eur", "eur_pos", "eur_neg"):
            assert logged[f"harness/{key}"] == pytest.approx(step[f"it{p + 1}/{key}"], abs=1e-6), (p, key)
    assert step["it2/eur"] < 1.0
