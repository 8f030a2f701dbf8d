"""The memory plan (harness/memory_plan.py): parameter counts against the models torch builds, the terms' formulas,
``harness plan``, the refusal of a CUDA cell that cannot fit, and the plan against a measured CPU peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from harness.cli import main
from harness.config import ConfigError
from harness.memory_plan import GIB, KNOWN, Architecture, architecture_of, plan_memory
from tests.conftest import REPO, compose


@pytest.mark.parametrize("arch", [
    Architecture("qwen-like", 1000, 64, 2, 4, 2, 176, tied=False),
    Architecture("qwen-like-tied", 517, 96, 3, 6, 3, 256, tied=True),
    architecture_of({"name": "tiny"}),
    Architecture("llama-like", 800, 64, 2, 4, 1, 128, tied=False, qkv_bias=False),
])
def test_parameter_count_equals_the_model_torch_builds(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config = (Qwen2ForCausalLM, Qwen2Config) if arch.qkv_bias else (LlamaForCausalLM, LlamaConfig)
    model = cls(config(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                       num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                       intermediate_size=arch.intermediate, tie_word_embeddings=arch.tied))
    assert arch.params == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    """Qwen2.5-7B-Instruct is 7.61B parameters, Qwen2.5-0.5B 0.49B, SmolLM2-135M 135M (their model cards)."""
    assert abs(KNOWN["Qwen/Qwen2.5-7B-Instruct"].params / 1e9 - 7.61) < 0.01
    assert round(KNOWN["Qwen/Qwen2.5-0.5B-Instruct"].params / 1e9, 2) == 0.49
    assert round(KNOWN["smollm2-135m"].params / 1e6) == 135


def test_terms_follow_the_formulas():
    a = KNOWN["Qwen/Qwen2.5-7B-Instruct"]
    P = a.params
    one = plan_memory(a, micro_batch=1, prompt_tokens=1536, completion_tokens=512)
    assert one.terms["weights"] + one.terms["gradients"] + one.terms["optimizer (Adam m, v)"] == 16 * P
    z3 = plan_memory(a, micro_batch=1, prompt_tokens=1536, completion_tokens=512, sharding="zero3", processes=8)
    assert z3.terms["weights, gradients, optimizer (sharded)"] == 16 * P / 8
    assert one.terms["activations"] == z3.terms["activations"] == 2048 * 28 * 2 * (8 * 3584 + 3 * 512 + 4 * 18944)
    assert one.terms["logits"] == 512 * 152064 * (2 * 2 + 4)
    ckpt = plan_memory(a, micro_batch=1, prompt_tokens=1536, completion_tokens=512, gradient_checkpointing=True)
    assert ckpt.terms["activations"] < one.terms["activations"] / 10
    shared = plan_memory(a, micro_batch=8, prompt_tokens=100, completion_tokens=10, prompt_group=8)
    assert shared.terms["activations"] == (100 + 80) * 28 * 2 * (8 * 3584 + 3 * 512 + 4 * 18944)
    with pytest.raises(ValueError, match="sharding must be one of"):
        plan_memory(a, micro_batch=1, prompt_tokens=1, completion_tokens=1, sharding="zero4")


def test_harness_plan_prints_the_paper_cell(capsys):
    assert main(["plan", "--gpu-gib", "80", "model=qwen2.5-7b-instruct", "train=paper", "backend=trl"]) == 0
    out = capsys.readouterr().out
    assert "7.616B parameters" in out and "does NOT fit a 80 GiB GPU" in out and "ZeRO-3" in out
    assert main(["plan", "--gpu-gib", "80", "--sharding", "zero3", "--processes", "8", "model=qwen2.5-7b-instruct",
                 "train=paper", "backend=trl"]) == 0
    assert "fits a 80 GiB GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse: the allowed choices, exit status 2
        main(["plan", "--sharding", "zero9"])
    assert exit_info.value.code == 2
    assert "choose from 'none', 'ddp', 'zero2', 'zero3', 'fsdp'" in capsys.readouterr().err


def test_a_cuda_cell_that_cannot_fit_is_refused_before_compute(monkeypatch):
    """With an 80 GiB CUDA device (the device query answered as an H100's would: the machine here has no GPU), the
    paper cell on one process is refused by validate_cell, naming the keys that would make it fit; the 0.5B model
    passes."""
    from harness.cell import validate_cell

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * GIB})())
    cfg = compose(["model=qwen2.5-7b-instruct", "train=paper", "backend=trl", "eval.enabled=false"])
    with pytest.raises(ConfigError, match=r"(?s)needs about 1\d\d\.\d GiB per GPU but the GPU has 80\.0 GiB.*"
                                          r"backend\.gradient_checkpointing=true"):
        validate_cell(cfg)
    validate_cell(compose(["model=qwen2.5-0.5b-instruct", "train=paper", "backend=trl", "eval.enabled=false"]))
    monkeypatch.setenv("WORLD_SIZE", "8")  # a rank of an accelerate launch: the sharding is accelerate's config
    validate_cell(cfg)


def test_the_plan_against_a_measured_cpu_peak():
    """The tiny model's native micro-batch (64 completions, float32, chunked head, shared prompts): the peak resident
    memory the step adds is within a factor 2 of the plan's terms (the plan leaves out kernel buffers and
    fragmentation, so it is read as a lower bound: measured >= 0.8 × planned)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_memory_plan.py"), "--child", "tiny",
                          "--threads", "1"], capture_output=True, text=True, check=True, cwd=REPO)
    r = json.loads(out.stdout.split("RESULT", 1)[1])
    assert 0.8 <= r["measured_mib"] / r["planned_mib"] <= 2.0, r
