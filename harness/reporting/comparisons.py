"""What a comparison of the verdict can detect, and Holm's correction over a table's own family.

The comparisons themselves are :mod:`harness.verdict`'s (problems paired, seeds paired only where earned, selection
on one half of the problems and testing on the other); :func:`power_of` says, for one of them, how large a true
difference its design finds with 80% power and how many seeds a 2-point difference needs — for the two-stage test that
is actually run (:func:`harness.stats.two_stage_power`, by simulation from the fitted variance components), with the
seeds-needed range that the uncertainty of the seed variance allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.stats import (
    expected_components,
    fitted_components,
    holm,
    minimum_detectable_effect,
    seeds_needed_range,
    two_stage_power,
)
from harness.verdict import ALPHA, EFFECT

POWER = 0.8


def power_of(row: Mapping[str, Any], *, effect: float = EFFECT, alpha: float = ALPHA) -> dict[str, Any]:
    """For one ranked comparison of :func:`harness.verdict.compare_arms` (its ``design`` and ``components``): the
    minimum detectable effect at :data:`POWER` (``mde``), the power to find ``effect`` (``power_at_effect``), and the
    seeds per configuration that ``effect`` needs (``seeds_needed``: point, and ``seeds_needed_low`` /
    ``seeds_needed_high`` at the 5% / 95% quantiles of the seed variance; None where the problem term alone is too
    large, ``power_note`` then says so). The test is two-sided at ``alpha``, one comparison before the family's
    correction."""
    kind, comp = row["design"], row["components"]
    fitted = fitted_components(kind, comp)
    need = seeds_needed_range(kind, comp, effect, alpha=alpha, power=POWER)
    note = "" if need["point"] is not None else f"the problem term alone (n = {row['n']}) is too large for {effect:g}"
    return {"effect": effect, "alpha": alpha, "mde": minimum_detectable_effect(kind, fitted, alpha=alpha, power=POWER),
            "power_at_effect": two_stage_power(kind, expected_components(kind, **fitted), effect, alpha=alpha),
            "seeds_needed": need["point"], "seeds_needed_low": need["low"], "seeds_needed_high": need["high"],
            "power_note": note}


def adjust(rows: Sequence[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Add Holm-adjusted p-values over ``rows`` (one family) and whether each survives at ``alpha``."""
    for row, p in zip(rows, holm([r["p_value"] for r in rows]) if rows else [], strict=True):
        row["p_holm"] = p
        row["survives"] = p < alpha
        row["family_size"] = len(rows)
