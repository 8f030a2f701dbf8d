"""Report section (l): stability under staleness. Per configuration (gate and τ) across the policy lags it ran at
(``train.staleness``, ``hydra.sweeper.staleness``): held-out accuracy, mean EUR, the first pass's ratio tails, entropy
change and collapse events, each with a seed-level interval; a figure with one line per configuration over
staleness; and each configuration's stability frontier, the largest lag up to which no seed collapsed (one sentence
per distinct frontier, naming its configurations)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from harness import keys as K
from harness.reporting.data import ExperimentData, Group
from harness.reporting.figures import gate_color, png, pyplot
from harness.reporting.render import Figure, Section, Table
from harness.reporting.sections.scorecard import group_scorecard
from harness.reporting.sections.text import plural, seed_interval_text
from harness.stability import over_seeds

STALENESS_PARAM = "train.staleness"
ALPHA = 0.05  # one-sided level of the collapse-probability bound


def base_key(g: Group) -> str:
    """What a group is apart from its staleness: its parameters without ``train.staleness``."""
    try:
        params = json.loads(g.key)
    except ValueError:
        return g.label
    return json.dumps({k: v for k, v in params.items() if k != STALENESS_PARAM}, sort_keys=True)


def base_label(g: Group) -> str:
    """The group's label without the staleness the labels add to tell groups apart."""
    label = re.sub(r"train\.staleness=\d+", "", g.label)
    label = label.replace("(, ", "(").replace(", )", ")").replace(", , ", ", ")
    return label.replace(" ()", "").strip()


def collapse_bound(n_seeds: int) -> float:
    """The one-sided 95% upper bound on a per-run collapse probability when none of ``n_seeds`` runs collapsed:
    1 − α^(1/n) (the exact binomial bound; about 3/n, the rule of three)."""
    return 1.0 - ALPHA ** (1.0 / n_seeds) if n_seeds else 1.0


def level_summary(data: ExperimentData, g: Group) -> dict[str, Any]:
    """One configuration at one staleness: every quantity per seed and over seeds."""
    card = group_scorecard(data, g)
    first_dev, first_p95, lag = [], [], []
    for _, row in g.runs.iterrows():
        run = str(row["run_id"])
        first_dev.append(float(data.history(run, K.train_key(K.ABS_RATIO_DEV, 1)).mean()))
        first_p95.append(float(data.history(run, K.train_key(K.ABS_RATIO_DEV_P95, 1)).mean()))
        lags = data.history(run, K.train_key(K.POLICY_LAG))
        lag.append(float(lags.mean()) if not lags.empty else 0.0)
    collapses = [r["collapse_events"] for r in card["per_run"]]
    positive = (0.0, math.inf)
    return {
        "group": g.label, "configuration": base_label(g), "gate": g.gate, "staleness": g.staleness,
        "run_ids": g.run_ids, "n_seeds": len(g.runs),
        "accuracy": {b: data.group_accuracy(g, b) for b in data.benchmarks},
        "eur_mean": card["metrics"]["eur_mean"], "entropy_change": card["metrics"]["entropy_change"],
        "first_pass_abs_ratio_dev": over_seeds(first_dev, bounds=positive),
        "first_pass_abs_ratio_dev_p95": over_seeds(first_p95, bounds=positive),
        "policy_lag_mean": float(np.mean(lag)) if lag else math.nan,
        "collapse_events": card["metrics"]["collapse_events"],
        "seeds_collapsed": int(sum(1 for c in collapses if c > 0)),
    }


def frontier(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest staleness up to which (every level tried at or below it) no seed collapsed, the first level
    with a collapse, and the bound the seeds put on the collapse probability at the frontier."""
    stable = None
    first_collapse = None
    for lv in sorted(levels, key=lambda x: x["staleness"]):
        if lv["seeds_collapsed"]:
            first_collapse = lv
            break
        stable = lv
    return {"configuration": levels[0]["configuration"], "gate": levels[0]["gate"],
            "stable_up_to": None if stable is None else stable["staleness"],
            "largest_tried": max(x["staleness"] for x in levels),
            "first_collapse": None if first_collapse is None else
            {"staleness": first_collapse["staleness"], "seeds_collapsed": first_collapse["seeds_collapsed"],
             "n_seeds": first_collapse["n_seeds"]},
            "collapse_probability_bound": None if stable is None else collapse_bound(stable["n_seeds"]),
            "n_seeds_at_frontier": None if stable is None else stable["n_seeds"]}


def frontier_text(f: dict[str, Any]) -> str:
    """What a configuration's frontier says: how far it stayed collapse-free, and what its seeds leave open."""
    fc = f["first_collapse"]
    if f["stable_up_to"] is None:
        return (f"collapsed already at staleness {fc['staleness']} ({fc['seeds_collapsed']} of "
                f"{plural(fc['n_seeds'], 'seed')}).")
    bound = (f"{f['n_seeds_at_frontier']} collapse-free {'seed' if f['n_seeds_at_frontier'] == 1 else 'seeds'} "
             f"still allow a per-run collapse probability up to {f['collapse_probability_bound']:.0%} there (95% "
             "bound)")
    if fc is None:
        return (f"no collapse in any seed up to staleness {f['stable_up_to']}, the largest tried; {bound}, and where "
                "it would first collapse is beyond the sweep.")
    return (f"no collapse in any seed up to staleness {f['stable_up_to']}; at staleness {fc['staleness']} "
            f"{fc['seeds_collapsed']} of {plural(fc['n_seeds'], 'seed')} collapsed; {bound}.")


def frontier_sentences(frontiers: list[dict[str, Any]]) -> list[str]:
    """One sentence per distinct frontier, naming every configuration it holds for (five configurations with the
    same frontier get one sentence, not five identical ones)."""
    by_text: dict[str, list[str]] = {}
    for f in frontiers:
        by_text.setdefault(frontier_text(f), []).append(f["configuration"])
    return [f"{', '.join(names[:-1]) + ' and ' + names[-1] if len(names) > 1 else names[0]}: {text}"
            for text, names in by_text.items()]


def staleness_section(data: ExperimentData) -> Section:
    """Stability under staleness (module docstring)."""
    sec = Section("(l) Stability under staleness")
    groups = [g for g in data.trained if not g.runs.empty]
    lags = sorted({g.staleness for g in groups})
    sec.record["staleness"] = {"levels": [], "frontiers": []}
    if len(lags) < 2:
        sec.notes.append("Every configuration ran at one policy lag (train.staleness): see sweeps/offpolicy.yaml for "
                         "a sweep over stale rollouts.")
        return sec
    by_base: dict[str, list[Group]] = {}
    for g in groups:
        by_base.setdefault(base_key(g), []).append(g)
    lines = [sorted((level_summary(data, g) for g in gs), key=lambda x: x["staleness"]) for gs in by_base.values()]
    frontiers = [frontier(levels) for levels in lines]
    sec.record["staleness"] = {"levels": [lv for levels in lines for lv in levels], "frontiers": frontiers}

    benches = list(data.benchmarks)
    rows = []
    for levels in lines:
        for lv in levels:
            acc = [lv["accuracy"].get(b) for b in benches]
            rows.append([lv["configuration"], str(lv["staleness"]),
                         *("—" if a is None else f"{a['acc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
                           for a in acc),
                         seed_interval_text(lv["eur_mean"], ".3f"),
                         seed_interval_text(lv["first_pass_abs_ratio_dev"], ".3f"),
                         seed_interval_text(lv["first_pass_abs_ratio_dev_p95"], ".3f"),
                         seed_interval_text(lv["entropy_change"], ".3f"),
                         f"{lv['seeds_collapsed']} of {lv['n_seeds']}"])
    collapsed = {i for i, r in enumerate(row for levels in lines for row in levels) if r["seeds_collapsed"]}
    sec.tables.append(Table(
        ["configuration", "staleness", *(f"{b} accuracy" for b in benches), "mean EUR", "first pass: mean |r − 1|",
         "first pass: p95 |r − 1|", "entropy: last − first 10%", "seeds with a collapse"], rows, worse=collapsed,
        caption="Mean over seeds [Student-t 95% interval over seeds]; accuracy: strict, on the whole held-out split, "
                "with the two-stage interval (seeds, then problems). First pass: the ratio each token's first update "
                "saw, π_θ over the policy that drew it (the behaviour policy) without a correction, averaged over "
                "steps. Red: a collapse event in at least one seed."))
    sec.paragraphs.append(
        "Rollouts drawn k steps before the step that trains on them (an asynchronous rollout worker k batches "
        "ahead) reach the gate with ratios far from 1 from the first update on. Each configuration's stability "
        "frontier is the largest staleness up to which none of its seeds had a collapse event:")
    sec.paragraphs.extend(frontier_sentences(frontiers))
    sec.paragraphs.append(
        "A frontier is a count of collapse-free seeds, not a probability: two configurations whose frontiers differ "
        "by one level with a handful of seeds each are not shown to differ. The accuracy columns compare nothing; "
        "the verdict above tests the gates against each other at each staleness level separately.")
    sec.figures.append(Figure("fig_staleness.png", png(_figure(lines, benches)),
                              "Each configuration over staleness: mean over seeds with its seed-level 95% interval "
                              "(accuracy: the two-stage interval)."))
    return sec


def _figure(lines: list[list[dict[str, Any]]], benches: list[str]) -> Any:
    plt = pyplot()
    panels: list[tuple[str, Any]] = [(f"{b} accuracy", b) for b in benches[:2]] + [
        ("mean EUR", "eur_mean"), ("first pass: p95 |r − 1|", "first_pass_abs_ratio_dev_p95"),
        ("entropy: last − first 10%", "entropy_change"), ("collapse events per run", "collapse_events")]
    rows = math.ceil(len(lines) / 4)  # legend rows below the panels
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0 + 0.25 * rows), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels, strict=True):
        for i, levels in enumerate(lines):
            x, y, lo, hi = [], [], [], []
            for lv in levels:
                v = lv["accuracy"].get(key) if key in benches else lv[key]
                if v is None:
                    continue
                mean, low, high = (v["acc"], v["ci_low"], v["ci_high"]) if key in benches else \
                    (v["mean"], v["ci_low"], v["ci_high"])
                if not math.isfinite(mean):
                    continue
                x.append(lv["staleness"])
                y.append(mean)
                lo.append(mean - low if math.isfinite(low) else 0.0)
                hi.append(high - mean if math.isfinite(high) else 0.0)
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=3, color=gate_color(levels[0]["gate"], i),
                        label=levels[0]["configuration"])
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("staleness (steps)", fontsize=8.5)
        ax.set_xticks(sorted({lv["staleness"] for levels in lines for lv in levels}))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    # below the panels: inside one, a legend of ten configurations hides the lines it names
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.25 * rows / (3.0 + 0.25 * rows) + 0.04, 1, 1))
    return fig
