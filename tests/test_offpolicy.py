"""Off-policy regimes: stale rollouts (``train.staleness``), a sampler in another precision (``train.rollout_dtype``)
and the corrections of the objective (``train.loss.off_policy``), checked against a recorded synchronous run, stored
copies of the drawing weights, an independent computation, and TRL's and verl's own code."""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict

from harness.backends.native import train
from harness.config import ConfigError
from harness.objective import aggregate, importance_weights, kish_ess, policy_loss
from tests.conftest import REPO, compose_at, needs_verl, run_verl

SNAPSHOT = REPO / "tests" / "snapshots" / "native_sync_run.json"
SMALL = ["train.rollout_batch_size=32", "train.mini_batch_size=16", "train.micro_batch_size=8", "train.lr=1e-3",
         "backend.progress=false", "backend.threads=1", "eval.enabled=false"]


def _cfg(tmp_path: Path, cache_dir: Path, *extra: str):
    return compose_at(tmp_path, [*SMALL, f"cache_dir={cache_dir}", *extra])


def _close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=0, abs_tol=tol) or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "step_time_s"} for h in history]


# ----------------------------------------------------------------------------- the trainer


def test_synchronous_run_equals_the_recorded_one(tmp_path, cache_dir):
    """train.staleness=0 is the synchronous trainer: the run recorded by scripts/snapshot_native_run.py, metric for
    metric at every step and weight for weight (per-tensor sums; the SHA-256 matches on the machine that recorded)."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from snapshot_native_run import OVERRIDES, machine, run

    snap = json.loads(SNAPSHOT.read_text())
    if snap["machine"] != machine():
        pytest.skip(f"the snapshot was recorded on {snap['machine']}, this is {machine()}: the sampled tokens may "
                    "differ; rerun scripts/snapshot_native_run.py at the commit it names to record this machine")
    got = run([*OVERRIDES, "train.staleness=0", "train.loss.off_policy.mode=none"], str(cache_dir))
    assert len(got["history"]) == len(snap["history"]) == 3
    for step, (a, b) in enumerate(zip(snap["history"], got["history"], strict=True)):
        assert _close(a, b), f"step {step + 1}: {set(a) ^ set(b) or {k for k in a if a[k] != b[k]}}"
    for name, (s, sq) in snap["weights"]["sums"].items():
        gs, gsq = got["weights"]["sums"][name]
        assert math.isclose(s, gs, rel_tol=1e-6, abs_tol=1e-6) and math.isclose(sq, gsq, rel_tol=1e-6), name
    assert "policy_lag" not in got["history"][0]  # a synchronous run's history keeps its keys


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("stale")
    cfg = _cfg(out, cache_dir, "train.steps=4", "train.staleness=2", "train.save_every=1",
               "train.keep_checkpoints=null")
    return cfg, train(cfg)


def test_stale_rollouts_were_drawn_by_the_weights_of_step_s_minus_k(stale_run):
    """Each queued batch's behaviour log-probs equal a recomputation under the stored weights of the step that drew
    it (s − k, the initial weights for s < k), and not under the next step's weights."""
    from harness.backends.checkpoints import load_state
    from harness.backends.native import RolloutBatch
    from harness.backends.sampling import token_logprobs
    from harness.models import load_model_and_tokenizer

    cfg, result = stale_run
    k = cfg.train.staleness
    assert [h["policy_lag"] for h in result.history] == [min(s, k) for s in range(4)]
    weights = {0: result.initial_checkpoint, **{int(p.name.split("-")[1]): p for p in result.checkpoints}}
    models = {}

    def logp_under(step: int, batch: RolloutBatch) -> torch.Tensor:
        if step not in models:
            models[step] = load_model_and_tokenizer({"path": str(weights[step])}, device=torch.device("cpu"),
                                                    dtype="float32")[0].eval()
        attn = torch.cat([batch.prompt_mask.repeat_interleave(cfg.train.num_generations, 0),
                          batch.completion_mask.long()], dim=1)
        with torch.no_grad():
            return token_logprobs(models[step], batch.seqs, attn, batch.completion_mask.shape[1],
                                  cfg.train.rollout_temperature)[0]

    checked = 0
    for saved in result.checkpoints[:-1]:
        for entry in load_state(saved)["rollout_queue"]:
            batch = RolloutBatch(**entry)
            assert batch.drawn_at == max(0, batch.step - k)
            mask = batch.completion_mask
            drew = (logp_under(batch.drawn_at, batch) - batch.behaviour_logp)[mask].abs().max()
            later = (logp_under(batch.drawn_at + 1, batch) - batch.behaviour_logp)[mask].abs().max()
            assert drew < 1e-4, (batch.step, float(drew))
            assert later > 100 * drew, (batch.step, float(drew), float(later))
            checked += 1
    assert checked == 2 * (len(result.checkpoints) - 1)


def test_first_pass_ratios_move_only_when_rollouts_are_stale(stale_run):
    _, result = stale_run
    h = result.history
    assert h[0]["it1/abs_ratio_dev_p95"] < 0.01  # lag 0: the sampler's own weights (up to its float rounding)
    assert all(x["it1/abs_ratio_dev_p95"] > 0.02 or x["no_signal"] for x in h[2:])


def test_killed_and_resumed_stale_run_matches_uninterrupted(stale_run, tmp_path, cache_dir):
    """The queue of rollouts drawn ahead is part of the checkpoint: a resumed stale run is the same run."""
    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 3:
            raise Killed  # after step 3's metrics, before its checkpoint: resumes from step 2 with 2 batches queued

    _, uninterrupted = stale_run
    again = _cfg(tmp_path, cache_dir, "train.steps=4", "train.staleness=2", "train.save_every=1",
                 "train.keep_checkpoints=null")
    with pytest.raises(Killed):
        train(again, on_step=kill)
    with open_dict(again):
        again.resume = True
    resumed = train(again)
    for a, b in zip(_strip(uninterrupted.history), _strip(resumed.history), strict=True):
        assert _close(a, b)


def test_sampling_precision_is_a_behaviour_policy(tmp_path, cache_dir):
    """train.rollout_dtype=bfloat16: the sampler's own log-probs differ from the float32 trainer's, so the first
    update's ratios are no longer 1 (one optimizer step per pass: nothing else moves them)."""
    one = ["train.steps=1", "train.mini_batch_size=null"]
    fp32 = train(_cfg(tmp_path / "a", cache_dir, *one)).history[0]
    bf16 = train(_cfg(tmp_path / "b", cache_dir, *one, "train.rollout_dtype=bfloat16")).history[0]
    assert fp32["it1/abs_ratio_dev"] < 1e-6
    assert bf16["it1/abs_ratio_dev"] > 1e-3 and bf16["policy_lag"] == 0


@pytest.mark.parametrize("mode", ["decoupled", "tis", "mis"])
def test_corrections_train_and_log_their_weights(tmp_path, cache_dir, mode):
    h = train(_cfg(tmp_path, cache_dir, "train.steps=3", "train.staleness=1",
                   f"train.loss.off_policy.mode={mode}")).history
    trained = [x for x in h if not x["no_signal"]]
    assert trained and all(0 < x["it1/is_ess"] <= 1 and 0 <= x["it1/is_capped_frac"] <= 1 for x in trained)
    # with a correction the gate sees π_θ/π_prox: the first mini-batch's first update is on-policy again
    assert all(x["it1/abs_ratio_dev"] < h[-1]["it2/abs_ratio_dev"] for x in trained)


@pytest.mark.parametrize(("override", "match"), [
    ("train.staleness=-1", "train.staleness must be an integer >= 0"),
    ("train.rollout_dtype=int8", "train.rollout_dtype must be null"),
    ("train.loss.off_policy.mode=bogus", "train.loss.off_policy.mode must be one of none, decoupled, tis, mis"),
    ("train.loss.off_policy.level=sequence", "train.loss.off_policy.level must be one of token with mode=decoupled"),
    ("train.loss.off_policy.cap=0", "train.loss.off_policy.cap must be a finite number > 0"),
    ("backend=trl", "off-policy regimes run on backend=native only"),
])
def test_bad_off_policy_settings_fail_before_compute(tmp_path, cache_dir, override, match):
    extra = ["train.staleness=1", "train.loss.off_policy.mode=decoupled"] if "level" in override or "trl" in override \
        else []
    with pytest.raises((ValueError, ConfigError), match=match):
        train(_cfg(tmp_path, cache_dir, *extra, override))
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- the weights and the loss


def _tensors(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    prox = behaviour + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = prox + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate(torch.randint(1, T + 1, (B,), generator=g).tolist()):
        mask[i, n:] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return behaviour, prox, logp, mask, adv


def _weights_by_hand(prox, behaviour, mask, mode, level, cap, cap_low):
    """Token by token in plain Python: the formulas of the objective's docstring."""
    out = torch.zeros_like(prox)
    for i in range(prox.shape[0]):
        seq = sum(float(prox[i, t] - behaviour[i, t]) for t in range(prox.shape[1]) if mask[i, t])
        for t in range(prox.shape[1]):
            if not mask[i, t]:
                continue
            w = math.exp(seq if level == "sequence" else float(prox[i, t] - behaviour[i, t]))
            if mode == "tis":
                w = min(w, cap) if cap_low is None else min(max(w, cap_low), cap)
            elif w > cap or (mode == "mis" and cap_low is not None and w < cap_low):
                w = 0.0
            out[i, t] = w
    return out


CASES = [("tis", "token", 2.0, None), ("tis", "sequence", 3.0, 0.5), ("mis", "token", 2.0, 0.5),
         ("mis", "sequence", 3.0, None), ("decoupled", "token", 1.5, None)]


@pytest.mark.parametrize(("mode", "level", "cap", "cap_low"), CASES)
def test_importance_weights_equal_the_formula(mode, level, cap, cap_low):
    for seed in range(3):
        behaviour, prox, _, mask, _ = _tensors(seed)
        got = importance_weights(prox, behaviour, mask, mode=mode, level=level, cap=cap, cap_low=cap_low)
        assert torch.allclose(got, _weights_by_hand(prox, behaviour, mask, mode, level, cap, cap_low),
                              rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("mode", "level", "cap", "cap_low"), CASES)
def test_corrected_loss_is_the_gate_surrogate_times_the_detached_weight(mode, level, cap, cap_low):
    from harness.gates import get_gate

    behaviour, prox, logp, mask, adv = _tensors(7)
    kw = dict(off_policy=mode, is_level=level, is_cap=cap, is_cap_low=cap_low, tau_pos=1.0, tau_neg=1.05)
    x = logp.clone().requires_grad_(True)
    loss, diag = policy_loss(x, prox, adv, mask, gate="erf", behaviour_logp=behaviour, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_(True)
    w = _weights_by_hand(prox, behaviour, mask, mode, level, cap, cap_low)
    a = adv[:, None].expand_as(y)
    tau = torch.where(a > 0, 1.0, 1.05)
    expected = aggregate(-get_gate("erf").surrogate(torch.exp(y - prox), a, tau) * w, mask)
    (grad_expected,) = torch.autograd.grad(expected, y)
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-9
    assert torch.allclose(grad, grad_expected, rtol=0, atol=1e-9)
    raw = _weights_by_hand(prox, behaviour, mask, "tis", level, 1e300, None)[mask]
    assert diag["is_ess"] == pytest.approx(kish_ess(raw)) and diag["is_weight"] == pytest.approx(float(w[mask].mean()))


def test_the_weight_leaves_the_kl_term_alone():
    behaviour, prox, logp, mask, adv = _tensors(3)
    ref = prox - 0.2
    common = dict(gate="clip", ref_logp=ref, kl_beta=0.5, diagnostics=False)
    with_w, _ = policy_loss(logp, prox, adv, mask, behaviour_logp=behaviour, off_policy="tis", **common)
    pg_w, _ = policy_loss(logp, prox, adv, mask, behaviour_logp=behaviour, off_policy="tis", gate="clip")
    only_kl, _ = policy_loss(logp, prox, torch.zeros_like(adv), mask, gate="clip", ref_logp=ref, kl_beta=0.5,
                             diagnostics=False)
    assert float(with_w) == pytest.approx(float(pg_w) + float(only_kl), abs=1e-12)


# ----------------------------------------------------------------------------- TRL's and verl's own code

TRL_MODES = {("tis", "token"): "token_truncate", ("tis", "sequence"): "sequence_truncate",
             ("mis", "token"): "token_mask", ("mis", "sequence"): "sequence_mask"}


def _trl_weights(prox, behaviour, mask, trl_mode, cap, cap_low):
    """TRL's own importance-sampling code, run as it stands in the installed GRPOTrainer: the block of
    ``_generate_and_score_completions`` that turns trainer and vLLM log-probs into ``importance_sampling_ratio``
    (it is inline there, not a function), executed on these tensors."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("# Compute the importance sampling ratio when using vLLM")
    end = source.index("# Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(source[source.rindex("\n", 0, start) + 1:source.rindex("\n", 0, end) + 1])
    trainer = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                              vllm_importance_sampling_mode=trl_mode, vllm_importance_sampling_clip_max=cap,
                              vllm_importance_sampling_clip_min=cap_low)
    scope = {"self": trainer, "torch": torch, "math": math, "completion_mask": mask.long(), "tool_mask": None,
             "old_per_token_logps": prox, "sampling_per_token_logps": behaviour}
    exec(compile(block, "trl.GRPOTrainer._generate_and_score_completions", "exec"), scope)
    return scope["vllm_importance_sampling_ratio"].expand_as(prox)


@pytest.mark.parametrize(("mode", "level", "cap", "cap_low"), [c for c in CASES if c[0] != "decoupled"])
def test_weights_equal_trls_own_code(mode, level, cap, cap_low):
    pytest.importorskip("trl")
    for seed in range(3):
        behaviour, prox, _, mask, _ = _tensors(seed)
        theirs = _trl_weights(prox, behaviour, mask, TRL_MODES[(mode, level)], cap, cap_low)
        ours = importance_weights(prox, behaviour, mask, mode=mode, level=level, cap=cap, cap_low=cap_low)
        assert float((theirs - ours)[mask].abs().max()) <= 1e-6


@pytest.mark.parametrize(("mode", "level"), list(TRL_MODES))
def test_corrected_clip_loss_equals_trls_compute_loss(mode, level):
    """TRL's GRPOTrainer._compute_loss (loss_type grpo, vLLM importance sampling on) with the weights its own code
    computes == policy_loss(gate=clip, off_policy=...) / accumulation steps, value and gradient."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    from tests.test_backend_trl import GA, _run

    behaviour, prox, logp, mask, adv = _tensors(11)
    data = {"prompt_ids": torch.ones(6, 3, dtype=torch.long), "prompt_mask": torch.ones(6, 3, dtype=torch.long),
            "completion_ids": torch.ones(6, 9, dtype=torch.long), "completion_mask": mask.long(), "advantages": adv,
            "old_per_token_logps": prox, "_logp": logp,
            "importance_sampling_ratio": _trl_weights(prox, behaviour, mask, TRL_MODES[(mode, level)], 3.0, None)}
    trl_loss, trl_grad = _run(GRPOTrainer, data, loss_type="grpo", use_vllm=True,
                              vllm_importance_sampling_correction=True)
    x = logp.clone().requires_grad_(True)
    ours, _ = policy_loss(x, prox, adv, mask, gate="clip", behaviour_logp=behaviour, off_policy=mode,
                          is_level=level, is_cap=3.0, diagnostics=False)
    (grad,) = torch.autograd.grad(ours / GA, x)
    assert abs(trl_loss - float(ours.detach()) / GA) <= 1e-6 and float((trl_grad - grad).abs().max()) <= 1e-6


_VERL_WEIGHTS = textwrap.dedent(r'''
    import json, sys
    import torch
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    from verl.workers.config import FSDPActorConfig

    cases = json.loads(sys.argv[1])
    out = []
    for case in cases:
        prox, behaviour, logp, adv = (torch.tensor(case[k], dtype=torch.float64)
                                      for k in ("prox", "behaviour", "logp", "adv"))
        mask = torch.tensor(case["mask"])
        w, _ = compute_rollout_correction_weights(prox - behaviour, mask.double(), rollout_is=case["level"],
                                                  rollout_is_threshold=case["threshold"])
        cfg = FSDPActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                              clip_ratio_high=0.2)
        x = logp.clone().requires_grad_(True)
        loss, _ = get_policy_loss_fn("vanilla")(prox, x, adv[:, None].expand_as(x), mask, "seq-mean-token-mean",
                                                cfg, rollout_is_weights=w)
        (grad,) = torch.autograd.grad(loss, x)
        out.append({"weights": w.tolist(), "loss": float(loss), "grad": grad.tolist()})
    print("VERL" + json.dumps(out))
''')


@needs_verl
def test_weights_and_corrected_loss_equal_verls_own_code():
    """verl's compute_rollout_correction_weights (TIS: one threshold; IcePop: "low_high") == importance_weights
    (tis / mis), and verl's registered ``vanilla`` loss with those weights == policy_loss(gate=clip, off_policy=...),
    value and gradient. verl's TIS has no lower bound; its IcePop keeps [low, high]."""
    cases, ours = [], []
    for seed, (mode, level, cap, cap_low) in enumerate([("tis", "token", 2.0, None), ("tis", "sequence", 3.0, None),
                                                        ("mis", "token", 2.0, 0.5), ("mis", "sequence", 3.0, 0.2)]):
        behaviour, prox, logp, mask, adv = _tensors(20 + seed)
        threshold = cap if mode == "tis" else f"{cap_low}_{cap}"
        cases.append({"prox": prox.tolist(), "behaviour": behaviour.tolist(), "logp": logp.tolist(),
                      "adv": adv.tolist(), "mask": mask.tolist(), "level": level, "threshold": threshold})
        w = importance_weights(prox, behaviour, mask, mode=mode, level=level, cap=cap, cap_low=cap_low)
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, prox, adv, mask, gate="clip", behaviour_logp=behaviour, off_policy=mode,
                              is_level=level, is_cap=cap, is_cap_low=cap_low, diagnostics=False)
        (grad,) = torch.autograd.grad(loss, x)
        ours.append((w, float(loss), grad))
    proc = run_verl(_VERL_WEIGHTS, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.split("VERL", 1)[1])
    for (w, loss, grad), t in zip(ours, theirs, strict=True):
        assert float((torch.tensor(t["weights"], dtype=torch.float64) - w).abs().max()) <= 1e-6
        assert abs(t["loss"] - loss) <= 1e-6
        assert float((torch.tensor(t["grad"], dtype=torch.float64) - grad).abs().max()) <= 1e-6
