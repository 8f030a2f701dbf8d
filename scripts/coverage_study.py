"""How often the report's intervals cover the truth: simulated paired sweeps with a known accuracy difference.

    python scripts/coverage_study.py [--sims 2000] [--seeds 3] [--problems 200] [--samples 4]

Each simulated sweep has two configurations, S seeds each, the same n problems (a shared difficulty per problem),
k samples per problem, and a per-seed accuracy shift of standard deviation ``seed_sd`` per configuration; the true
difference is 0.05. It prints, per ``seed_sd``, the share of sweeps whose 95% interval contains 0.05: the two-stage
interval of the report (harness.stats.two_stage_interval) and the problems-only bootstrap (seeds pooled per
problem), which leaves the seed-to-seed variance out.
"""

from __future__ import annotations

import argparse

import numpy as np

from harness.stats import problems_only_interval, two_stage_interval

TRUTH = 0.05


def simulate(rng: np.random.Generator, seeds: int, problems: int, samples: int, seed_sd: float) -> np.ndarray:
    """One sweep's seeds × problems matrix of accuracy differences (X − Y)."""
    difficulty = rng.uniform(-0.35, 0.35, problems)
    p_x = np.clip(0.5 + TRUTH / 2 + rng.normal(0, seed_sd, seeds)[:, None] + difficulty, 0, 1)
    p_y = np.clip(0.5 - TRUTH / 2 + rng.normal(0, seed_sd, seeds)[:, None] + difficulty, 0, 1)
    return rng.binomial(samples, p_x) / samples - rng.binomial(samples, p_y) / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    print(f"{args.sims} simulated sweeps: {args.seeds} seeds x {args.problems} problems x {args.samples} samples, "
          f"true difference {TRUTH}")
    print(f"{'seed SD':>8s} {'two-stage':>10s} {'problems only':>14s} {'mean CI width (two-stage)':>26s}")
    for seed_sd in (0.0, 0.01, 0.02, 0.03, 0.04):
        rng = np.random.default_rng(2026)
        two = one = 0
        width = 0.0
        for i in range(args.sims):
            d = simulate(rng, args.seeds, args.problems, args.samples, seed_sd)
            r = two_stage_interval(d, n_draws=2000, seed=i)
            two += r["ci_low"] <= TRUTH <= r["ci_high"]
            width += r["ci_high"] - r["ci_low"]
            lo, hi = problems_only_interval(d, n_boot=500, seed=i)
            one += lo <= TRUTH <= hi
        print(f"{seed_sd:8.2f} {two / args.sims:10.3f} {one / args.sims:14.3f} {width / args.sims:26.3f}")


if __name__ == "__main__":
    main()
