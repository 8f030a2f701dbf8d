"""Scorer throughput in verdicts per second on a realistic mix.

The mix: real MATH500 and GSM8K golds (half each), every gold used twice, once with a correct and
once with a perturbed answer (numeric gold + 1, or another row's LaTeX answer), inside a realistic
response ``<think>{reference solution}</think> <answer>...</answer>``. The reference solution inside
the think block contains the correct ``\\boxed{}``/``#### N``, so extraction is exercised as in training.

Each (response, gold) pair is unique and the pool is restarted before timing, so no cache of an
earlier run inflates the number; the pool's start-up is excluded (the trainer reuses one pool).

Run: ``python benchmarks/bench_scoring.py [--n 2000] [--workers 2]``. Another benchmark can import
:func:`scorer_throughput`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

from harness import scoring, verify

_REPO = Path(__file__).resolve().parents[1]
_THINK_CHARS = 1500  # about 400 tokens of reasoning before the answer


def _data_dir() -> Path:
    return Path(os.environ.get("HARNESS_DATA_DIR", _REPO.parent / "shared" / "data"))


def _rows(name: str) -> list[dict]:
    path = _data_dir() / name / "test.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; set HARNESS_DATA_DIR to the staged datasets")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _perturb(answer: str, others: list[str], rng: random.Random) -> str:
    """A wrong answer: integer + 1, else an answer of another row that differs from this one."""
    if re.fullmatch(r"-?\d+", answer.strip()):
        return str(int(answer) + 1)
    squashed = "".join(answer.split())
    while True:
        other = rng.choice(others)
        if "".join(other.split()) != squashed:
            return other


def realistic_mix(n: int, seed: int = 0) -> tuple[list[str], list[str], list[bool]]:
    """``n`` responses, their golds, and whether each response was built to be correct."""
    rng = random.Random(seed)
    math500, gsm8k = _rows("math500"), _rows("gsm8k")
    pool = [(r, "math500") for r in math500] + [(r, "gsm8k") for r in gsm8k[: len(math500)]]
    math_answers = [r["answer"] for r in math500]
    cases = [(row, good) for row, _ in pool for good in (True, False)]
    if n > len(cases):
        raise ValueError(f"n={n} exceeds the {len(cases)} unique (gold, answer) cases in the mix")
    rng.shuffle(cases)
    responses, golds, expected = [], [], []
    for row, good in cases[:n]:
        gold = row["answer"]
        answer = gold if good else _perturb(gold, math_answers, rng)
        think = (row["solution"] or "")[:_THINK_CHARS]
        responses.append(f"<think>\n{think}\n</think>\n<answer> {answer} </answer>")
        golds.append(gold)
        expected.append(good)
    return responses, golds, expected


def _worker_cpu_s() -> float | None:
    """CPU seconds used so far by the scorer's pool workers (Linux /proc; ``None`` elsewhere)."""
    pool = verify._pool
    pids = list(getattr(pool, "_processes", None) or {})
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / ticks
    except (OSError, ValueError, IndexError):
        return None


def measure(n: int = 2000, workers: int = 2) -> dict[str, float]:
    """Wall-clock and CPU figures of one timed :func:`harness.scoring.score_batch` call on the mix."""
    responses, golds, _ = realistic_mix(n)
    verify.shutdown_pool()  # cold worker caches: no answer of this mix has been parsed before
    scoring.score_batch(["<answer>\\frac{1}{3}</answer>"] * workers, ["\\sqrt{2}"] * workers, workers=workers)
    cpu_workers0, cpu_parent0 = _worker_cpu_s(), time.process_time()
    start = time.perf_counter()
    scoring.score_batch(responses, golds, workers=workers)
    wall = time.perf_counter() - start
    cpu_parent, cpu_workers1 = time.process_time() - cpu_parent0, _worker_cpu_s()
    out = {"n": n, "wall_s": wall, "verdicts_per_s": n / wall, "parent_cpu_s": cpu_parent}
    if cpu_workers0 is not None and cpu_workers1 is not None:
        out["worker_cpu_s"] = cpu_workers1 - cpu_workers0
        # What the same work would take on `workers` otherwise idle cores: the parent's serial part
        # plus the workers' CPU spread evenly.
        out["idle_estimate_verdicts_per_s"] = n / (cpu_parent + out["worker_cpu_s"] / workers)
    return out


def scorer_throughput(n: int = 2000, workers: int = 2) -> float:
    """Verdicts per second (wall clock) of :func:`harness.scoring.score_batch` on :func:`realistic_mix`."""
    return measure(n, workers)["verdicts_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    responses, golds, expected = realistic_mix(args.n)
    quick = sum(
        scoring._quick_verdict(scoring.extract_answer(r)[0] or "", g) is not None
        for r, g in zip(responses, golds, strict=True)
    )
    scores = scoring.score_batch(responses, golds, workers=args.workers)
    agree = sum(s.correct == e for s, e in zip(scores, expected, strict=True))
    m = measure(args.n, args.workers)
    print(f"items: {args.n} ({quick} decided without math-verify, {args.n - quick} through the pool)")
    print(f"verdicts matching construction: {agree}/{args.n}")
    print(f"scorer throughput: {m['verdicts_per_s']:.0f} verdicts/s (workers={args.workers}, wall {m['wall_s']:.2f}s)")
    if "worker_cpu_s" in m:
        print(
            f"cpu: parent {m['parent_cpu_s']:.2f}s, workers {m['worker_cpu_s']:.2f}s -> "
            f"{m['idle_estimate_verdicts_per_s']:.0f} verdicts/s on {args.workers} idle cores"
        )
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (other jobs slow the wall-clock figure)")


if __name__ == "__main__":
    main()
