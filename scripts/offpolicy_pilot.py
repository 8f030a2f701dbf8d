"""The staleness pilot's table: per gate and policy lag, the first pass's ratio tails, the effective sample size of
the first-pass ratios, EUR and collapse events, from the cells of a sweep over ``hydra.sweeper.staleness``.

    harness sweep hydra.sweeper.gates=[sigmoid,softsign,clip] hydra.sweeper.staleness=[0,2,4,8] \\
        hydra.sweeper.seeds=[0,1] eval.enabled=false hydra.sweeper.baseline=false hydra.sweeper.report=false \\
        tracking.experiment=offpolicy-pilot
    python scripts/offpolicy_pilot.py outputs/cells

Each number is a per-run mean over training steps, then the mean over seeds with its min–max; collapse events are
summed over seeds. The levels of sweeps/offpolicy.yaml come from this table (where the tails grow and the gates'
EURs separate beyond their seeds), never from accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import keys as K
from harness.stability import run_scorecard

COLUMNS = (("first-pass mean |r-1|", K.pass_key(1, K.ABS_RATIO_DEV)),
           ("first-pass p95 |r-1|", K.pass_key(1, K.ABS_RATIO_DEV_P95)),
           ("first-pass ratio ESS", K.pass_key(1, K.RATIO_ESS)))


def cell_rows(cells: Path) -> list[dict]:
    rows = []
    for d in sorted(cells.iterdir()):
        if not (d / K.HISTORY_FILE).exists() or not (d / "config.yaml").exists():
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        history = json.loads((d / K.HISTORY_FILE).read_text())
        gate = cfg["gate"]["name"] + ("" if cfg["gate"]["name"] == "clip" else
                                      f" τ={cfg['gate']['tau_pos']:g}/{cfg['gate']['tau_neg']:g}")
        series = {k: [h.get(k, math.nan) for h in history] for k in {*(c for _, c in COLUMNS), K.STEP}}
        eur_key = K.pass_key(cfg["train"]["num_iterations"], K.EUR)
        card = run_scorecard({K.STEP: [h[K.STEP] for h in history],
                              **{k: [h.get(k, math.nan) for h in history] for k in
                                 (K.REWARD, K.REWARD_STD, K.REWARD_FORMAT, K.ENTROPY, K.GRAD_NORM,
                                  K.RESPONSE_LENGTH)},
                              K.EUR: [h.get(eur_key, math.nan) for h in history]},
                             rollouts=cfg["train"]["rollout_batch_size"])
        rows.append({"gate": gate, "staleness": int(cfg["train"].get("staleness", 0)), "seed": cfg["seed"],
                     **{name: float(np.nanmean(series[key])) for name, key in COLUMNS},
                     "mean EUR": card["eur_mean"], "entropy change": card["entropy_change"],
                     "collapse events": card["collapse_events"]})
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["gate"], r["staleness"])].append(r)
    names = [n for n, _ in COLUMNS] + ["mean EUR", "entropy change"]
    out = ["| gate | staleness | seeds | " + " | ".join(names) + " | collapse events |",
           "|---" * (len(names) + 4) + "|"]
    for (gate, lag), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cells = []
        for n in names:
            v = [r[n] for r in rs]
            cells.append(f"{np.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        out.append(f"| {gate} | {lag} | {len(rs)} | " + " | ".join(cells)
                   + f" | {int(sum(r['collapse events'] for r in rs))} |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path, help="a sweep's cells directory (outputs/cells)")
    print(table(cell_rows(parser.parse_args().cells)))
