"""The comparison report of an MLflow experiment: ``harness report EXPERIMENT`` and :func:`write_report`.

:mod:`~harness.reporting.data` reads the experiment (explicit client) and computes once what several sections
share; :mod:`~harness.reporting.comparisons` holds the statistics of a paired comparison;
:mod:`~harness.reporting.sections` lists the sections in page order, one module each
(:mod:`~harness.reporting.sections.verdict`, ``overview``, ``gate_shapes``, ``training_curves``, ``accuracy_table``,
``paired``, ``tau_sensitivity``, ``optuna_tuning``, ``against_the_paper``, ``scorecard``, ``power``, ``adaptive``,
``provenance``); :mod:`~harness.reporting.figures` draws, :mod:`~harness.reporting.render` writes HTML and Markdown
and :mod:`~harness.reporting.latex` the accuracy table as LaTeX. ``reports/README.md`` says how each number is
computed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import keys as K
from harness.config import slug
from harness.reporting.data import ExperimentData, load_experiment
from harness.reporting.figures import plot_gate_shapes
from harness.reporting.latex import latex_table
from harness.reporting.render import Section, render_html, render_markdown
from harness.reporting.sections import SECTIONS
from harness.reporting.sections.power import power_section, power_text
from harness.tracking import mask_url

__all__ = ["SECTIONS", "build_sections", "main", "plot_gate_shapes", "report_head", "write_report"]

log = logging.getLogger(__name__)


def report_tracking_uri(uri: str | None) -> str:
    """The store to report on: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def report_head(data: ExperimentData) -> dict[str, Any]:
    """The opening entries of report.json: the experiment, its store and benchmarks, the warnings its cells finished
    with (when any) and its run counts (what the overview shows)."""
    head: dict[str, Any] = {"experiment": data.name, "tracking_uri": data.tracking_uri, "benchmarks": data.benchmarks}
    if data.run_warnings:
        head["warnings"] = {name: warning for name, _, warning in data.run_warnings}
    head["runs"] = data.run_counts
    return head


def build_sections(data: ExperimentData, record: dict[str, Any] | None = None) -> list[Section]:
    """Every section of :data:`~harness.reporting.sections.SECTIONS` that applies, in page order (the verdict
    first); a section that raises becomes a note (one broken section must not cost the others). ``record``, when
    given, receives each section's numbers in the same order (report.json after its :func:`report_head`)."""
    out, empty = [], []
    for build in SECTIONS:
        try:
            sec = build(data)
        except Exception as exc:
            log.exception("report section %s failed", build.__name__)
            sec = Section(build.__name__.replace("_", " "), notes=[f"This section failed: {type(exc).__name__}: {exc}"])
        if sec is None:  # does not apply to this experiment
            continue
        if is_empty(sec):
            empty.append(sec)
        else:
            out.append(sec)
        if record is not None:
            record.update(sec.record)
    if empty:
        out.append(Section("Not shown: nothing to report in this experiment", paragraphs=[
            " ".join(f"{s.title.split(' ', 1)[-1] if s.title.startswith('(') else s.title}: "
                     f"{_lower_first(' '.join(s.notes)) or 'empty.'}" for s in empty)]))
    return out


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def is_empty(sec: Section) -> bool:
    """A section with nothing but notes saying what is missing (no Optuna study, no moving τ): it collapses into the
    one line at the end of the page instead of a boxed section. A failed section stays where it is."""
    failed = any(n.startswith("This section failed") for n in sec.notes)
    return sec.title != "Verdict" and not failed and not (sec.paragraphs or sec.tables or sec.figures)


def write_report(experiment: str, *, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 optuna_storage: str | None = None, log_to_mlflow: bool = True) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` with its PNG figures, ``report.json`` (every number
    at full precision) and ``table.tex`` (the accuracy table, booktabs, when there is evaluation) for an MLflow
    experiment to ``out_dir`` (default ``reports/<experiment>/`` under the working
    directory), log them to the experiment's newest parent run (or a new run named ``report``), and return the
    HTML path. Missing pieces (no evaluation, one seed, no Optuna study) become notes, never errors."""
    uri = report_tracking_uri(tracking_uri)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "reports" / slug(experiment)
    with tempfile.TemporaryDirectory(prefix="harness-report-") as work:
        data = load_experiment(experiment, uri, Path(work), optuna_storage=optuna_storage)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("fig_*.png"):  # figures of a previous report that this one may not redraw
            old.unlink()
        record = report_head(data)
        sections = build_sections(data, record)
    title = f"Gate comparison report: {experiment}"
    meta = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow {mask_url(data.tracking_uri)}, experiment "
            f"id {data.experiment_id}; every number is read from MLflow (metrics, histories, per-sample artifacts) "
            "or the Optuna study.")
    for sec in sections:
        for f in sec.figures:
            (out / f.name).write_bytes(f.png)
    html_path = out / "report.html"
    html_path.write_text(render_html(title, sections, meta), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(title, sections, meta), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
    if data.acc:
        (out / "table.tex").write_text(latex_table(data), encoding="utf-8")
    if log_to_mlflow:
        _log_report(data, out)
    return html_path


def power_report(experiment: str, *, tracking_uri: str | None = None) -> str:
    """``harness report --power``: per comparison of the verdict, the smallest difference detectable at 80% power
    and the seeds a 2-point difference needs, then the one-sentence summary."""
    with tempfile.TemporaryDirectory(prefix="harness-report-") as work:
        data = load_experiment(experiment, report_tracking_uri(tracking_uri), Path(work))
        sec = power_section(data)
    lines = [f"power of the verdict's comparisons in {experiment!r} (two-sided, alpha 0.05, 80% power)"]
    for r in sec.record["power"]:
        lines.append(f"  {r['benchmark']}: {r['gate_a']} - {r['gate_b']} ({r['seeds'][0]} and {r['seeds'][1]} seeds x "
                     f"{r['n']} problems, seeds {r['design']}): SE {r['se']:.4f}, detectable {r['mde']:.3f}, power "
                     f"for {r['effect']:g} {r['power_at_effect']:.0%}; seeds for {r['effect']:g}: {power_text(r)}")
    lines += sec.paragraphs or sec.notes
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _log_report(data: ExperimentData, out: Path) -> str:
    """Log the report files to the newest parent (sweep/tune) run, or to a new run named ``report``."""
    client = data.client
    parents = data.runs[data.runs[f"tags.{K.TAG_SWEEP}"].notna()]
    if not parents.empty:
        run_id = str(parents.sort_values("start_time", ascending=False).iloc[0]["run_id"])
    else:
        run_id = client.create_run(data.experiment_id, run_name="report", tags={K.TAG_REPORT: "true"}).info.run_id
        client.set_terminated(run_id, "FINISHED")
    for p in (p for p in out.iterdir() if p.suffix in (".html", ".md", ".json", ".png", ".tex")):
        client.log_artifact(run_id, str(p), artifact_path=K.REPORT_ARTIFACT_DIR)
    return run_id


def main(argv: list[str] | None = None) -> int:
    """``harness report EXPERIMENT [--tracking-uri URI] [--out DIR] [--optuna-storage URL] [--no-log]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="harness report",
                                     description="Write the gate-comparison report of an MLflow experiment.")
    parser.add_argument("experiment", help="MLflow experiment name (tracking.experiment of the sweep or tuning)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the cwd)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<experiment>/)")
    parser.add_argument("--optuna-storage", default=None,
                        help="Optuna storage of the experiment's studies (default: the URL tagged on the tuning run)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    parser.add_argument("--power", action="store_true",
                        help="print only the power statement of the verdict's comparisons (writes no files)")
    args = parser.parse_args(argv)
    if args.power:
        try:
            print(power_report(args.experiment, tracking_uri=args.tracking_uri))
        except ValueError as exc:
            print(f"harness report: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        path = write_report(args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out,
                            optuna_storage=args.optuna_storage, log_to_mlflow=not args.no_log)
    except ValueError as exc:
        print(f"harness report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
