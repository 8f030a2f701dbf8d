"""Forward + backward time of ``policy_loss`` for every gate and ratio-control method, relative to ``clip``.

Usage::

    python benchmarks/bench_objective.py [--batch 64] [--seq 1024] [--reps 60] [--warmup 5]
                                         [--gates sigmoid erf ... clip dual_clip cispo ...] [--threads N]
                                         [--clock wall|cpu] [--device cpu|cuda] [--dtype float32|bfloat16]
                                         [--json PATH]

All gates are timed side by side in one process on identical inputs (float32, CPU): each repetition
runs every (gate, diagnostics) case once in a freshly shuffled order, so drift in machine load hits all
cases alike, and the table reports medians and the ratio of each median to clip's median with the same
``diagnostics`` setting. ``diagnostics=True`` is how the trainer calls it. Targets: every smooth gate
<= 1.25x clip; every ratio-control method of harness/methods.py and dual-clip <= 1.5x clip, except KL-Cov and
Clip-Cov, whose choice of tokens over the batch's covariances is not elementwise (reported, no target). ``dro`` runs
at dro_beta = 0.1.

``--clock cpu`` times with ``time.thread_time`` (CPU time of the calling thread) instead of wall time;
use it with ``--threads 1`` on a shared, loaded machine, where wall time mostly measures waiting for a
core. Custom gates (``--gates tests.custom_gate_module:F``) resolve from the repository root.

``--device cuda`` times on the GPU (the device is synchronized before and after each case, so a time is the
kernels' time, not the launch's); ``--dtype bfloat16`` casts the log-probs to bf16, as TRL hands them over under bf16
autocast (the native trainer's are float32 either way). ``--json PATH`` also writes the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from harness.gates import BUILTIN_GATES, RATIO_CONTROL, SMOOTH_GATES
from harness.objective import policy_loss

TARGET = 1.25
METHOD_TARGET = 1.5
NOT_ELEMENTWISE = ("kl_cov", "clip_cov")
ROOT = Path(__file__).resolve().parents[1]
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(batch: int, seq: int, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Realistic inputs: log r ~ N(0, 0.1), ~80% of tokens unmasked, advantages of both signs. Drawn on the CPU
    (the same numbers on every device), then moved; ``dtype`` applies to the log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, seq, generator=gen) * 5.0
    old_logp = logp + 0.1 * torch.randn(batch, seq, generator=gen)
    lengths = (seq * (0.6 + 0.4 * torch.rand(batch, generator=gen))).long()  # ragged, mean 0.8·T
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    advantages = torch.randn(batch, generator=gen)
    return {"logp": logp.to(device, dtype), "old_logp": old_logp.to(device, dtype),
            "advantages": advantages.to(device), "mask": mask.to(device)}


def step(inputs: dict[str, torch.Tensor], gate: str, diagnostics: bool, clock=time.perf_counter,
         nu: float | None = None) -> float:
    """One forward + backward, as the trainer calls it; returns the time in seconds."""
    logp = inputs["logp"].detach().requires_grad_(True)
    cuda = logp.is_cuda
    if cuda:  # kernels still queued from the previous case must not count here
        torch.cuda.synchronize(logp.device)
    t0 = clock()
    loss, _ = policy_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], gate=gate,
                          diagnostics=diagnostics, nu=nu if gate == "student" else None,
                          method_params={"dro_beta": 0.1} if gate == "dro" else None)
    loss.backward()
    if cuda:  # the backward returns once its kernels are queued
        torch.cuda.synchronize(logp.device)
    return clock() - t0


def run(gates: list[str], batch: int, seq: int, reps: int, warmup: int, seed: int = 0,
        clock=time.perf_counter, device: str = "cpu", dtype: torch.dtype = torch.float32,
        nu: float | None = None) -> dict:
    inputs = make_inputs(batch, seq, seed, device, dtype)
    cases = [(g, d) for d in (True, False) for g in gates]
    times: dict[tuple[str, bool], list[float]] = {c: [] for c in cases}
    rng = random.Random(seed)
    for rep in range(warmup + reps):
        order = cases[:]
        rng.shuffle(order)
        for gate, diag in order:
            dt = step(inputs, gate, diag, clock, nu)
            if rep >= warmup:
                times[(gate, diag)].append(dt)
    return {c: statistics.median(v) for c, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gates", nargs="+", default=list(dict.fromkeys([*BUILTIN_GATES, *RATIO_CONTROL])))
    p.add_argument("--nu", type=float, default=4.0, help="tail index when --gates includes student")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time of this thread")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the log-probs")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device != "cpu" and args.clock == "cpu":
        p.error("--clock cpu measures this thread's CPU time, not the GPU's; use --clock wall with --device cuda")
    sys.path.insert(0, str(ROOT))  # custom gates such as tests.custom_gate_module:F
    if args.threads:
        torch.set_num_threads(args.threads)
    gates = list(dict.fromkeys([*args.gates, "clip"]))

    med = run(gates, args.batch, args.seq, args.reps, args.warmup, clock=CLOCKS[args.clock], device=args.device,
              dtype=DTYPES[args.dtype], nu=args.nu)
    where = "CPU" if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    print(f"policy_loss forward+backward, {args.batch}x{args.seq} {args.dtype} {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; {args.clock} clock, "
          f"median of {args.reps} interleaved reps after {args.warmup} warmup")
    wn = max(10, *map(len, gates))
    print(f"{'gate':<{wn}} {'diag=True ms':>13} {'x clip':>8} {'diag=False ms':>14} {'x clip':>8}  "
          f"target <= {TARGET}x (smooth gates), <= {METHOD_TARGET}x (methods)")
    missed = []
    for g in gates:
        row = [f"{g:<{wn}}"]
        for diag in (True, False):
            ratio = med[(g, diag)] / med[("clip", diag)]
            row.append(f"{med[(g, diag)] * 1e3:>{13 if diag else 14}.2f} {ratio:>7.2f}x")
            target = TARGET if g in SMOOTH_GATES else METHOD_TARGET if g in RATIO_CONTROL else None
            if target is not None and g not in NOT_ELEMENTWISE and ratio > target:
                missed.append(f"{g} (diagnostics={diag}: {ratio:.2f}x)")
        note = ("" if g in SMOOTH_GATES or g == "clip" else
                "  (batch-level choice, no target)" if g in NOT_ELEMENTWISE else "" if g in RATIO_CONTROL else
                f"  (nu={args.nu:g}: F by quadrature, no target)" if g == "student" else "  (custom)")
        print(" ".join(row) + note)
    print("every gate and method within its target" if not missed else "MISSED target: " + ", ".join(missed))
    if args.json is not None:
        rows = {g: {f"diag={d}": {"ms": med[(g, d)] * 1e3, "x_clip": med[(g, d)] / med[("clip", d)]}
                    for d in (True, False)} for g in gates}
        args.json.write_text(json.dumps({
            "batch": args.batch, "seq": args.seq, "reps": args.reps, "warmup": args.warmup, "device": where,
            "dtype": args.dtype, "clock": args.clock, "torch": torch.__version__, "target": TARGET,
            "method_target": METHOD_TARGET, "gates": rows,
            "missed": missed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
