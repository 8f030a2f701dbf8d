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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS, G, MAX_NEW, MICRO, TEMPERATURE, LR, SEED = 16, 8, 24, 64, 0.7, 3e-5, 0


def _native_cfg(steps: int, threads: int, cache_dir: str, *extra: str):
    import tempfile

    from omegaconf import open_dict

    from tests.conftest import compose

    cfg = compose([f"train.steps={steps + 1}", f"train.rollout_batch_size={PROMPTS * G}", f"train.num_generations={G}",
                   f"train.mini_batch_size={PROMPTS * G}", f"train.micro_batch_size={MICRO}",
                   f"train.max_new_tokens={MAX_NEW}", "train.num_iterations=2",
                   f"train.rollout_temperature={TEMPERATURE}", f"train.lr={LR}", "gate=sigmoid", f"seed={SEED}",
                   f"train.save_every={10**6}", "backend.progress=false", f"backend.threads={threads}",
                   "backend.device=cpu", "eval.enabled=false", f"cache_dir={cache_dir}", *extra])
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(prefix="bench-native-")
    return cfg


def native_throughput(steps: int, threads: int, cache_dir: str, *extra: str) -> dict[str, float]:
    from harness.backends.native import train

    history = train(_native_cfg(steps, threads, cache_dir, *extra)).history[1:]  # drop the warm-up step
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


def trl_throughput(steps: int, threads: int, cache_dir: str) -> dict[str, float]:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from harness.models import model_prompt_config, resolve_model_path
    from harness.prompts import render_prompt
    from harness.scoring import has_format, score_batch

    torch.set_num_threads(threads)
    path = resolve_model_path("tiny", cache_dir=cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    pcfg = model_prompt_config("tiny")
    data = Dataset.from_list([{"prompt": render_prompt(tok, p["problem"], pcfg), "answer": p["answer"]}
                              for p in native_prompt_order(steps)])

    def reward(completions, answer, **_):  # same reward as native: format + strict accuracy
        acc = [float(s.correct) for s in score_batch(completions, answer, fallbacks=())]
        return [float(has_format(c)) + a for c, a in zip(completions, acc, strict=True)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=False, loss_type="sapo",
        num_generations=G, generation_batch_size=PROMPTS * G, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * G // MICRO, num_iterations=2, max_completion_length=MAX_NEW,
        learning_rate=LR, max_steps=2 * (steps + 1), logging_steps=1, report_to="none", save_strategy="no",
        temperature=TEMPERATURE, top_k=0, seed=SEED, shuffle_dataset=False,
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
    # Two optimizer steps per rollout batch; drop the first batch (warm-up) for both trainers.
    seconds = sum(times[2:])
    batch_tokens = tokens[-1] - tokens[1]  # cumulative prompt+completion tokens after the warm-up batch
    return {"tps": batch_tokens / seconds, "step": seconds / (len(times[2:]) / 2),
            "zero_var": sum(zero_var[1:]) / max(1, len(zero_var[1:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rollout batches per trainer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "test"))
    args = parser.parse_args()
    import torch

    rows = {
        "native": native_throughput(args.steps, args.threads, args.cache_dir),
        "native, generate": native_throughput(args.steps, args.threads, args.cache_dir, "backend.sampler=generate"),
        "native, all rows": native_throughput(args.steps, args.threads, args.cache_dir,
                                              "backend.skip_zero_advantage=false"),
        "trl": trl_throughput(args.steps, args.threads, args.cache_dir),
    }
    print(f"tiny model, {PROMPTS}x{G} rollouts, <= {MAX_NEW} new tokens, 2 updates/batch, micro-batch {MICRO}, "
          f"{args.threads} threads, torch {torch.__version__}, {args.steps} timed batches each")
    print(f"{'trainer':18s} {'tokens/s':>10s} {'s/batch':>9s} {'zero-var groups':>16s} {'vs trl':>7s}")
    trl_tps = rows["trl"]["tps"]
    for name, r in rows.items():
        print(f"{name:18s} {r['tps']:10.0f} {r['step']:9.2f} {r['zero_var']:16.2f} {r['tps'] / trl_tps:6.2f}x")
    ratio = rows["native"]["tps"] / trl_tps
    print(f"native / trl throughput: {ratio:.2f}x (target >= 3x): {'met' if ratio >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
