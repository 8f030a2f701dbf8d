"""Report section: the overview, how many runs, cells, configurations, seeds and benchmarks the experiment holds,
and what failed, was pruned or warned. Its counts are the head of report.json
(:attr:`harness.reporting.data.ExperimentData.run_counts`, :attr:`~harness.reporting.data.ExperimentData.run_warnings`).
"""

from __future__ import annotations

from harness import keys as K
from harness.reporting.data import ExperimentData
from harness.reporting.render import Section, Table
from harness.reporting.sections.text import plural
from harness.tracking import mask_url


def overview(data: ExperimentData) -> Section:
    """How many runs, cells, configurations, seeds and benchmarks the experiment holds, and what failed."""
    d = data
    runs = d.runs
    sec = Section("Overview")
    counts = d.run_counts
    status = counts["status"]
    seeds = sorted({s for g in d.groups for s in g.seeds})
    sec.paragraphs.append(
        f"Experiment **{d.name}** at {mask_url(d.tracking_uri)}: {plural(counts['cell_runs'], 'cell run')} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}) under "
        f"{plural(counts['parent_runs'], 'sweep/tune run')}; {plural(counts['cells'], 'finished cell')} "
        f"(latest FINISHED run per config hash) in {len(d.groups)} configurations; seeds: "
        f"{', '.join(seeds) or '-'}; benchmarks: {', '.join(d.benchmarks) or 'none (no evaluation logged)'}.")
    if not d.groups:
        sec.notes.append("No FINISHED cell run in this experiment: nothing to compare yet.")
    failed = runs[(runs["status"] == "FAILED") & runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    if not failed.empty:
        rows = [[str(r.get(f"tags.{K.TAG_RUN_NAME}", "")), str(r["run_id"])[:8],
                 str(r.get(f"tags.{K.TAG_FAILURE_REASON}", ""))[:160]] for _, r in failed.iterrows()]
        sec.tables.append(Table(["run", "id", "failure reason"], rows, caption="FAILED cell runs"))
    if d.run_warnings:
        rows = [[name, run_id[:8], warning] for name, run_id, warning in d.run_warnings]
        sec.tables.append(Table(["run", "id", "warning"], rows, caption="Warnings: what these runs' numbers mean "
                                "(a flat curve from a run that had nothing to learn from is not stability)"))
    pruned = runs[(runs["status"] == "KILLED") & runs[f"tags.{K.TAG_CONFIG_HASH}"].notna()]
    if not pruned.empty:
        sec.paragraphs.append(f"{plural(len(pruned), 'run')} stopped early (KILLED: pruned Optuna trials) and left "
                              "out of the tables; the pruner's view of them is in the Optuna section.")
    return sec
