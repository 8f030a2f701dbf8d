"""Does the verdict keep its promises? Simulated sweeps with a known truth through :func:`harness.verdict.gate_verdict`.

Each simulated sweep has G gates (clip with one configuration, each smooth gate with T temperatures), S seeds per
configuration and n problems answered k times, on one benchmark. A configuration c at seed s answers problem p
correctly with probability clip(σ(θ_p) + δ_c + u_cs, 0, 1): θ_p ~ N(0, 1.5²) is the problem's difficulty (shared by
every configuration), δ_c the configuration's true effect, u_cs = σ_seed (√ρ w_s + √(1 − ρ) ε_cs) the luck of the
training run (ρ: how much of it seed s shares across configurations).

Two questions, two kinds of setting:

* **null** (every δ_c = 0): the share of sweeps in which the verdict claims *any* difference must be at most α = 5%
  (plus Monte-Carlo error), at 1, 3 and 10 seeds, with 1 and with 10 τ per gate;
* **power** (two gates, one configuration each, δ = 2 points): the seed SD is set so that the power the harness
  states for that design (:func:`harness.stats.two_stage_power`, from the true variance components) is 80%; the share
  of sweeps that find the difference with the right sign must be 75–85%.

    python scripts/verdict_simulation.py                  # every setting, 1,000 sweeps each
    python scripts/verdict_simulation.py --sweeps 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.stats import expected_components, two_stage_power
from harness.verdict import ALPHA, Arm, gate_verdict

DIFFICULTY_SD = 1.5


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "null" or "power"
    gates: int
    taus: int  # configurations per smooth gate (clip has one)
    seeds: int
    problems: int = 1319  # GSM8K test
    k: int = 4
    seed_sd: float = 0.01  # accuracy points (1 point)
    rho: float = 0.0  # share of the seed luck common to every configuration at one seed
    effect: float = 0.0  # δ of the first gate in a power setting


def settings(seed_sd_power: float) -> list[Setting]:
    out = []
    for seeds in (1, 3, 10):
        for taus in (1, 10):
            out.append(Setting(f"null S={seeds} tau/gate={taus}", "null", 5, taus, seeds))
    out.append(Setting("null S=3 tau/gate=10, seeds shared (rho=0.5)", "null", 5, 10, 3, rho=0.5))
    out.append(Setting("power S=5, 2 gates, +2 points", "power", 2, 1, 5, seed_sd=seed_sd_power, effect=0.02))
    return out


def simulate_arms(s: Setting, rng: np.random.Generator) -> list[Arm]:
    theta = rng.normal(0.0, DIFFICULTY_SD, s.problems)
    base = 1.0 / (1.0 + np.exp(-theta))
    problems = tuple(f"p{i}" for i in range(s.problems))
    seeds = tuple(str(i) for i in range(s.seeds))
    shared = rng.standard_normal(s.seeds)
    arms = []
    for g in range(s.gates):
        n_cfg = 1 if g == s.gates - 1 and s.kind == "null" else s.taus  # the last gate plays clip
        delta = s.effect if g == 0 else 0.0
        for c in range(n_cfg):
            luck = s.seed_sd * (math.sqrt(s.rho) * shared + math.sqrt(1 - s.rho) * rng.standard_normal(s.seeds))
            p = np.clip(base[None, :] + delta + luck[:, None], 0.0, 1.0)
            scores = rng.binomial(s.k, p) / s.k
            arms.append(Arm(f"g{g}-t{c}", f"g{g}", seeds, problems, scores))
    return arms


def true_components(s: Setting, n_mc: int = 200_000) -> dict:
    """The unpaired design's expected mean squares of a power setting, from the generating model."""
    theta = np.random.default_rng(12345).normal(0.0, DIFFICULTY_SD, n_mc)
    p = 1.0 / (1.0 + np.exp(-theta))
    resid = float((p * (1 - p)).mean() / s.k)  # within-seed item variance of a k-sample mean
    return expected_components("unpaired", n=s.problems, seeds=(s.seeds, s.seeds),
                               sigma2_seed=(s.seed_sd ** 2, s.seed_sd ** 2), sigma2_resid=(resid, resid),
                               sigma2_problem=0.0)


def seed_sd_for_power(seeds: int, problems: int, k: int, target: float = 0.8, effect: float = 0.02) -> float:
    """The seed SD at which the stated power to find ``effect`` is ``target`` (bisection)."""
    lo, hi = 0.0, 0.05
    for _ in range(30):
        mid = (lo + hi) / 2
        s = Setting("", "power", 2, 1, seeds, problems, k, seed_sd=mid, effect=effect)
        if two_stage_power("unpaired", true_components(s), effect, n_sim=4000) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def run(s: Setting, sweeps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    hits, right = 0, 0
    start = time.time()
    for _ in range(sweeps):
        verdict = gate_verdict({"bench": simulate_arms(s, rng)})
        claims = verdict["claims"]
        hits += bool(claims)
        right += any(c["gate_a"] == "g0" and c["gate_b"] == "g1" for c in claims)
    rate = (right if s.kind == "power" else hits) / sweeps
    out = {**asdict(s), "sweeps": sweeps, "rate": rate, "mc_se": math.sqrt(max(rate * (1 - rate), 1e-9) / sweeps),
           "seconds": round(time.time() - start, 1)}
    if s.kind == "power":
        out["stated_power"] = two_stage_power("unpaired", true_components(s), s.effect, n_sim=4000)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=1000, help="simulated sweeps per setting")
    ap.add_argument("--only", default=None, help="run the settings whose name contains this text")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    chosen = [s for s in settings(seed_sd_for_power(5, 1319, 4)) if args.only is None or args.only in s.name]
    results = []
    print(f"{'setting':<48} {'rate':>6} {'± MC SE':>8}  target")
    for i, s in enumerate(chosen):
        r = run(s, args.sweeps, seed=i)
        results.append(r)
        target = (f"<= {ALPHA:.0%} (+MC)" if s.kind == "null"
                  else f"75-85% (stated power {r['stated_power']:.1%}, seed SD {s.seed_sd:.4f})")
        print(f"{s.name:<48} {r['rate']:6.1%} {r['mc_se']:8.1%}  {target}   [{r['seconds']} s]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
