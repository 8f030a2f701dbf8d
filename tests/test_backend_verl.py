"""The verl backend: overrides (snapshot), data files, metrics parsing, and — in the verl virtualenv — the
registered losses (parity with the harness objective and verl's own sapo/vanilla), plugin loading in fresh
processes, verl's own Hydra schema accepting the overrides, and how far a CPU-only main_ppo run gets.

verl pins transformers<5.11, so it lives in ``.venv-verl`` (``scripts/install_verl.sh``); the tests that need
it run there as subprocesses and are skipped when it is missing (``HARNESS_VERL_PYTHON`` overrides the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness.backends.verl import (
    _hydra_value,
    hf_checkpoints,
    read_metrics,
    verl_overrides,
    verl_rows,
    write_parquet,
)
from harness.backends.verl_plugin import compute_score, loss_name, registered_loss_names
from harness.gates import BUILTIN_GATES, RATIO_CONTROL
from tests.conftest import REPO, VERL_PYTHON, compose, needs_verl, run_verl

SNAPSHOTS = Path(__file__).parent / "snapshots"
# The built-in gates' loss names (other tests in the session may register more gates in this process).
EXPECTED = sorted(["harness_sigmoid", "harness_erf", "harness_arctan", "harness_softsign", "harness_softsign_abs",
                   "harness_student", "harness_custom", *(f"harness_{name}" for name in RATIO_CONTROL)])
UPDATE = os.environ.get("HARNESS_UPDATE_SNAPSHOTS") == "1"


def _paper_cfg(*extra: str):
    """The paper preset on verl, whose FSDP optimizer has no linear schedule: cosine (also decaying to 0) instead."""
    from omegaconf import open_dict

    cfg = compose(["backend=verl", "train=paper", "train.lr_schedule=cosine", *extra])
    with open_dict(cfg):
        cfg.output_dir = "/runs/paper"
    return cfg


# ----------------------------------------------------------------------------- pure (main environment)


def test_linear_schedule_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"train\.lr_schedule='linear' is not supported by verl.*constant, cosine"):
        verl_overrides(_paper_cfg("train.lr_schedule=linear"))


def test_paper_overrides_snapshot():
    """The paper preset's verl command line; refresh with HARNESS_UPDATE_SNAPSHOTS=1 after a deliberate change."""
    got = verl_overrides(_paper_cfg(), model_path="/models/policy", max_prompt_length=256)
    path = SNAPSHOTS / "verl_overrides_paper.txt"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(got) + "\n")
    assert path.exists(), f"missing snapshot {path}: run with HARNESS_UPDATE_SNAPSHOTS=1 once and review it"
    assert got == path.read_text().splitlines()


def test_mini_batches_map_to_ppo_mini_batch_size():
    """verl counts mini-batches in prompts: 256 rollouts in mini-batches of 64 = 32 prompts, 8 per optimizer step."""
    arr = "actor_rollout_ref"
    ov = dict(o.split("=", 1) for o in verl_overrides(_paper_cfg("train=default")))
    assert (ov["data.train_batch_size"], ov[f"{arr}.actor.ppo_mini_batch_size"]) == ("32", "8")
    with pytest.raises(ValueError, match=r"train\.mini_batch_size=36 must be divisible by train\.num_generations=8"):
        verl_overrides(_paper_cfg("train=default", "train.rollout_batch_size=288", "train.mini_batch_size=36",
                                  "train.micro_batch_size=4"))


def test_overrides_carry_the_recipe():
    ov = dict(o.split("=", 1) for o in verl_overrides(_paper_cfg("gate=erf", "gate.tau_pos=2.0", "gate.width=hwhm")))
    arr = "actor_rollout_ref"
    assert ov[f"{arr}.actor.ppo_epochs"] == "2"  # num_iterations
    assert ov[f"{arr}.rollout.n"] == "8"  # num_generations
    assert ov["data.max_response_length"] == "512"
    assert ov[f"{arr}.actor.loss_agg_mode"] == "seq-mean-token-mean"
    assert ov[f"{arr}.actor.policy_loss.loss_mode"] == "harness_erf"
    assert ov[f"{arr}.actor.tau_pos"] == "2.0" and ov[f"{arr}.actor.tau_neg"] == "1.05"
    assert ov["data.train_batch_size"] == ov[f"{arr}.actor.ppo_mini_batch_size"] == "16"  # 128 rollouts / 8
    assert ov[f"{arr}.actor.optim.override_optimizer_config"] == "{eps:1e-08}"
    assert ov[f"{arr}.actor.optim.betas"] == "[0.9,0.999]" and ov[f"{arr}.actor.optim.lr_warmup_steps"] == "0"
    assert ov["+reward.custom_reward_function.reward_kwargs.format_mode"] == "graded"
    assert ov["trainer.total_training_steps"] == "2500"  # x ppo_epochs 2 = the paper's 5,000 optimizer steps
    assert ov[f"{arr}.actor.ppo_micro_batch_size_per_gpu"] == "1"
    assert ov["reward.custom_reward_function.path"] == "'pkg://harness.backends.verl_plugin'"
    assert ov["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"] == "'harness.backends.verl_plugin'"
    assert ov["+ray_kwargs.ray_init.runtime_env.env_vars.HARNESS_VERL_WIDTH"] == "'hwhm'"
    assert "+ray_kwargs.ray_init.address" not in ov
    ov = dict(o.split("=", 1) for o in verl_overrides(_paper_cfg("backend.ray_address=auto", "train.loss.kl_beta=0.01",
                                                                 "backend.extra_overrides=['trainer.balance_batch=false']")))
    assert ov["+ray_kwargs.ray_init.address"] == "auto"
    assert ov[f"{arr}.actor.use_kl_loss"] == "true" and ov[f"{arr}.actor.kl_loss_coef"] == "0.01"
    assert ov["trainer.balance_batch"] == "false"


def test_custom_gate_goes_through_the_environment():
    cfg = _paper_cfg("gate=custom", "gate.name=tests.custom_gate_module:F")
    ov = dict(o.split("=", 1) for o in verl_overrides(cfg))
    assert ov["actor_rollout_ref.actor.policy_loss.loss_mode"] == "harness_custom"
    assert ov["+ray_kwargs.ray_init.runtime_env.env_vars.HARNESS_VERL_GATE"] == "'tests.custom_gate_module:F'"
    assert loss_name("clip") == "harness_clip" and "harness_custom" in registered_loss_names()


def test_hydra_values():
    assert _hydra_value(True) == "true" and _hydra_value(None) == "null" and _hydra_value(3) == "3"
    assert _hydra_value(1e-6) == "1e-06" and _hydra_value("fsdp") == "fsdp"
    assert _hydra_value("/a b/c") == "'/a b/c'" and _hydra_value(["x", 1.5]) == "[x,1.5]"
    assert _hydra_value("it's") == "'it\\'s'"


def test_bad_config_is_rejected_before_launch():
    with pytest.raises(ValueError, match="divisible"):
        verl_overrides(_paper_cfg("train.rollout_batch_size=12"))


def test_data_in_verl_format(tmp_path: Path):
    import pyarrow.parquet as pq

    from harness.prompts import PromptConfig

    problems = [{"id": "a-1", "problem": "2+3", "answer": "5"}, {"id": "a-2", "problem": "7*6", "answer": "42"}]
    path = write_parquet(verl_rows(problems, PromptConfig(template="{problem}", system_prompt=None), task_name="arith",
                                   split="train"), tmp_path / "train.parquet")
    rows = pq.read_table(path).to_pylist()
    assert rows[1]["data_source"] == "harness/arith"
    assert rows[1]["prompt"] == [{"role": "user", "content": "7*6"}]
    assert rows[1]["reward_model"] == {"style": "rule", "ground_truth": "42"}
    assert rows[1]["extra_info"]["id"] == "a-2" and rows[1]["extra_info"]["index"] == 1


def test_reward_is_the_native_reward():
    good = "<think> 2+3=5 </think> <answer> 5 </answer>"
    assert compute_score("harness/arith", good, "5") == {"score": 2.0, "format": 1.0, "accuracy": 1.0}
    assert compute_score("harness/arith", "5", "5")["score"] == 0.0  # no <answer> span: no fallbacks in training
    # ... unless train.rewards.accuracy_fallbacks names some (the reward of harness.rewards, as on every backend)
    assert compute_score("harness/arith", "so 5", "5", accuracy_fallbacks=["last_number"])["score"] == 1.0
    assert compute_score("harness/arith", good, "5", format_weight=0.5, accuracy_weight=2.0)["score"] == 2.5


def test_metrics_are_read_incrementally(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "data": {"critic/score/mean": 0.5, "actor/harness/abs_ratio_dev": 0.1}}\n'
                     b'{"step": 2, "data": {"critic/sc')
    entries, offset = read_metrics(path)
    assert [e["step"] for e in entries] == [1.0] and entries[0]["reward"] == 0.5
    assert entries[0]["abs_ratio_dev"] == 0.1 and entries[0]["verl/critic/score/mean"] == 0.5
    with path.open("ab") as fh:
        fh.write(b'ore/mean": 0.75}}\n')
    entries, offset = read_metrics(path, offset)
    assert [e["reward"] for e in entries] == [0.75]
    path.write_bytes(b'{"step": 3, "data": {"critic/score/mean": 1.0}}\n')  # a resumed verl run truncates the file
    entries, _ = read_metrics(path, offset)
    assert [e["step"] for e in entries] == [3.0]


def test_hf_checkpoints_are_found(tmp_path: Path):
    for step in (10, 2):
        hf = tmp_path / f"global_step_{step}" / "actor" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        (hf / "model.safetensors").write_bytes(b"")
    (tmp_path / "global_step_20" / "actor" / "huggingface").mkdir(parents=True)  # config only: not a model
    assert [p.parent.parent.name for p in hf_checkpoints(tmp_path)] == ["global_step_2", "global_step_10"]


# ----------------------------------------------------------------------------- in the verl environment


# Runs in the verl virtualenv: registration through VERL_USE_EXTERNAL_MODULES, loss parity, and verl's own
# Hydra config + dataclasses accepting the harness overrides. Prints one JSON object.
_PROBE = textwrap.dedent(r'''
    import json, os, sys
    import torch
    import verl  # loads harness.backends.verl_plugin through VERL_USE_EXTERNAL_MODULES
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig
    from harness.gates import BUILTIN_GATES
    from harness.objective import policy_loss

    out = {"registered": sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("harness_"))}
    TP, TN = 1.0, 1.05

    def tensors(seed, B=6, T=9):
        g = torch.Generator().manual_seed(seed)
        old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
        lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        mask = torch.ones(B, T, dtype=torch.bool)
        for i, n in enumerate(torch.randint(1, T + 1, (B,), generator=g).tolist()):
            mask[i, n:] = False
        adv = torch.randn(B, generator=g, dtype=torch.float64)
        adv[0] = 0.0
        return old, lp, adv[:, None].expand(B, T).contiguous(), mask

    def actor(info=None):
        c = FSDPActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=1, tau_pos=TP, tau_neg=TN,
                            clip_ratio_low=0.2, clip_ratio_high=0.2)
        c.global_batch_info.update(info or {})
        return c

    def call(name, old, lp, adv, mask, agg, cfg):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(name)(old, lp, adv, mask, agg, cfg)
        (grad,) = torch.autograd.grad(loss, lp)
        return float(loss.detach()), grad, metrics

    # 1) every registered gate == harness.objective.policy_loss (no global batch info: one micro-batch)
    parity = {}
    for gate in [*BUILTIN_GATES, "student"]:
        nu = 4.0 if gate == "student" else None  # the Student-t tail index reaches verl through HARNESS_VERL_NU
        if nu is not None:
            os.environ["HARNESS_VERL_NU"] = str(nu)
        worst = 0.0
        for seed in range(3):
            old, lp, adv, mask = tensors(seed)
            v, g, _ = call("harness_" + gate, old, lp, adv, mask, "seq-mean-token-mean", actor())
            lp2 = lp.clone().requires_grad_(True)
            ref, _ = policy_loss(lp2, old, adv, mask, gate=gate, tau_pos=TP, tau_neg=TN, diagnostics=False, nu=nu)
            (gref,) = torch.autograd.grad(ref, lp2)
            worst = max(worst, abs(v - float(ref.detach())), float((g - gref).abs().max()))
        parity[gate] = worst
    out["parity_vs_objective"] = parity

    # 2) against verl's own losses, also with global batch info (dp=2, micro-batch of a larger mini-batch)
    infos = [{}, {"dp_size": 2, "global_batch_size": 20, "batch_num_tokens": 150, "loss_scale_factor": None}]
    builtin = {}
    for gate, theirs in (("sigmoid", "sapo"), ("clip", "vanilla")):
        aggs = ["seq-mean-token-mean"] + (["token-mean", "seq-mean-token-sum-norm"] if gate == "clip" else [])
        dv = dg = 0.0
        for info in infos:
            for agg in aggs:
                for seed in range(3):
                    old, lp, adv, mask = tensors(seed)
                    v, g, _ = call("harness_" + gate, old, lp, adv, mask, agg, actor(info))
                    tv, tg, _ = call(theirs, old, lp, adv, mask, agg, actor(info))
                    offset = 0.0
                    if gate == "sigmoid":  # SAPO = harness + (1 - 2/tau) A, aggregated like the loss
                        tau = torch.where(adv > 0, TP, TN)
                        offset = float(agg_loss((1 - 2 / tau) * adv, mask, agg, **{k: v for k, v in info.items()
                                                                                   if v is not None}))
                    dv = max(dv, abs(tv - (v + offset)))
                    dg = max(dg, float((tg - g).abs().max()))
        builtin[f"{gate}_vs_{theirs}"] = {"value": dv, "grad": dg}
    out["parity_vs_verl"] = builtin
    _, _, metrics = call("harness_clip", *tensors(0), "seq-mean-token-mean", actor())
    out["metric_keys"] = sorted(metrics)

    # 3) verl's Hydra config and strict dataclasses accept the harness overrides
    overrides = json.load(open(sys.argv[1]))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    a = cfg.actor_rollout_ref.actor
    actor_cfg = omega_conf_to_dataclass(a)
    out["composed"] = {
        "loss_mode": a.policy_loss.loss_mode, "ppo_epochs": a.ppo_epochs, "n": cfg.actor_rollout_ref.rollout.n,
        "loss_agg_mode": a.loss_agg_mode, "tau_pos": a.tau_pos, "tau_neg": a.tau_neg,
        "response_length": cfg.actor_rollout_ref.rollout.response_length,
        "reward_fn": [cfg.reward.custom_reward_function.path, cfg.reward.custom_reward_function.name],
        "reward_kwargs": OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs),
        "env_vars": dict(cfg.ray_kwargs.ray_init.runtime_env.env_vars),
        "actor_dataclass": type(actor_cfg).__name__,
    }
    # 4) the reward function as verl loads it
    from verl.trainer.ppo.reward import get_custom_reward_fn
    fn = get_custom_reward_fn(cfg)
    out["reward"] = fn(data_source="harness/arith", solution_str="<think> x </think> <answer> 5 </answer>",
                       ground_truth="5", extra_info={})
    print("PROBE" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    overrides = verl_overrides(_paper_cfg("gate=softsign", "train.rewards.format_weight=0.5"),
                               model_path="/models/policy", max_prompt_length=256)
    path = tmp_path_factory.mktemp("probe") / "overrides.json"
    path.write_text(json.dumps(overrides))
    proc = run_verl(_PROBE, str(path), env={"VERL_USE_EXTERNAL_MODULES": "harness.backends.verl_plugin"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[-1][len("PROBE"):])


@needs_verl
def test_every_gate_registered_via_external_modules(probe: dict):
    assert probe["registered"] == EXPECTED


@needs_verl
def test_registered_losses_equal_the_objective(probe: dict):
    """float64, random tensors: value and gradient of harness_<gate> vs policy_loss, every gate."""
    assert set(probe["parity_vs_objective"]) == {*BUILTIN_GATES, "student"}
    for gate, diff in probe["parity_vs_objective"].items():
        assert diff <= 1e-6, (gate, diff)


@needs_verl
def test_registered_losses_match_verl_sapo_and_vanilla(probe: dict):
    """harness_sigmoid vs verl sapo (values after the (1 − 2/τ)·A constant) and harness_clip vs verl vanilla,
    including verl's global-batch normalisation (dp_size 2) and every aggregation for clip."""
    for key, diff in probe["parity_vs_verl"].items():
        assert diff["grad"] <= 1e-6 and diff["value"] <= 1e-6, (key, diff)
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/harness/abs_ratio_dev"} <= set(probe["metric_keys"])


@needs_verl
def test_verl_config_accepts_the_overrides(probe: dict):
    c = probe["composed"]
    assert c["loss_mode"] == "harness_softsign" and c["ppo_epochs"] == 2 and c["n"] == 8
    assert c["loss_agg_mode"] == "seq-mean-token-mean" and c["response_length"] == 512
    assert (c["tau_pos"], c["tau_neg"]) == (1.0, 1.05)
    assert c["reward_fn"] == ["pkg://harness.backends.verl_plugin", "compute_score"]
    assert c["reward_kwargs"] == {"format_weight": 0.5, "accuracy_weight": 1.0, "format_mode": "graded",
                                  "accuracy_fallbacks": []}
    assert c["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == "harness.backends.verl_plugin"
    assert c["actor_dataclass"] == "FSDPActorConfig"
    assert probe["reward"] == {"score": 1.5, "format": 1.0, "accuracy": 1.0}


_REGISTERED = textwrap.dedent('''
    import verl
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    print("NAMES" + ",".join(sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("harness_"))))
''')


def _names(proc: subprocess.CompletedProcess) -> list[str]:
    line = [x for x in proc.stdout.splitlines() if x.startswith("NAMES")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return [n for n in line[-1][len("NAMES"):].split(",") if n]


@needs_verl
def test_entry_point_registers_every_gate_in_a_fresh_process(tmp_path: Path):
    """The ``verl.plugins`` entry point, exactly as pyproject declares it, loaded by a bare ``import verl``.

    The metadata is provided by a throw-away dist-info on PYTHONPATH, so this runs whether or not the
    harness was pip-installed with its entry point (that case is the next test)."""
    dist = tmp_path / "harness_verl_entry_point-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-verl-entry-point\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nharness = harness.backends.verl_plugin\n")
    proc = run_verl(_REGISTERED, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    assert _names(proc) == EXPECTED
    # and nothing registers without it (so the assertion above is about the entry point)
    assert _names(run_verl(_REGISTERED, env={"VERL_USE_EXTERNAL_PLUGINS": "none"})) == []


@needs_verl
def test_installed_entry_point(tmp_path: Path):
    """Once pyproject declares the entry point and the harness is installed in the verl environment."""
    check = ("from importlib.metadata import entry_points as e; "
             "print('EP' + ','.join(x.value for x in e(group='verl.plugins')))")
    proc = run_verl(check, env={"PYTHONPATH": ""})
    if "harness.backends.verl_plugin" not in proc.stdout:
        pytest.skip("the harness is not installed with its verl.plugins entry point in the verl environment")
    assert _names(run_verl(_REGISTERED, env={"PYTHONPATH": ""})) == EXPECTED


def _has_transfer_queue() -> bool:
    if not VERL_PYTHON.exists():
        return False
    probe = subprocess.run([str(VERL_PYTHON), "-c", "import transfer_queue, datasets"], capture_output=True)
    return probe.returncode == 0


@needs_verl
@pytest.mark.slow
@pytest.mark.skipif(not _has_transfer_queue(), reason="no verl environment with transfer_queue and datasets, "
                                                      "which main_ppo needs (scripts/install_verl.sh, full mode)")
def test_main_ppo_on_cpu_stops_at_the_gpu_check(tmp_path: Path, cache_dir: Path):
    """``harness.backends.verl.train`` — a real ``python -m verl.trainer.main_ppo`` — with the tiny model on this
    CPU-only machine (~1 min).

    It writes the parquet data and the command, and verl gets through its Hydra config and ``validate_config``
    (the whole harness translation), starts a local Ray with the harness env vars, runs the TaskRunner (which
    imports the plugin), starts TransferQueue, loads the tokenizer and data, and stops deterministically when it
    builds its resource pools: verl 0.9.1 hard-codes ``use_gpu=True`` there. (Declaring a logical GPU to Ray gets
    one step further, to the FSDP worker's ``init_process_group``, which needs NCCL/CUDA; after that the rollout
    needs vLLM or SGLang.)"""
    from omegaconf import open_dict

    from harness.backends.verl import train

    cfg = compose(["backend=verl", "train.steps=1", "train.rollout_batch_size=16", "train.micro_batch_size=8",
                   "train.max_new_tokens=16", "backend.num_cpus=16", f"backend.python={VERL_PYTHON}",
                   f"cache_dir={cache_dir}", "eval.enabled=false", "backend.timeout_s=400",
                   # TransferQueue's default 8 storage actors need more logical CPUs than a small machine has
                   "backend.extra_overrides=['transfer_queue.backend.SimpleStorage.num_data_storage_units=2']"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="Total available GPUs 0 is less than total desired GPUs 1"):
        train(cfg)
    log = (tmp_path / "verl.log").read_text()
    assert "All configuration checks passed" in log
    assert "'loss_mode': 'harness_sigmoid'" in log  # the TaskRunner's resolved config
    assert (tmp_path / "verl_data" / "train.parquet").exists() and (tmp_path / "verl_command.sh").exists()
