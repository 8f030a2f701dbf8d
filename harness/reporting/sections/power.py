"""Report section (i): for each comparison of the verdict's family (:attr:`harness.reporting.data.ExperimentData.
verdict_power`), the smallest difference its design detects at 80% power, the power to find 2 points and the seeds
2 points would need, for the two-stage test the verdict runs; ``harness report --power`` prints the same rows and
sentence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.reporting.data import ExperimentData
from harness.reporting.render import Section, Table


def power_section(data: ExperimentData) -> Section:
    """The power rows of the verdict's family (module docstring) and one summary sentence."""
    sec = Section("(i) Power: what these seeds and problems can detect")
    rows = data.verdict_power if data.benchmarks else []
    sec.record["power"] = rows
    if not rows:
        sec.notes.append("No ranked comparison (needs evaluated configurations of two gates with per-sample "
                         "records and at least 2 seeds each).")
        return sec
    sec.tables.append(Table(
        ["benchmark", "comparison", "seeds × problems", "seeds", "SE of Δ", "detectable at 80% power",
         "power for Δ = 0.02", "seeds for Δ = 0.02 [range]"],
        [[r["benchmark"], f"{r['gate_a']} − {r['gate_b']}", f"{r['seeds'][0]}, {r['seeds'][1]} × {r['n']}",
          r["design"], f"{r['se']:.4f}", f"{r['mde']:.3f}", f"{r['power_at_effect']:.0%}", power_text(r)]
         for r in rows],
        caption="For the two-stage test the verdict runs (simulated from the measured variance components), "
                "two-sided at α = 0.05 for one comparison, before the family's correction (which raises the bar). "
                "Seeds needed: at the measured seed variance, and in brackets at its 5% and 95% quantiles (a few "
                "seeds say little about the seed variance, so the range is wide)."))
    sec.paragraphs.append(power_sentence(rows))
    return sec


def power_text(row: Mapping[str, Any]) -> str:
    """The seeds a 2-point difference needs with its range, or why more seeds alone cannot get there."""
    if row["seeds_needed"] is None:
        return f"— ({row['power_note']})" if row.get("power_note") else "—"
    high = row["seeds_needed_high"]
    return f"{row['seeds_needed']} [{row['seeds_needed_low']}, {high if high is not None else '> 200'}]"


def power_sentence(rows: list[dict[str, Any]]) -> str:
    """The power statement in one sentence (``harness report --power`` prints it)."""
    mdes = [r["mde"] for r in rows if math.isfinite(r["mde"])]
    needs = [r["seeds_needed"] for r in rows if r["seeds_needed"] is not None]
    text = (f"With these seeds and problems, differences smaller than {min(mdes):.3f}–{max(mdes):.3f} accuracy are "
            "below what the comparisons detect at 80% power") if mdes else "No detectable difference estimated"
    if needs:
        lows = [r["seeds_needed_low"] for r in rows if r["seeds_needed_low"] is not None]
        highs = [r["seeds_needed_high"] for r in rows if r["seeds_needed"] is not None]
        high = "more than 200" if any(h is None for h in highs) else str(max(highs))
        text += (f"; telling 2 points apart would need {min(needs)}–{max(needs)} seeds per configuration at the "
                 f"measured seed variance ({min(lows) if lows else min(needs)} to {high} within its uncertainty)")
    unreachable = [r for r in rows if r["seeds_needed"] is None]
    if unreachable:
        text += f"; for {len(unreachable)} comparison(s) more seeds alone would not do ({unreachable[0]['power_note']})"
    return text + "."
