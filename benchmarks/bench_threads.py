"""The default cell's step time on a quiet machine and beside CPU-bound processes, with OpenMP threads that spin
while they wait (the runtime's default), sleep (``OMP_WAIT_POLICY=PASSIVE``, what ``import harness`` sets), or spin
briefly (``GOMP_SPINCOUNT``).

Each row is one ``harness run`` of the default cell (the tiny model on ``arith``; no evaluation, no tracking) in its own
process, ``--steps`` steps long; its time is the median ``step_time_s`` of the steps after the first (read from the
run's ``train_history.json``). "loaded" runs it beside ``--load`` CPU-bound processes (one per core by default),
started before the run and stopped after it: ``--load-kind torch`` (default) multiplies matrices with torch's default
threads and the row's OpenMP setting, as other training jobs or test runs on the machine do; ``python`` spins in a
pure-Python loop. Rows are interleaved in ``--rounds`` rounds so a slow patch of the machine hits every variant alike;
each row's ratio is against the quiet row of the same thread count and OpenMP setting. Run:

    python benchmarks/bench_threads.py [--steps 4] [--rounds 1] [--threads 1 2] [--load N] [--load-kind torch]
        [--policies default PASSIVE GOMP_SPINCOUNT=10000]

Target (issue "Real models"): loaded <= 3x quiet with the harness's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADERS = {
    "python": "while True: pass",
    "torch": "import torch\na = torch.randn(192, 192)\nwhile True:\n    b = a @ a",
}


def policy_env(policy: str) -> dict[str, str]:
    """The environment of one OpenMP setting: ``default`` (the runtime's own: an empty OMP_WAIT_POLICY, which harness
    leaves alone), ``PASSIVE``/``ACTIVE``, or ``NAME=VALUE`` (e.g. ``GOMP_SPINCOUNT=10000``)."""
    if "=" in policy:
        name, value = policy.split("=", 1)
        return {"OMP_WAIT_POLICY": "", name: value}
    return {"OMP_WAIT_POLICY": "" if policy == "default" else policy}


def run_cell(steps: int, threads: int, policy: str, out: Path) -> float:
    """Median step time (s) of one default-cell run, after its first step."""
    env = {**os.environ, **policy_env(policy)}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "harness.cli", "run", f"train.steps={steps}", f"train.save_every={steps}",
           "eval.enabled=false", "tracking.enabled=false", f"backend.threads={threads}", "backend.progress=false",
           f"output_dir={out}"]
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    history = json.loads((out / "train_history.json").read_text())
    return statistics.median(h["step_time_s"] for h in history[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--policies", nargs="+", default=["default", "PASSIVE"])
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="CPU-bound processes beside a loaded run")
    parser.add_argument("--load-kind", choices=sorted(LOADERS), default="torch")
    args = parser.parse_args()

    # Build (or find) the tiny model first, so no timed run pays for it.
    subprocess.run([sys.executable, "-c", "from harness.models import resolve_model_path; resolve_model_path('tiny')"],
                   check=True, cwd=REPO)
    times: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for load in ("quiet", "loaded"):
                for threads in args.threads:
                    for policy in args.policies:
                        load_env = {**os.environ, **policy_env(policy)}
                        load_env.pop("OMP_NUM_THREADS", None)
                        spinners = [subprocess.Popen([sys.executable, "-c", LOADERS[args.load_kind]], env=load_env)
                                    for _ in range(args.load if load == "loaded" else 0)]
                        try:
                            time.sleep(1.0 if spinners else 0.0)
                            out = Path(tmp) / f"{r}-{load}-{threads}-{policy.replace('=', '_')}"
                            t = run_cell(args.steps, threads, policy, out)
                        finally:
                            for p in spinners:
                                p.kill()
                                p.wait()
                        times.setdefault((load, threads, policy), []).append(t)
                        print(f"round {r + 1}: {load:6s} threads={threads} {policy:22s} {t:7.2f} s/step", flush=True)

    print(f"\ndefault cell, {args.steps} steps per run (median s/step after the first), {args.load} {args.load_kind} "
          f"processes when loaded, {os.cpu_count()} cores")
    print(f"{'threads':>7}  {'OpenMP setting':22}  {'quiet s/step':>12}  {'loaded s/step':>13}  {'loaded/quiet':>12}")
    worst = 0.0
    for threads in args.threads:
        for policy in args.policies:
            quiet = statistics.median(times[("quiet", threads, policy)])
            loaded = statistics.median(times[("loaded", threads, policy)])
            print(f"{threads:>7}  {policy:22}  {quiet:12.2f}  {loaded:13.2f}  {loaded / quiet:11.1f}x")
            if policy == "PASSIVE":
                worst = max(worst, loaded / quiet)
    print(f"with PASSIVE (the harness's setting): loaded <= {worst:.1f}x quiet (target <= 3x): "
          f"{'met' if worst <= 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
