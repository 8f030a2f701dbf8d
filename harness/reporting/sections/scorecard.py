"""Report section (h): the stability scorecard, one row per trained configuration, each metric of
:mod:`harness.stability` as the mean over seeds with a seed-level 95% interval, and a figure of the same."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness import keys as K
from harness.reporting.data import ExperimentData, Group, float_or_none
from harness.reporting.figures import gate_color, png, pyplot
from harness.reporting.render import Figure, Section, Table
from harness.reporting.sections.text import seed_interval_text
from harness.stability import METRIC_RANGE, SCORECARD, over_seeds, run_scorecard

# The per-step series a scorecard reads: history name -> (metric, per-pass?)
SERIES = {"reward": (K.REWARD, False), "reward_std": (K.REWARD_STD, False), "reward_format": (K.REWARD_FORMAT, False),
          "entropy": (K.ENTROPY, False), "grad_norm": (K.GRAD_NORM, False),
          "response_length": (K.RESPONSE_LENGTH, False), "eur": (K.EUR, True),
          "abs_ratio_dev_p95": (K.ABS_RATIO_DEV_P95, True), "ratio_max": (K.RATIO_MAX, True)}


def _param(row: pd.Series, key: str) -> float | None:
    return float_or_none(row.get(f"params.{key}"))


def run_history(data: ExperimentData, row: pd.Series) -> dict[str, list[float]]:
    """One run's scorecard series on one step axis (the MLflow steps; NaN where a series was not logged)."""
    k = data.last_pass(row)
    by_step = pd.DataFrame({name: data.history(str(row["run_id"]), K.train_key(metric, k if per_pass else None))
                            for name, (metric, per_pass) in SERIES.items()}).sort_index()
    return {K.STEP: [float(s) for s in by_step.index], **{name: by_step[name].to_list() for name in SERIES}}


def group_scorecard(data: ExperimentData, g: Group) -> dict[str, Any]:
    """Per-run scorecards of a configuration and, per metric, the mean over its seeds with a t interval. The
    reward volatility's batch size is the run's ``train.rollout_batch_size``; a step without a logged reward SD
    takes the variance bound of rewards in [0, format weight + accuracy weight]."""
    per_run = []
    for _, row in g.runs.iterrows():
        rollouts = _param(row, K.PARAM_ROLLOUT_BATCH_SIZE)
        weights = (_param(row, K.PARAM_FORMAT_WEIGHT), _param(row, K.PARAM_ACCURACY_WEIGHT))
        reward_max = sum(1.0 if w is None else w for w in weights)
        per_run.append(run_scorecard(run_history(data, row), rollouts=None if rollouts is None else int(rollouts),
                                     reward_range=(0.0, reward_max)))
    summary = {m: over_seeds([r[m] for r in per_run], bounds=METRIC_RANGE.get(m, (-math.inf, math.inf)))
               for m, _ in SCORECARD}
    return {"group": g.label, "gate": g.gate, "run_ids": g.run_ids, "per_run": per_run, "metrics": summary}


def scorecard_section(data: ExperimentData) -> Section:
    """The stability scorecard (definitions: harness.stability and reports/README.md)."""
    sec = Section("(h) Stability scorecard")
    groups = [g for g in data.trained if not g.runs.empty]
    cards = [group_scorecard(data, g) for g in groups]
    cards = [c for c in cards if any(math.isfinite(v["mean"]) for v in c["metrics"].values())]
    sec.record["scorecard"] = cards
    if not cards:
        sec.notes.append("No training histories: no scorecard.")
        return sec
    rows = [[c["group"], *(seed_interval_text(c["metrics"][m]) for m, _ in SCORECARD)] for c in cards]
    collapsed = {i for i, c in enumerate(cards) if c["metrics"]["collapse_events"]["mean"] > 0}
    sec.tables.append(Table(["configuration", *(label for _, label in SCORECARD)], rows, worse=collapsed,
                            caption="Mean over seeds [Student-t 95% interval over seeds]; red: a collapse event in "
                                    "at least one seed. Per-pass metrics are from the last pass over each batch."))
    sec.paragraphs.append(
        "How stable each configuration trained, one number per run (its steps are not independent draws), then the "
        "mean over its seeds: EUR level and trend, entropy change and trend (trends per training step; entropy "
        "collapse is the failure most RL-for-LLM papers watch), reward volatility as a multiple of the batch's "
        "sampling noise (1: the reward moves no more than sampling its rollouts makes it), gradient-norm spikes per "
        "100 steps, "
        "ratio tails (the p95 over steps of each step's largest ratio, not the run's maximum), response-length "
        "drift, and collapse events (the reward's 10-step moving average falling 0.5 below its running best, or "
        "the format rate's falling below 0.5 after reaching 0.9; the running best starts after one full window, "
        "so a lucky first batch does not count).")
    sec.figures.append(Figure("fig_scorecard.png", png(_figure(cards)),
                              "Each scorecard metric per configuration: dots are seeds, the bar the mean with its "
                              "seed-level 95% interval."))
    if all(c["metrics"]["eur_mean"]["n_seeds"] < 2 for c in cards):
        sec.notes.append("One seed per configuration: no seed-level intervals.")
    return sec


def _figure(cards: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    n = len(SCORECARD)
    cols = 5
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3.3 * cols, 1.2 + 0.34 * len(cards) * 2),
                             squeeze=False)
    for ax, (metric, label) in zip(axes.flat, SCORECARD, strict=False):
        for y, c in enumerate(cards):
            v = c["metrics"][metric]
            color = gate_color(c["gate"], y)
            seeds = [r[metric] for r in c["per_run"] if math.isfinite(r[metric])]
            ax.plot(seeds, [y] * len(seeds), "o", color=color, alpha=0.45, ms=4)
            if math.isfinite(v["mean"]):
                finite = math.isfinite(v["ci_low"])
                err = [[v["mean"] - v["ci_low"]], [v["ci_high"] - v["mean"]]] if finite else None
                ax.errorbar([v["mean"]], [y], xerr=err, fmt="|", color=color, ms=12, mew=2, capsize=3)
        ax.set_yticks(range(len(cards)), [c["group"] for c in cards] if ax in axes[:, 0] else [], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9.5)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="x", labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # more long tick labels overlap in a 3.3-inch panel
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
