"""Checkpoints a disk can hold: the checks before the first step, keep_checkpoints, weights-only older checkpoints,
resume past them, and the bf16 save option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.backends.checkpoints import (
    NATIVE_REQUIRED,
    STATE_FILE,
    checkpoint_bytes,
    is_weights_only,
    list_checkpoints,
    preflight,
    prune_checkpoints,
    resume_checkpoint,
    verify_checkpoint,
)
from harness.backends.native import train
from harness.cell import validate_cell
from harness.config import ConfigError
from tests.conftest import compose_at

SMALL = ["train.steps=3", "train.rollout_batch_size=16", "train.micro_batch_size=16", "train.save_every=1",
         "backend.progress=false", "backend.threads=1", "eval.enabled=false"]


def _cfg(tmp_path: Path, cache_dir: Path, *extra: str):
    return compose_at(tmp_path, [*SMALL, f"cache_dir={cache_dir}", *extra])


def _tiny_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def test_keep_checkpoints_keeps_the_newest_and_only_the_newest_resumes(tmp_path, cache_dir):
    res = train(_cfg(tmp_path, cache_dir, "train.keep_checkpoints=2"))
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step-000002", "step-000003"] == [p.name for p in res.checkpoints]
    older, newest = found
    assert is_weights_only(older) and not is_weights_only(newest)
    assert verify_checkpoint(older, ("model.safetensors",)) is None  # its manifest was rewritten
    assert verify_checkpoint(newest, NATIVE_REQUIRED) is None
    # the newest one broken: resume passes over the weights-only one and starts over, saying so
    (newest / STATE_FILE).write_bytes(b"")
    assert resume_checkpoint(tmp_path / "checkpoints") is None
    assert older.exists()  # weights only is not invalid: it stays


def test_keep_all_by_null(tmp_path, cache_dir):
    train(_cfg(tmp_path, cache_dir, "train.keep_checkpoints=null"))
    found = list_checkpoints(tmp_path / "checkpoints")
    assert len(found) == 3 and not any(is_weights_only(p) for p in found)  # no limit: every one resumable


def test_prune_deletes_a_broken_checkpoint_and_keeps_n_that_verify(tmp_path, cache_dir):
    train(_cfg(tmp_path, cache_dir, "train.keep_checkpoints=null"))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-000002" / "model.safetensors").write_bytes(b"broken")
    kept = prune_checkpoints(ckpt, keep=2)
    assert [p.name for p in kept] == ["step-000001", "step-000003"] and is_weights_only(kept[0])
    assert not (ckpt / "step-000002").exists()


def test_save_dtype_bfloat16_halves_the_weights(tmp_path, cache_dir):
    res = train(_cfg(tmp_path, cache_dir, "train.save_dtype=bfloat16", "train.steps=1"))
    from safetensors.torch import load_file

    weights = load_file(str(res.final_checkpoint / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((res.final_checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    from harness.models import checkpoint_dtype

    assert checkpoint_dtype(str(res.final_checkpoint)) == torch.bfloat16  # what the evaluator then loads it in


def test_bad_checkpoint_keys_fail_before_compute(cache_dir, tmp_path):
    for bad, match in (("train.keep_checkpoints=0", "train.keep_checkpoints must be null"),
                       ("train.save_dtype=int8", "train.save_dtype must be null"),
                       ("train.save_dtype=bfloat16 backend=trl", "is applied by backend=native only")):
        with pytest.raises(ConfigError, match=match):
            validate_cell(_cfg(tmp_path, cache_dir, *bad.split()))


def test_preflight_refuses_a_model_that_cannot_be_saved(tmp_path):
    model = _tiny_model()

    class Unsaveable:
        quantization_config = type("Q", (), {"quant_method": "gguf"})()

        def is_serializable(self, *a, **k):
            return False

    model.hf_quantizer = Unsaveable()
    with pytest.raises(RuntimeError, match="quantised with gguf, which transformers cannot save"):
        preflight(model, tmp_path / "ckpt", n_saves=2, keep=2)


def test_preflight_refuses_an_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match=r"cannot write checkpoints to .*set output_dir"):
        preflight(_tiny_model(), blocker / "ckpt", n_saves=1, keep=1)


def test_preflight_refuses_a_disk_too_small_and_names_the_keys(tmp_path, monkeypatch):
    model = _tiny_model()
    weights, state = checkpoint_bytes(model.parameters())
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert (weights, state) == (4 * n, 8 * n)
    assert checkpoint_bytes(model.parameters(), torch.bfloat16)[0] == 2 * n
    need = 2 * (weights + state) + 2 * weights  # 3 kept: the newest two in full, one more as weights
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    with pytest.raises(RuntimeError, match=r"train\.keep_checkpoints.*train\.save_dtype=bfloat16.*output_dir"):
        preflight(model, tmp_path / "ckpt", n_saves=10, keep=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need))
    preflight(model, tmp_path / "ckpt", n_saves=10, keep=3)
