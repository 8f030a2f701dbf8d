"""Report section (g), paper sweeps only: our accuracy beside Table 1 of arXiv 2602.19345 v2, row by row (the
paper's gates at (10, 12), clip at ε = 0.2, the base model). Any other experiment has no such section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness import keys as K
from harness.reporting.data import ExperimentData, Group
from harness.reporting.render import Section, Table

PAPER_TABLE = Path(__file__).resolve().parent.parent / "reference" / "paper_table1.json"
PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
PAPER_TAUS = (10.0, 12.0)


def paper_reference() -> dict[str, Any]:
    """Table 1 of arXiv 2602.19345 v2 as kept in the repository (with its source)."""
    return json.loads(PAPER_TABLE.read_text(encoding="utf-8"))


def is_paper_experiment(data: ExperimentData) -> bool:
    """The paper's sweep: a parent run of sweep ``paper`` / ``paper_temperature``, or cells of the paper's model."""
    sweeps = {str(v) for v in data.runs.get(f"tags.{K.TAG_SWEEP}", pd.Series(dtype=str)).dropna()}
    models = {str(v) for v in data.cells.get(f"tags.{K.TAG_MODEL}", pd.Series(dtype=str)).dropna()}
    return bool(sweeps & {"paper", "paper_temperature"}) or PAPER_MODEL in models


def against_the_paper(data: ExperimentData) -> Section | None:
    """Our accuracy beside Table 1 of the paper, row by row (the paper's gates at (10, 12), clip at ε = 0.2); None
    when the experiment is not a paper sweep (:func:`is_paper_experiment`)."""
    if not is_paper_experiment(data):
        return None
    sec = Section("(g) Against the paper (arXiv 2602.19345 v2, Table 1)")
    ref = paper_reference()
    sec.record["against_the_paper"] = []
    cols = [c for c in ref["columns"] if c in data.benchmarks]
    if not cols:
        sec.notes.append("None of the paper's benchmarks (GSM8K, MATH500, pooled AIME24 + AIME25) was evaluated here.")
        return sec
    models = sorted({str(v) for v in data.cells.get(f"tags.{K.TAG_MODEL}", pd.Series(dtype=str)).dropna()})
    if PAPER_MODEL not in models:
        sec.notes.append(f"This experiment trained {', '.join(models) or 'an unknown model'}, not the paper's "
                         f"{PAPER_MODEL}: the rows below are not comparable numbers, only the same layout.")
    rows, out = [], []
    for r in ref["rows"]:
        ours = _paper_partner(data, r["gate"])
        row = [r["label"], "—" if ours is None else ours.label]
        entry: dict[str, Any] = {"paper_row": r["label"], "ours": None if ours is None else ours.label}
        for c in cols:
            a = None if ours is None else data.acc.get((ours.key, c))
            row += [f"{100 * a['acc']:.1f} [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}]" if a else "—",
                    f"{r[c]:.1f}"]
            entry[c] = {"paper": r[c], **({} if a is None else {"ours": a["acc"], "ci_low": a["ci_low"],
                                                              "ci_high": a["ci_high"], "n_seeds": a["n_seeds"]})}
            if a is not None:
                entry[c]["paper_inside_ci"] = a["ci_low"] <= r[c] / 100 <= a["ci_high"]
        rows.append(row)
        out.append(entry)
    header = ["paper row", "our configuration"] + [h for c in cols for h in (f"{c} ours (95% CI)", f"{c} paper")]
    sec.tables.append(Table(header, rows, caption="Accuracy in %. Ours: mean over seeds with the 95% interval of "
                                                  "table (c); paper: one seed, no interval. " + ref["notes"]))
    sec.paragraphs.append(f"Source of the paper's numbers: {ref['source']}. Our partner of a paper row is the "
                          "configuration of the same gate at (τ_pos, τ_neg) = (10, 12) (clip at ε = 0.2), else that "
                          "gate's best configuration; the base model is the sweep's starting checkpoint.")
    sec.record["against_the_paper"] = out
    return sec


def _paper_partner(data: ExperimentData, gate: str) -> Group | None:
    if gate == "base":
        return data.baseline
    same = [g for g in data.trained if g.gate == gate]
    at_paper = [g for g in same if (g.tau_pos, g.tau_neg) == PAPER_TAUS or (gate == "clip" and g.eps == (0.2, 0.2))]
    pool = at_paper or same
    return max(pool, key=data.score) if pool else None
