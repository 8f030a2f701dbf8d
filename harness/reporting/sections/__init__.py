"""The report's sections, one module each, listed in :data:`SECTIONS` in the order the report shows them.

A section is a function ``section(data) -> Section | None`` of the experiment
(:class:`harness.reporting.data.ExperimentData`): it returns its paragraphs, notes, tables and figures, and in
``Section.record`` the numbers it adds to report.json at full precision; it returns None when it does not apply
(the paper comparison outside a paper sweep). What several sections need (accuracies, the verdict's comparisons)
they ask the data object, which computes it once; :mod:`~harness.reporting.sections.text` holds the text helpers
several sections share.
"""

from __future__ import annotations

from collections.abc import Callable

from harness.reporting.data import ExperimentData
from harness.reporting.render import Section
from harness.reporting.sections import (
    accuracy_table,
    adaptive,
    against_the_paper,
    gate_shapes,
    optuna_tuning,
    overview,
    paired,
    power,
    provenance,
    scorecard,
    staleness,
    tau_sensitivity,
    training_curves,
    verdict,
)

__all__ = ["SECTIONS", "SectionBuilder"]

SectionBuilder = Callable[[ExperimentData], Section | None]

# The report's sections in page order. report.json takes their numbers in the same order, after its head (the
# experiment, its store, benchmarks and run counts).
SECTIONS: tuple[SectionBuilder, ...] = (
    verdict.verdict,  # first: the answer, then how it was reached
    overview.overview,
    gate_shapes.gate_shapes,  # (a)
    training_curves.training_curves,  # (b)
    accuracy_table.accuracy_table,  # (c)
    paired.paired,  # (d)
    tau_sensitivity.tau_sensitivity,  # (e)
    optuna_tuning.optuna_section,  # (f)
    against_the_paper.against_the_paper,  # (g), paper sweeps only
    scorecard.scorecard_section,  # (h)
    power.power_section,  # (i)
    adaptive.adaptive_section,  # (j)
    provenance.provenance_section,  # (k)
    staleness.staleness_section,  # (l), sweeps over train.staleness only
)
