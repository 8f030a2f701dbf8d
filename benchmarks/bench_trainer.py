"""Native backend vs TRL's stock GRPOTrainer: throughput on the same tiny model, prompts and rollout settings.

Both run SAPO (TRL: ``loss_type="sapo"``; native: ``gate=sigmoid``) from the same warm-started tiny
model on the same ``arith`` prompts in the same order: 16 prompts x 8 rollouts per generation batch, up to 24 new
tokens at T = 0.7, two optimizer updates per batch over micro-batches of 64, fp32 on CPU, same thread count.
Throughput = (prompt + completion tokens of every rollout batch) / wall time of the steps, after one
warm-up step that is not timed for either trainer. Besides the default native trainer it times two native
variants in the same run, to show where the difference comes from:

* ``native, generate``: rollouts from transformers' ``model.generate`` instead of the cached sampler (each
  prompt prefilled once, KV cache repeated G times, written in place);
* ``native, all rows``: ``backend.skip_zero_advantage=false``, i.e. the groups whose advantages are all 0 also
  go through the forward/backward passes (they change no weight: tests/test_native_trainer.py).

Each row also prints the fraction of groups with zero reward variance, which decides how much the skip saves
(both trainers sample their own rollouts, so the fractions differ a little). Run:

    python benchmarks/bench_trainer.py [--steps 8] [--threads 2]

Target (issue "Built-in RL trainer"): native >= 3x TRL on CPU.

Then the default cell (``harness run``'s own train config: 256 rollouts, 4 mini-batches of 64, 2 passes) through the
harness's ``native`` and ``trl`` backends side by side, seconds per rollout batch, and the TRL backend without its
cached sampler and zero-advantage skip (target: trl within 3x of native). ``--default-cell only`` runs just these.

What a change costs the default cell (target: at most 10% slower), side by side on a shared, noisy machine:

    python benchmarks/bench_trainer.py --against HEAD~1 [--rounds 6] [--steps 6]

runs the default cell's native row for the working tree and for that git revision (its files from ``git archive``, the
same model, data and cache), alternately, ``--rounds`` times each in fresh processes, and prints both medians and
their ratio (working tree / revision) with the ratio of each round.

What stale rollouts cost (issue "Off-policy regimes": a stale run's step within 10% of a synchronous one):

    python benchmarks/bench_trainer.py --staleness 2 [--rounds 4] [--steps 6]

times the default cell's native row with ``train.staleness=0`` and with ``train.staleness=K``, alternately in one
process, ``--rounds`` times each, and prints both medians, their ratio and the zero-variance share of each (it decides
how many rows the passes skip, and the two runs' rollouts differ).

GPU runs and other models (``benchmarks/gpu_check.py`` uses these; the defaults above are unchanged):

    python benchmarks/bench_trainer.py --device cuda [--no-bf16] [--model-shape qwen2.5-0.5b] [--max-new 128]
        [--prompts 16] [--micro 64] [--trainers native trl trl-no-ckpt] [--json results.json]

``--device cuda`` runs both trainers on the GPU with bf16 autocast (``--no-bf16``: fp32) and adds each row's peak
GPU memory (``torch.cuda.max_memory_allocated``). ``--model-shape qwen2.5-0.5b`` trains a model with
Qwen2.5-0.5B's architecture (24 layers, hidden 896, vocab 151,936: 494M parameters) and random weights, built here
(no download) with the tiny model's tokenizer: its completions are noise that runs to ``--max-new`` tokens and earns
(almost) no reward, so the native rows train on every row (``backend.skip_zero_advantage=false``), as TRL does; it
measures speed and memory, not learning. ``mini`` is the same at a few MB, for CPU dry runs. Stock TRL turns
gradient checkpointing on (``GRPOConfig.gradient_checkpointing=True``), the native trainer has none: the
``trl-no-ckpt`` row is TRL with it off.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS, G, MAX_NEW, MICRO, TEMPERATURE, LR, SEED = 16, 8, 24, 64, 0.7, 3e-5, 0
DEVICE, BF16 = "cpu", True  # --device / --no-bf16 (bf16 autocast applies on CUDA only)
ROWS = {  # --trainers name -> printed label
    "native": "native", "native-generate": "native, generate", "native-all-rows": "native, all rows", "trl": "trl",
    "trl-no-ckpt": "trl, no grad ckpt",
}
NATIVE_EXTRA = {"native": (), "native-generate": ("backend.sampler=generate",),
                "native-all-rows": ("backend.skip_zero_advantage=false",)}
DEFAULT_ROWS = ("native", "native-generate", "native-all-rows", "trl")
# Qwen2.5-0.5B(-Instruct)'s config.json, and a few-MB model of the same family for CPU dry runs.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "mini": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def build_shaped_model(shape: str, out_dir: str | Path, cache_dir: str) -> str:
    """A Qwen2 model of ``SHAPES[shape]`` with random weights (seeded), saved in float32 with the tiny model's
    tokenizer and chat template, so both trainers see the tiny model's prompts. Initialised on ``--device``: on a GPU
    the 494M random draws do not wait for the CPU."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from harness.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny", cache_dir=cache_dir))
    config = Qwen2Config(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    return str(out_dir)


def _free_device_memory() -> None:
    """Release what the previous row left, and restart the peak-memory counter."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(peak: bool) -> float | None:
    """GPU memory allocated now / at its peak since the last reset, in GiB (None on CPU)."""
    import torch

    if DEVICE == "cpu":
        return None
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def _native_cfg(steps: int, threads: int, cache_dir: str, *extra: str):
    from omegaconf import open_dict

    from tests.conftest import compose

    cfg = compose([f"train.steps={steps + 1}", f"train.rollout_batch_size={PROMPTS * G}", f"train.num_generations={G}",
                   f"train.mini_batch_size={PROMPTS * G}", f"train.micro_batch_size={MICRO}",
                   f"train.max_new_tokens={MAX_NEW}", "train.num_iterations=2",
                   f"train.rollout_temperature={TEMPERATURE}", f"train.lr={LR}", "gate=sigmoid", f"seed={SEED}",
                   f"train.save_every={10**6}", "backend.progress=false", f"backend.threads={threads}",
                   f"backend.device={DEVICE}", f"backend.bf16={str(BF16).lower()}", "eval.enabled=false",
                   f"cache_dir={cache_dir}", *extra])
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench-native-")
    return cfg


def native_throughput(steps: int, threads: int, cache_dir: str, *extra: str) -> dict[str, float]:
    from harness.backends.native import train

    cfg = _native_cfg(steps, threads, cache_dir, *extra)
    history = train(cfg).history[1:]  # drop the warm-up step
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # its final checkpoint: 6 GB with optimizer state at 0.5B
    seconds = sum(h["step_time_s"] for h in history)
    return {"tps": sum(h["tokens"] for h in history) / seconds, "step": seconds / len(history),
            "zero_var": sum(h["zero_var_frac"] for h in history) / len(history)}


def native_prompt_order(steps: int) -> list[dict[str, str]]:
    """The problems the native trainer sees, batch after batch (its seeded per-epoch shuffle)."""
    from harness.backends.native import prompts_for_step
    from harness.data import load_task
    from tests.conftest import compose

    problems = load_task(compose([]).task, "train", seed=SEED)
    return [problems[i] for step in range(steps + 1) for i in prompts_for_step(len(problems), step, PROMPTS, SEED)]


def trl_throughput(steps: int, threads: int, cache_dir: str, model_path: str | None = None,
                   gradient_checkpointing: bool | None = None) -> dict[str, float]:
    """Stock ``GRPOTrainer`` with ``loss_type="sapo"`` on the same prompts; ``model_path`` defaults to the tiny model,
    ``gradient_checkpointing=None`` keeps TRL's default (on)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from harness.models import model_prompt_config, resolve_model_path
    from harness.prompts import render_prompt
    from harness.scoring import has_format, score_batch

    torch.set_num_threads(threads)
    path = model_path or resolve_model_path("tiny", cache_dir=cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    pcfg = model_prompt_config("tiny")
    data = Dataset.from_list([{"prompt": render_prompt(tok, p["problem"], pcfg), "answer": p["answer"]}
                              for p in native_prompt_order(steps)])

    def reward(completions, answer, **_):  # same reward as native: format + strict accuracy
        acc = [float(s.correct) for s in score_batch(completions, answer, fallbacks=())]
        return [float(has_format(c)) + a for c, a in zip(completions, acc, strict=True)]

    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=DEVICE == "cpu", bf16=DEVICE != "cpu" and BF16, loss_type="sapo",
        num_generations=G, generation_batch_size=PROMPTS * G, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * G // MICRO, num_iterations=2, max_completion_length=MAX_NEW,
        learning_rate=LR, max_steps=2 * (steps + 1), logging_steps=1, report_to="none", save_strategy="no",
        temperature=TEMPERATURE, top_k=0, seed=SEED, shuffle_dataset=False, **extra,
    )
    times: list[float] = []
    tokens: list[float] = []
    zero_var: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append(float(logs["num_tokens"]))
            if logs and "frac_reward_zero_std" in logs and state.global_step % 2 == 1:  # the generating update
                zero_var.append(float(logs["frac_reward_zero_std"]))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    del trainer, model
    shutil.rmtree(out_dir, ignore_errors=True)
    # Two optimizer steps per rollout batch; drop the first batch (warm-up) for both trainers.
    seconds = sum(times[2:])
    # TRL logs the cumulative prompt+completion tokens once per rollout batch, after generating it: tokens[0] is the
    # count after the warm-up batch, so the timed batches' tokens are tokens[-1] - tokens[0].
    batch_tokens = tokens[-1] - tokens[0]
    return {"tps": batch_tokens / seconds, "step": seconds / (len(times[2:]) / 2),
            "zero_var": sum(zero_var[1:]) / max(1, len(zero_var[1:]))}


# The default cell (`harness run`'s conf/train/default.yaml: 256 rollouts of 32 prompts, 4 mini-batches of 64, 2 passes)
# through the harness's own backends, side by side; the last row is the TRL backend as it was before its cached
# sampler and zero-advantage skip (TRL's model.generate, every row through the passes).
DEFAULT_CELL_ROWS = {"native": ("backend=native",), "trl": ("backend=trl",),
                     "trl, generate, all rows": ("backend=trl", "backend.sampler=generate",
                                                 "backend.skip_zero_advantage=false")}


def default_cell_row(steps: int, threads: int, cache_dir: str, *overrides: str) -> dict[str, float]:
    """Mean wall seconds per rollout batch of one harness backend at the default cell's train config, after one
    warm-up batch (its step_time_s: rollouts, rewards, both passes, optimizer steps)."""
    from omegaconf import open_dict

    from harness.backends import get_backend
    from tests.conftest import compose

    cfg = compose([*overrides, f"train.steps={steps + 1}", f"train.save_every={10**6}", "backend.progress=false",
                   f"backend.threads={threads}", f"backend.device={DEVICE}", "eval.enabled=false",
                   f"cache_dir={cache_dir}", f"seed={SEED}"])
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench-cell-")
    history = get_backend(cfg.backend.name)(cfg).history[1:]
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return {"step": sum(h["step_time_s"] for h in history) / len(history),
            "zero_var": sum(h["zero_var_frac"] for h in history) / len(history)}


def print_default_cell(steps: int, threads: int, cache_dir: str) -> dict[str, dict[str, float]]:
    """The default cell's rows, printed with their ratio to native; returns them."""
    from tests.conftest import compose

    t = compose([]).train
    rows = {label: default_cell_row(steps, threads, cache_dir, *ov) for label, ov in DEFAULT_CELL_ROWS.items()}
    print(f"default cell ({t.rollout_batch_size} rollouts = {t.rollout_batch_size // t.num_generations} prompts x "
          f"{t.num_generations}, mini-batches of {t.mini_batch_size}, micro-batch {t.micro_batch_size}, "
          f"{t.num_iterations} passes, <= {t.max_new_tokens} new tokens), {threads} threads, {steps} timed batches "
          "each, harness backends:")
    print(f"{'backend':24s} {'s/batch':>9s} {'zero-var groups':>16s} {'vs native':>10s}")
    for label, r in rows.items():
        print(f"{label:24s} {r['step']:9.2f} {r['zero_var']:16.2f} {r['step'] / rows['native']['step']:9.2f}x")
    ratio = rows["trl"]["step"] / rows["native"]["step"]
    print(f"trl / native wall per batch at the default cell: {ratio:.2f}x (target <= 3x): "
          f"{'met' if ratio <= 3 else 'NOT met'}")
    return rows


# A child process that times the default cell's native row with the harness package of another tree (this file's
# functions, that tree's harness, conf and tests/conftest.py).
_ROW_IN_TREE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_trainer", {bench!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
sys.path.insert(0, {tree!r})
import harness
assert harness.__file__.startswith({tree!r}), harness.__file__
print("ROW", json.dumps(bench.default_cell_row({steps}, {threads}, {cache_dir!r}, "backend=native")))
"""


def against_revision(rev: str, rounds: int, steps: int, threads: int, cache_dir: str) -> dict[str, list[float]]:
    """Seconds per rollout batch of the default cell's native row for the working tree and for git revision ``rev``,
    alternating (the order flips every round), ``rounds`` each; printed with their medians and ratio."""
    base = Path(tempfile.mkdtemp(prefix="bench-rev-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(base, filter="data")
    trees = {"working tree": REPO, rev: base}
    seconds: dict[str, list[float]] = {label: [] for label in trees}
    try:
        for k in range(rounds):
            for label, tree in (list(trees.items()) if k % 2 == 0 else list(trees.items())[::-1]):
                code = _ROW_IN_TREE.format(bench=str(Path(__file__).resolve()), tree=str(tree), steps=steps,
                                           threads=threads, cache_dir=cache_dir)
                out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": ""})
                rows = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
                if out.returncode or not rows:
                    raise RuntimeError(f"default cell at {label} failed:\n{out.stderr[-3000:]}")
                seconds[label].append(json.loads(rows[0][4:])["step"])
                print(f"round {k + 1} {label:14s} {seconds[label][-1]:6.3f} s/batch", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    new, old = statistics.median(seconds["working tree"]), statistics.median(seconds[rev])
    per_round = ", ".join(f"{a / b:.3f}" for a, b in zip(seconds["working tree"], seconds[rev], strict=True))
    print(f"default cell, native, {threads} threads, {steps} timed batches per run, {rounds} rounds: working tree "
          f"{new:.3f} s/batch, {rev} {old:.3f} s/batch (medians): {new / old:.3f}x (per round: {per_round})")
    return seconds


def against_staleness(staleness: int, rounds: int, steps: int, threads: int, cache_dir: str) -> dict[str, list]:
    """Seconds per rollout batch of the default cell's native row, synchronous and at ``train.staleness``, alternating
    (the order flips every round), ``rounds`` each; printed with their medians and ratio."""
    sides = {"synchronous": ("backend=native",), f"staleness {staleness}": ("backend=native",
                                                                         f"train.staleness={staleness}")}
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in sides}
    for k in range(rounds):
        for label, overrides in (list(sides.items()) if k % 2 == 0 else list(sides.items())[::-1]):
            rows[label].append(default_cell_row(steps, threads, cache_dir, *overrides))
            print(f"round {k + 1} {label:14s} {rows[label][-1]['step']:6.3f} s/batch, zero-variance groups "
                  f"{rows[label][-1]['zero_var']:.2f}", flush=True)
    sync, stale = (statistics.median(r["step"] for r in rows[label]) for label in sides)
    zero = {label: statistics.mean(r["zero_var"] for r in rows[label]) for label in sides}
    print(f"default cell, native, {threads} threads, {steps} timed batches per run, {rounds} rounds: synchronous "
          f"{sync:.3f} s/batch (zero-variance groups {zero['synchronous']:.2f}), staleness {staleness} {stale:.3f} "
          f"s/batch ({zero[f'staleness {staleness}']:.2f}) (medians): {stale / sync:.3f}x (target <= 1.10x)")
    return rows


def main(argv: list[str] | None = None) -> None:
    global PROMPTS, MAX_NEW, MICRO, DEVICE, BF16
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rollout batches per trainer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "test"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA too (default: bf16 autocast)")
    parser.add_argument("--model-shape", default="tiny", choices=["tiny", *SHAPES],
                        help="tiny: the warm-started tiny model; else that architecture with random weights")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"prompts per rollout batch (x {G} rollouts)")
    parser.add_argument("--max-new", type=int, default=MAX_NEW, help="max new tokens per rollout")
    parser.add_argument("--micro", type=int, default=MICRO, help="micro-batch (rollouts per forward/backward)")
    parser.add_argument("--trainers", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--default-cell", choices=["after", "only", "skip"], default="after",
                        help="the default cell's rows (native and TRL backends, 256 rollouts): after the rows above, "
                             "only them, or not (tiny model only)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="only the default cell's native row, working tree vs this git revision, alternately")
    parser.add_argument("--rounds", type=int, default=6, help="runs of each side with --against or --staleness")
    parser.add_argument("--staleness", type=int, default=None, metavar="K",
                        help="time the default cell synchronous and at train.staleness=K, side by side")
    args = parser.parse_args(argv)
    if args.against is not None:
        against_revision(args.against, args.rounds, args.steps, args.threads, args.cache_dir)
        return
    if args.staleness is not None:
        against_staleness(args.staleness, args.rounds, args.steps, args.threads, args.cache_dir)
        return
    PROMPTS, MAX_NEW, MICRO, DEVICE, BF16 = args.prompts, args.max_new, args.micro, args.device, not args.no_bf16
    import torch

    if args.default_cell == "only":
        print_default_cell(args.steps, args.threads, args.cache_dir)
        return

    model_dir = None
    extra: tuple[str, ...] = ()
    if args.model_shape != "tiny":
        model_dir = build_shaped_model(args.model_shape, tempfile.mkdtemp(prefix=f"bench-{args.model_shape}-"),
                                       args.cache_dir)
        # A rare rewarded noise completion would otherwise decide how many rows the native passes skip.
        extra = (f"model.path={model_dir}", "backend.skip_zero_advantage=false")
    precision = "fp32" if DEVICE == "cpu" or not BF16 else "bf16 autocast"
    settings = {"model": args.model_shape, "prompts": PROMPTS, "generations": G, "max_new_tokens": MAX_NEW,
                "micro_batch": MICRO, "steps": args.steps, "threads": args.threads, "device": DEVICE,
                "precision": precision, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if DEVICE != "cpu" else None}
    rows: dict[str, dict[str, float | None]] = {}

    def write_json(ratio: float | None = None) -> None:
        if args.json is not None:  # after every row: a run stopped half-way keeps the rows it finished
            args.json.write_text(json.dumps({"settings": settings, "rows": rows, "native_over_trl": ratio}, indent=2))

    try:
        for name in args.trainers:
            _free_device_memory()
            start = _gib(peak=False)  # what earlier rows left allocated (counted in this row's peak too)
            if name in NATIVE_EXTRA:
                r = native_throughput(args.steps, args.threads, args.cache_dir, *extra, *NATIVE_EXTRA[name])
            else:
                r = trl_throughput(args.steps, args.threads, args.cache_dir, model_dir,
                                   gradient_checkpointing=False if name == "trl-no-ckpt" else None)
            rows[ROWS[name]] = {**r, "peak_gib": _gib(peak=True), "start_gib": start}
            write_json()
    finally:
        if model_dir is not None:
            shutil.rmtree(model_dir, ignore_errors=True)
    where = "" if DEVICE == "cpu" else f", {torch.cuda.get_device_name()} {precision}"
    print(f"{args.model_shape} model, {PROMPTS}x{G} rollouts, <= {MAX_NEW} new tokens, 2 updates/batch, "
          f"micro-batch {MICRO}, {args.threads} threads, torch {torch.__version__}, {args.steps} timed batches each"
          f"{where}")
    memory = DEVICE != "cpu"
    print(f"{'trainer':18s} {'tokens/s':>10s} {'s/batch':>9s} {'zero-var groups':>16s} {'vs trl':>7s}"
          + (f" {'peak GiB':>9s}" if memory else ""))
    trl_tps = rows["trl"]["tps"] if "trl" in rows else None
    for label, r in rows.items():
        vs = f"{r['tps'] / trl_tps:6.2f}x" if trl_tps else f"{'-':>7s}"
        print(f"{label:18s} {r['tps']:10.0f} {r['step']:9.2f} {r['zero_var']:16.2f} {vs}"
              + (f" {r['peak_gib']:9.2f}" if memory else ""))
    ratio = rows["native"]["tps"] / trl_tps if trl_tps and "native" in rows else None
    if ratio is not None:
        print(f"native / trl throughput: {ratio:.2f}x (target >= 3x): {'met' if ratio >= 3 else 'NOT met'}")
    write_json(ratio)
    if args.default_cell == "after" and args.model_shape == "tiny":
        print()
        print_default_cell(args.steps, args.threads, args.cache_dir)


if __name__ == "__main__":
    main()
