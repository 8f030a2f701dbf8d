r"""The memory plan of a training cell: each GPU's peak memory, term by term, before any compute.

``harness plan [overrides]`` prints it; :func:`check_fits` refuses a CUDA cell that cannot fit its GPU before the
model loads, naming the keys that would make it fit. Every term is a formula of the model's architecture and the
run's settings, in bytes per GPU, with P the parameter count, N the processes that shard the model states, b the
micro-batch (sequences per forward/backward), s = prompt + completion tokens of a sequence, c its completion tokens,
L layers, h the hidden width, k the key/value width (KV heads × head width), i the MLP width, V the vocabulary and
a the bytes of an activation (2 in bf16, 4 in float32):

* **weights, gradients, optimizer state** (AdamW; what ZeRO counts as 16 bytes per parameter in mixed precision):

  ============  ===================================================  ==========================================
  sharding      per GPU                                              what it is
  ============  ===================================================  ==========================================
  ``none``      4P weights + 4P gradients + 8P Adam m, v             one process (the native backend: float32)
  ``ddp``       the same on every GPU                                data parallel, a full copy per rank
  ``zero2``     2P bf16 weights + (2P gradients + 12P fp32 master    DeepSpeed ZeRO-2
                and Adam) / N
  ``zero3``     16P / N + 2·P_layer (one layer gathered in bf16)     DeepSpeed ZeRO-3
  ``fsdp``      16P / N + 2·P_layer                                  FSDP full shard, bf16 compute
  ============  ===================================================  ==========================================

* **activations** kept for backward, per decoder layer and token, 8h + 3k + 4i values (each of the two RMSNorms' input
  and normalised output, 4h; q and the rotated q, 2h; the attention kernel's output and its transposed copy that the
  output projection keeps, 2h; k, v and the rotated k, 3k; the MLP's gate, up, activation and their product, 4i;
  flash attention keeps no s × s scores): b·s·L·a·(8h + 3k + 4i) without
  gradient checkpointing; with it each layer keeps its input, b·s·L·a·h, and one layer is recomputed at a time,
  + b·s·a·(8h + 3k + 4i);
* **logits** over the vocabulary for the completion tokens, in the activation dtype, their gradient, and one float32
  log-softmax: b·c·V·(2a + 4); the native backend's chunked output head holds one chunk of at most
  ``LOGIT_CHUNK_ELEMENTS`` / V positions instead of b·c;
* **colocated vLLM**: the share of the GPU TRL gives it (``backend.vllm_gpu_memory_utilization`` × GPU memory);
* **CUDA context and allocator**: 1.5 GiB per GPU (not on a CPU).

What it leaves out (and why the plan is a lower bound for a real run): temporary buffers of fused kernels, the
reference model of a KL term (``train.loss.kl_beta > 0`` adds 2P or 4P), communication buckets (DDP's default 25 MB
per bucket), and fragmentation beyond the fixed allowance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARDINGS = ("none", "ddp", "zero2", "zero3", "fsdp")
CUDA_OVERHEAD = 1.5 * 2**30
GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a decoder-only transformer (Llama / Qwen2 layout: GQA attention with q/k/v biases
    where ``qkv_bias``, a gated MLP, RMSNorm)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    qkv_bias: bool = True

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, k, i = self.hidden, self.kv_width, self.intermediate
        bias = (h + 2 * k) if self.qkv_bias else 0
        return 2 * h * h + 2 * h * k + bias + 3 * h * i + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


# Published config.json values (no download needed to plan them).
KNOWN: dict[str, Architecture] = {
    "Qwen/Qwen2.5-7B-Instruct": Architecture("Qwen2.5-7B-Instruct", 152064, 3584, 28, 28, 4, 18944, tied=False),
    "Qwen/Qwen2.5-0.5B-Instruct": Architecture("Qwen2.5-0.5B-Instruct", 151936, 896, 24, 14, 2, 4864, tied=True),
    "smollm2-135m": Architecture("SmolLM2-135M", 49152, 576, 30, 9, 3, 1536, tied=True, qkv_bias=False),
}


def architecture_from_config(config: Mapping[str, Any], name: str = "model") -> Architecture:
    """From a Hugging Face ``config.json`` (Llama / Qwen2 / Mistral keys)."""
    heads = int(config["num_attention_heads"])
    return Architecture(name, int(config["vocab_size"]), int(config["hidden_size"]), int(config["num_hidden_layers"]),
                        heads, int(config.get("num_key_value_heads") or heads), int(config["intermediate_size"]),
                        bool(config.get("tie_word_embeddings", False)),
                        qkv_bias=str(config.get("model_type", "")) == "qwen2")


def architecture_of(model_cfg: Mapping[str, Any]) -> Architecture:
    """The architecture of a ``model`` node: a preset's or hub id's published values, the tiny model's recipe, a
    local directory's ``config.json``, else the hub's ``config.json`` (only that file is fetched)."""
    from harness.models.tiny import tiny_recipe

    name, path = str(model_cfg.get("name")), model_cfg.get("path")
    if name == "tiny":
        r = tiny_recipe(model_cfg.get("recipe"))
        return Architecture("tiny", int(r["vocab_size"]), int(r["hidden_size"]), int(r["num_layers"]),
                            int(r["num_heads"]), int(r["num_heads"]), int(r["intermediate_size"]), tied=True)
    for key in (str(path), name):
        if key in KNOWN:
            return KNOWN[key]
    if path and (Path(str(path)) / "config.json").is_file():
        return architecture_from_config(json.loads((Path(str(path)) / "config.json").read_text()), Path(path).name)
    if not path:
        raise ValueError(f"model {name!r}: no architecture known; give model.path (a hub id or a directory)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path)).to_dict()
    except OSError as exc:  # offline, or no such repository: a config error naming the key, not a traceback
        raise ValueError(f"model.path={path}: no config.json to plan from ({exc})") from None
    return architecture_from_config(config, str(path))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by term (see the module docstring), and what the plan was made for."""

    terms: dict[str, float]
    architecture: Architecture
    settings: dict[str, Any]

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def table(self) -> str:
        width = max(map(len, self.terms))
        rows = [f"  {key:<{width}}  {value / GIB:9.2f} GiB" for key, value in self.terms.items()]
        return "\n".join([*rows, f"  {'total':<{width}}  {self.total / GIB:9.2f} GiB"])


def plan_memory(arch: Architecture, *, micro_batch: int, prompt_tokens: int, completion_tokens: int,
                prompt_group: int = 1, sharding: str = "none", processes: int = 1, activation_bytes: int = 2,
                gradient_checkpointing: bool = False, logit_chunk_elements: int | None = None,
                vllm_share_bytes: float = 0.0, cuda: bool = True) -> MemoryPlan:
    """Each GPU's peak memory for one training micro-batch (module docstring for every term). ``prompt_group`` G > 1:
    the G completions of a prompt share one pass over it (the native backend's ``share_prompt``), so the micro-batch
    holds b/G prompts' tokens and b completions' (b·s in the formulas becomes (b/G)·p + b·c)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if not (isinstance(processes, int) and processes >= 1):
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    if sharding == "none" and processes != 1:
        raise ValueError("sharding 'none' is one process; several processes are ddp, zero2, zero3 or fsdp")
    P, n = float(arch.params), float(processes)
    if sharding in ("none", "ddp"):
        states = {"weights": 4 * P, "gradients": 4 * P, "optimizer (Adam m, v)": 8 * P}
    elif sharding == "zero2":
        states = {"weights (bf16)": 2 * P, "gradients (sharded)": 2 * P / n,
                  "optimizer (fp32 master, m, v; sharded)": 12 * P / n}
    else:
        states = {"weights, gradients, optimizer (sharded)": 16 * P / n,
                  "one layer gathered (bf16)": 2.0 * arch.layer_params}
    b, c = micro_batch, completion_tokens
    tokens = math.ceil(b / prompt_group) * prompt_tokens + b * c
    per_token_layer = 8 * arch.hidden + 3 * arch.kv_width + 4 * arch.intermediate
    if gradient_checkpointing:
        activations = tokens * activation_bytes * (arch.layers * arch.hidden + per_token_layer)
    else:
        activations = tokens * arch.layers * activation_bytes * per_token_layer
    positions = b * c if logit_chunk_elements is None else min(b * c, max(1, logit_chunk_elements // arch.vocab))
    terms = {**states, "activations": float(activations),
             "logits": float(positions * arch.vocab * (2 * activation_bytes + 4))}
    if vllm_share_bytes:
        terms["colocated vLLM"] = float(vllm_share_bytes)
    if cuda:
        terms["CUDA context, allocator"] = CUDA_OVERHEAD
    settings = dict(micro_batch=b, prompt_tokens=prompt_tokens, completion_tokens=c, prompt_group=prompt_group,
                    sharding=sharding,
                    processes=processes, activation_bytes=activation_bytes,
                    gradient_checkpointing=gradient_checkpointing, logit_chunk_elements=logit_chunk_elements)
    return MemoryPlan(terms, arch, settings)


def plan_of_config(cfg: Any, *, gpu_bytes: float | None = None, sharding: str | None = None,
                   processes: int | None = None, prompt_tokens: int | None = None) -> MemoryPlan:
    """The plan of a run config as its backend runs it today: the native backend trains in float32 with its chunked
    output head, TRL in bf16 on CUDA (``backend.bf16``) with TRL's own log-prob path; one process unless
    ``sharding``/``processes`` say otherwise. The prompt length is ``prompt_tokens``, else ``train.max_prompt_tokens``,
    else 512."""
    from harness.backends.sampling import LOGIT_CHUNK_ELEMENTS

    t, bk = cfg.train, cfg.backend
    name = str(bk.name)
    trl_bf16 = name == "trl" and bool(bk.get("bf16", True)) and str(bk.get("device", "auto")) != "cpu"
    colocated = bk.get("use_vllm") and str(bk.get("vllm_mode", "colocate")) == "colocate"
    vllm = float(bk.get("vllm_gpu_memory_utilization") or 0.0) if colocated else 0.0
    b, g = int(t.micro_batch_size), int(t.num_generations)
    shared = name == "native" and bool(bk.get("share_prompt", False)) and b % g == 0
    return plan_memory(
        architecture_of(cfg.model), micro_batch=b, prompt_group=g if shared else 1,
        prompt_tokens=int(prompt_tokens or t.get("max_prompt_tokens") or 512), completion_tokens=int(t.max_new_tokens),
        sharding=sharding or "none", processes=processes or 1, activation_bytes=2 if trl_bf16 else 4,
        gradient_checkpointing=bool(bk.get("gradient_checkpointing", False)),
        logit_chunk_elements=LOGIT_CHUNK_ELEMENTS if name == "native" else None,
        vllm_share_bytes=vllm * (gpu_bytes or 0.0), cuda=gpu_bytes is not None)


def fit_advice(plan: MemoryPlan, gpu_bytes: float) -> str:
    """What would make a plan fit ``gpu_bytes``, naming the keys, largest saving first."""
    s = plan.settings
    advice = []
    states = sum(v for k, v in plan.terms.items() if k.startswith(("weights", "gradients", "optimizer", "one layer")))
    if s["sharding"] in ("none", "ddp") and states > 0.5 * gpu_bytes:
        advice.append(f"shard the model states: backend=trl under accelerate with DeepSpeed ZeRO-3 or FSDP over N GPUs "
                      f"(16P/N: {16 * plan.architecture.params / 8 / GIB:.1f} GiB per GPU on 8; docs/paper.md)")
    if not s["gradient_checkpointing"] and plan.terms["activations"] > 0.1 * gpu_bytes:
        advice.append("backend.gradient_checkpointing=true")
    if s["micro_batch"] > 1:
        advice.append(f"a smaller train.micro_batch_size (now {s['micro_batch']}; activations and logits scale "
                      "with it)")
    advice.append("a smaller model (model=...)")
    return "; ".join(advice)


def check_fits(cfg: Any) -> None:
    """``ValueError`` when a CUDA cell's plan exceeds its GPU's memory (before the model loads), naming the keys that
    would make it fit. A cell of ``backend.num_processes`` = N > 1 is planned with its accelerate config's sharding
    over N processes, by the process that starts them. Nothing to check on a CPU (the plan has no device limit
    there), without CUDA, or in a rank of a launch someone else started (``WORLD_SIZE`` > 1, no
    ``backend.num_processes``): how that launch shards the states is its config's; ``harness plan --sharding ...
    --processes N`` plans it."""
    import os

    import torch

    device = str(cfg.backend.get("device", "auto"))
    if device == "cpu" or not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    gpu = float(torch.cuda.get_device_properties(0).total_memory)
    from harness.backends.common import num_processes

    processes = num_processes(cfg)
    sharding = None
    if processes > 1:
        from harness.backends.trl_config import accelerate_sharding

        sharding = accelerate_sharding(cfg)
    plan = plan_of_config(cfg, gpu_bytes=gpu, sharding=sharding, processes=processes)
    if plan.total > gpu:
        raise ValueError(f"model={cfg.model.name} on backend={cfg.backend.name} needs about {plan.total / GIB:.1f} GiB "
                         f"per GPU but the GPU has {gpu / GIB:.1f} GiB (harness plan prints the terms):\n{plan.table()}"
                         f"\nTo fit: {fit_advice(plan, gpu)}")


def describe(plan: MemoryPlan, gpu_bytes: float | None = None) -> str:
    """The plan as ``harness plan`` prints it."""
    a, s = plan.architecture, plan.settings
    head = (f"{a.name}: {a.params / 1e9:.3f}B parameters ({a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, "
            f"KV width {a.kv_width}, vocabulary {a.vocab}); micro-batch {s['micro_batch']} x "
            f"({s['prompt_tokens']} + {s['completion_tokens']}) tokens, {s['sharding']} over {s['processes']} "
            f"process(es), activations {'bf16' if s['activation_bytes'] == 2 else 'float32'}, gradient checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}")
    out = [head, plan.table()]
    if gpu_bytes:
        fits = plan.total <= gpu_bytes
        verdict = "fits" if fits else "does NOT fit"
        advice = "" if fits else f"; to fit: {fit_advice(plan, gpu_bytes)}"
        out.append(f"{verdict} a {gpu_bytes / GIB:.0f} GiB GPU ({100 * plan.total / gpu_bytes:.0f}%){advice}")
    return "\n".join(out)

