"""Report section (i): for each comparison of the verdict (:attr:`harness.reporting.data.ExperimentData.
verdict_comparisons`), the smallest difference these seeds and problems can detect at 80% power and the seeds a
2-point difference would need; ``harness report --power`` prints the same rows and sentence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.reporting.data import ExperimentData
from harness.reporting.render import Section, Table


def power_section(data: ExperimentData) -> Section:
    """For each comparison of the verdict: the smallest difference detectable at 80% power with the measured seed
    and problem variances, and how many seeds a 2-point difference would need."""
    sec = Section("(i) Power: what these seeds and problems can detect")
    rows = data.verdict_comparisons
    sec.record["power"] = [{k: r[k] for k in ("benchmark", "a", "b", "n", "seeds", "se", "mde", "effect",
                                          "seeds_needed", "power_reachable", "power_note")} for r in rows]
    if not rows:
        sec.notes.append("No paired comparison (needs evaluated configurations of two gates with per-sample records).")
        return sec
    sec.tables.append(Table(
        ["benchmark", "comparison", "seeds × problems", "SE of Δ", "detectable at 80% power", "seeds for Δ = 0.02"],
        [[r["benchmark"], f"{r['a']} − {r['b']}", f"{len(r['seeds'])} × {r['n']}", f"{r['se']:.4f}",
          f"{r['mde']:.3f}", power_text(r)] for r in rows],
        caption="Two-sided test at α = 0.05 (before the multiple-comparison correction, which raises the bar). "
                "Seeds needed: the smallest seed count at these problems whose predicted standard error detects 2 "
                "accuracy points with 80% power, from the measured variance components."))
    sec.paragraphs.append(power_sentence(rows))
    return sec


def power_text(row: Mapping[str, Any]) -> str:
    """The seeds a 2-point difference needs, or why more seeds alone cannot get there."""
    if row["seeds_needed"] is not None:
        return str(row["seeds_needed"])
    return f"— ({row['power_note']})" if row.get("power_note") else "—"


def power_sentence(rows: list[dict[str, Any]]) -> str:
    """The power statement in one sentence (``harness report --power`` prints it)."""
    mdes = [r["mde"] for r in rows if math.isfinite(r["mde"])]
    needs = [r["seeds_needed"] for r in rows if r["seeds_needed"] is not None]
    text = (f"With these seeds and problems, differences smaller than {min(mdes):.3f}–{max(mdes):.3f} accuracy are "
            "below what the comparisons can detect at 80% power") if mdes else "No detectable difference estimated"
    if needs:
        text += f"; telling 2 points apart would need {min(needs)}–{max(needs)} seeds per configuration"
    unreachable = [r for r in rows if r["power_reachable"] is False]
    if unreachable:
        text += f"; for {len(unreachable)} comparison(s) more seeds alone would not do ({unreachable[0]['power_note']})"
    return text + "."
