"""The prepared GPU check: every measurement of the GPU path in one run that fits a short GPU loan.

Run it through ``bash scripts/gpu_check.sh`` (which installs the carried wheels first) on the GPU machine, or with
``--dry`` on any CPU machine (tiny shapes, the same code paths; ``tests/test_gpu_check.py`` runs that)::

    python benchmarks/gpu_check.py [--dry] [--out DIR] [--budget-s 440] [--only STEP ...]

Steps, in this order, each a child process with its own time limit (cut to what is left of ``--budget-s``):

``env``          versions, the GPU, which packages are there
``tiny_model``   the embedded tiny model (carried from the CPU machine by ``scripts/gpu_wheels.sh``, else built)
``objective``    ``bench_objective.py`` on the GPU at 64 x 4096 tokens, float32 and bfloat16 log-probs: every gate
                 against clip; plus each gate's bf16 loss, gradient and ratio error against float64
``run_cell``     a default ``harness run`` cell (train, then the HF evaluation before and after), tracking off
``trainer_tiny`` ``bench_trainer.py`` on the GPU with bf16 autocast: native (and its variants) vs TRL, tiny model
``trainer_0.5b`` the same on a Qwen2.5-0.5B-shaped model with random weights: tokens/s and peak GPU memory

After every step ``<out>/gpu_check.json`` is rewritten (so a run killed half-way keeps what it measured), every
child's output goes to ``<out>/gpu_check.log``, and ``<out>/gpu_check.md`` renders the numbers as tables. A step
that fails or runs out of time is recorded as such and the next one runs. Exit code 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
MIN_STEP_S = 15  # a step with less time than this left is skipped rather than started
TAIL_CHARS = 4000  # of a failed step's output, kept in the JSON


@dataclass
class Step:
    """One measurement: the child command, its time limit and how to read its result."""

    name: str
    cmd: list[str]
    limit_s: float
    result: Callable[[], dict[str, Any]] | None = None  # read after the run, also a failed one (partial results)
    env: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- running a step


def run_step(cmd: list[str], timeout_s: float, log, env: dict[str, str] | None = None) -> tuple[str, float, int]:
    """Run ``cmd`` in its own process group with its output appended to ``log``; on timeout the whole group is
    killed (TRL's and the scorer's worker processes too). Returns (status, seconds, exit code): status is ``ok``,
    ``failed`` or ``timeout``."""
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, timeout_s))
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        code, status = -9, "timeout"
    finally:  # also after a clean exit: a leftover worker would hold GPU memory into the next step
        _kill_group(proc)
    return status, time.perf_counter() - t0, code


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def _tail(path: Path, start: int) -> str:
    with path.open("rb") as f:
        f.seek(max(start, path.stat().st_size - TAIL_CHARS))
        return f.read().decode("utf-8", "replace")


# ----------------------------------------------------------------------------- the steps


def plan(dry: bool, work: Path, cache_dir: Path, py: str = sys.executable) -> list[Step]:
    """The steps of one run. ``dry``: CPU, tiny shapes, one timed batch; else CUDA at the issue's sizes."""
    dev = "cpu" if dry else "cuda"
    threads = "1" if dry else "8"
    worker = [py, str(Path(__file__).resolve())]
    cell_dir = work / "run_cell"
    trainer_small = ["--steps", "1", "--prompts", "2", "--max-new", "8", "--micro", "16"]

    def json_of(name: str) -> Callable[[], dict[str, Any]]:
        return lambda: json.loads((work / f"{name}.json").read_text())

    cell = [py, "-m", "harness.cli", "run", "tracking.enabled=false", "backend.progress=false", "eval.baseline=true",
            f"cache_dir={cache_dir}", f"hydra.run.dir={cell_dir}"]
    if dry:
        cell += ["train.steps=1", "train.rollout_batch_size=16", "train.mini_batch_size=16",
                 "train.micro_batch_size=16", "eval.bench.arith.limit=8", "eval.bench.arith.k=2",
                 "eval.metrics.bootstrap=50", "backend.device=cpu", "backend.threads=1", "eval.hf.device=cpu",
                 "eval.hf.num_threads=1", "eval.scoring.workers=1"]
    tiny_rows = ["native", "trl"] if dry else ["native", "native-generate", "native-all-rows", "trl", "trl-no-ckpt"]
    shape_rows = ["native", "trl-no-ckpt"] if dry else ["native", "trl", "trl-no-ckpt"]
    trainer = [py, str(BENCH / "bench_trainer.py"), "--device", dev, "--threads", threads, "--cache-dir",
               str(cache_dir)]
    return [
        Step("env", [*worker, "--worker", "env", "--json", str(work / "env.json")], 60, json_of("env")),
        Step("tiny_model", [*worker, "--worker", "tiny_model", "--cache-dir", str(cache_dir), "--json",
                            str(work / "tiny_model.json")], 180, json_of("tiny_model")),
        Step("objective", [*worker, "--worker", "objective", "--device", dev, *(["--dry"] if dry else []),
                           "--json", str(work / "objective.json")], 120 if dry else 75, json_of("objective")),
        Step("run_cell", cell, 150 if dry else 120, lambda: cell_result(cell_dir)),
        Step("trainer_tiny", [*trainer, *(trainer_small if dry else ["--steps", "8"]), "--trainers", *tiny_rows,
                              "--json", str(work / "trainer_tiny.json")], 150 if dry else 100,
             json_of("trainer_tiny")),
        Step("trainer_0.5b", [*trainer, "--model-shape", "mini" if dry else "qwen2.5-0.5b",
                              *(trainer_small if dry else ["--steps", "3", "--max-new", "128"]), "--trainers",
                              *shape_rows, "--json", str(work / "trainer_0.5b.json")], 150,
             json_of("trainer_0.5b")),
    ]


def cell_result(cell_dir: Path) -> dict[str, Any]:
    """What a ``harness run`` cell wrote: train and eval wall times, per-step times, accuracy before/after."""
    sys.path.insert(0, str(REPO))
    from harness import keys as K

    summary = json.loads((cell_dir / K.SUMMARY_FILE).read_text())
    history = json.loads((cell_dir / K.HISTORY_FILE).read_text())
    times = [h[K.STEP_TIME_S] for h in history]
    later = sorted(times[1:]) or times  # the first step pays CUDA/cuBLAS warm-up
    acc = summary.get(K.EVAL, {}).get("mean_accuracy")
    before = summary.get(K.EVAL_INITIAL, {}).get("mean_accuracy")
    return {
        "steps": len(history), "train_time_s": summary.get(K.TRAIN_TIME_S), "eval_time_s": summary.get(K.EVAL_TIME_S),
        "first_step_s": times[0], "median_step_s": later[len(later) // 2], "mean_step_s": sum(later) / len(later),
        "accuracy_before": before, "accuracy_after": acc, "gain": summary.get("gain"),
        "tokens_per_step": sum(h[K.TOKENS] for h in history) / len(history),
    }


# ----------------------------------------------------------------------------- workers (run inside the children)


def env_worker() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "packages": {n: version(n) for n in ("transformers", "accelerate", "tokenizers", "trl", "datasets",
                                              "hydra-core", "omegaconf", "antlr4-python3-runtime", "math-verify",
                                              "latex2sympy2_extended", "pyarrow", "fsspec", "huggingface-hub",
                                              "dill", "multiprocess", "mlflow", "numpy", "scipy", "triton")},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def tiny_model_worker(cache_dir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from harness.models import read_build_info, recipe_hash, resolve_model_path, tiny_recipe

    name = f"tiny-{recipe_hash(tiny_recipe(None))}"
    cached = (cache_dir / name).is_dir()
    t0 = time.perf_counter()
    path = resolve_model_path("tiny", cache_dir=cache_dir)
    info = read_build_info(path)
    return {"path": path, "was_cached": cached, "seconds": time.perf_counter() - t0,
            "build_seconds": info.get("build_seconds"), "n_params": info.get("n_params"),
            "warm_start_greedy_accuracy": info.get("warmstart_eval", {}).get("greedy_accuracy")}


def objective_worker(device: str, dry: bool, json_path: Path) -> dict[str, Any]:
    """bench_objective at the issue's size in float32 and bfloat16, then the bf16 error of each gate."""
    sys.path.insert(0, str(BENCH))
    import bench_objective as bo

    batch, seq, reps, warmup = (4, 256, 3, 1) if dry else (64, 4096, 60, 5)
    out: dict[str, Any] = {"timing": {}}
    for dtype in ("float32", "bfloat16"):
        part = json_path.with_name(f"{json_path.stem}.{dtype}.json")
        bo.main(["--batch", str(batch), "--seq", str(seq), "--reps", str(reps), "--warmup", str(warmup),
                 "--device", device, "--dtype", dtype, "--json", str(part)])
        out["timing"][dtype] = json.loads(part.read_text())
        part.unlink()
    out["bf16_error"] = bf16_error(device, batch, seq)
    return out


def bf16_error(device: str, batch: int, seq: int) -> dict[str, Any]:
    """The ratio, and per gate the loss and gradient, computed from bf16 log-probs against float64 on the same inputs.
    This is what log-probs handed over in bf16 cost: each log π is rounded to 8 significant bits (an error of up to
    |log π|·2⁻⁸), so log r = log π − log π_old can move by twice that, as much as the ratio deviations the gates
    act on. (The native trainer's log-probs are float32 under autocast.)"""
    import torch

    sys.path.insert(0, str(BENCH))
    import bench_objective as bo

    from harness.gates import BUILTIN_GATES
    from harness.objective import policy_loss

    x64 = bo.make_inputs(batch, seq, device=device, dtype=torch.float64)
    mask = x64["mask"]
    r64, r16 = (torch.exp(x64["logp"].to(d).double() - x64["old_logp"].to(d).double())[mask]
                for d in (torch.float64, torch.bfloat16))
    out: dict[str, Any] = {"ratio_abs_err_mean": float((r16 - r64).abs().mean()),
                           "ratio_dev_mean": float((r64 - 1).abs().mean()), "gates": {}}
    for gate in BUILTIN_GATES:
        grads, losses = [], []
        for dtype in (torch.float64, torch.bfloat16):
            logp = x64["logp"].to(dtype, copy=True).requires_grad_(True)  # a fresh leaf per case
            loss, _ = policy_loss(logp, x64["old_logp"].to(dtype), x64["advantages"], mask, gate=gate,
                                  diagnostics=False)
            loss.backward()
            grads.append(logp.grad.double())
            losses.append(float(loss.detach()))
        g64, g16 = grads
        out["gates"][gate] = {"loss_abs_err": abs(losses[1] - losses[0]),
                              "grad_rel_err": float((g16 - g64).norm() / g64.norm().clamp(min=1e-30))}
    return out


# ----------------------------------------------------------------------------- the report


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def render_markdown(data: dict[str, Any]) -> str:
    """The numbers of one run as Markdown tables (what docs/paper.md, "The GPU check", takes)."""
    steps = data["steps"]
    env = steps.get("env", {}).get("result", {})
    lines = [f"# GPU check{' (dry run, CPU)' if data['dry'] else ''}", "",
             f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}, transformers "
             f"{env.get('packages', {}).get('transformers')}, trl {env.get('packages', {}).get('trl')}; "
             f"total {data.get('wall_s', 0):.0f} s of a {data['budget_s']:.0f} s budget", "",
             "| step | status | wall s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {s['status']} | {_fmt(s.get('wall_s'), '.1f')} |" for n, s in steps.items()]

    obj = steps.get("objective", {}).get("result")
    if obj:
        t32, t16 = obj["timing"]["float32"], obj["timing"]["bfloat16"]
        err = obj["bf16_error"]
        lines += ["", f"**policy_loss forward+backward**, {t32['batch']}x{t32['seq']} tokens, {t32['device']}, "
                  f"median of {t32['reps']}: ms (x clip); bf16 log-probs against float64: gradient relative error "
                  f"(ratio: mean abs error {err['ratio_abs_err_mean']:.4f} where mean abs(r - 1) is "
                  f"{err['ratio_dev_mean']:.4f})", "",
                  "| gate | fp32 diag | fp32 no diag | bf16 diag | bf16 no diag | bf16 grad rel. err |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for g, row32 in t32["gates"].items():
            cells = [f"{r[k]['ms']:.2f} ({r[k]['x_clip']:.2f}x)" for r in (row32, t16["gates"][g])
                     for k in ("diag=True", "diag=False")]
            lines.append(f"| {g} | " + " | ".join(cells)
                         + f" | {_fmt(err['gates'].get(g, {}).get('grad_rel_err'), '.2e')} |")

    for name in ("trainer_tiny", "trainer_0.5b"):
        tr = steps.get(name, {}).get("result")
        if not tr:
            continue
        s = tr["settings"]
        lines += ["", f"**{s['model']} model**, {s['prompts']}x{s['generations']} rollouts, <= {s['max_new_tokens']} "
                  f"new tokens, micro-batch {s['micro_batch']}, {s['steps']} timed batches, {s['precision']}", "",
                  "| trainer | tokens/s | s/batch | peak GiB | vs trl |", "| --- | --- | --- | --- | --- |"]
        trl = tr["rows"].get("trl", {}).get("tps")
        for label, r in tr["rows"].items():
            vs = f"{r['tps'] / trl:.2f}x" if trl else "—"
            lines.append(f"| {label} | {r['tps']:.0f} | {r['step']:.2f} | {_fmt(r.get('peak_gib'))} | {vs} |")

    cell = steps.get("run_cell", {})
    if cell.get("result"):
        c = cell["result"]
        how = "dry-run settings" if data["dry"] else "defaults"
        lines += ["", f"**`harness run` cell** ({how}, `eval.baseline=true`, tracking off)", "",
                  "| wall s | train s | steps | s/step (median after the 1st) | 1st step s | eval s (before + after) "
                  "| accuracy before → after |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {cell['wall_s']:.1f} | {_fmt(c['train_time_s'], '.1f')} | {c['steps']} | "
                  f"{c['median_step_s']:.3f} | {c['first_step_s']:.2f} | {_fmt(c['eval_time_s'], '.1f')} | "
                  f"{_fmt(c['accuracy_before'], '.4f')} → {_fmt(c['accuracy_after'], '.4f')} |"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)  # a previous run's cell checkpoints would be resumed or collide
    work.mkdir(parents=True)
    cache_dir = Path(args.cache_dir).resolve()
    json_path, log_path, md_path = out / "gpu_check.json", out / "gpu_check.log", out / "gpu_check.md"
    steps = [s for s in plan(args.dry, work, cache_dir) if not args.only or s.name in args.only]
    data: dict[str, Any] = {"dry": args.dry, "budget_s": args.budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "steps": {s.name: {"status": "pending"} for s in steps}}
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    # Children: no progress bars in the log, nothing from the network (the GPU machine reaches none).
    child_env = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HARNESS_CACHE_DIR": str(cache_dir),
                 "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    previous = signal.signal(signal.SIGTERM, _interrupt)  # scripts/gpu_check.sh's outer `timeout` sends TERM
    try:
        return _run_steps(steps, data, deadline, t_start, child_env, json_path, log_path, md_path)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_steps(steps: list[Step], data: dict[str, Any], deadline: float, t_start: float, child_env: dict[str, str],
               json_path: Path, log_path: Path, md_path: Path) -> int:
    failed = 0
    with log_path.open("a") as log:
        for step in steps:
            left = deadline - time.perf_counter()
            entry: dict[str, Any] = {"limit_s": step.limit_s}
            if left < MIN_STEP_S:
                entry["status"] = "skipped (budget)"
            else:
                limit = min(step.limit_s, left)
                log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(step.cmd)}\n")
                log.flush()
                start = log_path.stat().st_size
                try:
                    status, seconds, code = run_step(step.cmd, limit, log, {**child_env, **step.env})
                except KeyboardInterrupt:  # the outer timeout (or ^C): the child is gone, keep what was measured
                    entry.update(status="interrupted", output_tail=_tail(log_path, start))
                    data["steps"][step.name] = entry
                    _write_json(json_path, data)
                    print(f"[gpu_check] {step.name}: interrupted", flush=True)
                    return 1
                entry.update(status=status, wall_s=seconds, exit_code=code, limit_s=limit)
                if step.result is not None:
                    try:  # also after a failure or timeout: the trainer benchmarks write each row as it finishes
                        entry["result"] = step.result()
                    except Exception as exc:
                        if status == "ok":  # a child that exits 0 without its files is a failure too
                            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                if entry["status"] != "ok":
                    entry["output_tail"] = _tail(log_path, start)
            failed += entry["status"] != "ok"
            data["steps"][step.name] = entry
            data["wall_s"] = time.perf_counter() - t_start
            _write_json(json_path, data)
            try:
                md_path.write_text(render_markdown(data))
            except Exception as exc:  # a result of an unexpected shape must not stop the remaining steps
                md_path.write_text(f"could not render {json_path.name}: {type(exc).__name__}: {exc}\n")
            print(f"[gpu_check] {step.name}: {entry['status']}"
                  + (f" in {entry['wall_s']:.1f} s" if "wall_s" in entry else ""), flush=True)
    print(f"[gpu_check] {len(steps) - failed}/{len(steps)} steps ok in {data['wall_s']:.0f} s; {json_path}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes: check the script, measure nothing")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "gpu_check_out")),
                   help="results folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--work", default=str(REPO / ".cache" / "gpu_check" / "work"),
                   help="scratch folder (the run cell's checkpoints, the steps' raw JSON)")
    p.add_argument("--cache-dir", default=os.environ.get("HARNESS_CACHE_DIR", str(REPO / ".cache" / "gpu_check")),
                   help="model cache (the tiny model)")
    p.add_argument("--budget-s", type=float, default=None, help="total time for all steps (default 440; dry 900)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--worker", choices=["env", "tiny_model", "objective"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 900.0 if args.dry else 440.0
    if args.worker is None:
        return orchestrate(args)
    if args.worker == "env":
        result = env_worker()
    elif args.worker == "tiny_model":
        result = tiny_model_worker(Path(args.cache_dir))
    else:
        result = objective_worker(args.device, args.dry, args.json)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
