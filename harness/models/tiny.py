"""The ``tiny`` model, built on this machine: a ~1.1M-parameter Qwen2 with a byte-level BPE tokenizer, warm-started by
supervised fine-tuning on ``arith`` (no download; the default for CPU runs and tests).

Everything that determines its weights is the recipe (:data:`DEFAULT_TINY_RECIPE` updated by ``model.recipe``);
:func:`recipe_hash` names its cache directory. :func:`build_tiny_model` writes one build into a directory;
:func:`harness.models.resolve_model_path` runs it once per recipe, cached and atomic (:mod:`harness.models.cache`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import to_plain
from harness.prompts import PromptConfig, render_prompt

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
    held-out warm-start accuracy) last and returns ``out_dir``. Use :func:`harness.models.resolve_model_path` for the
    cached, atomic build; this function writes into ``out_dir`` directly.
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
