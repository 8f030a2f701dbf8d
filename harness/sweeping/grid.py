"""The grid of a sweep: the Hydra override list of every job the sweepers launch.

:func:`cell_overrides` expands gate × τ × seed into cells, :func:`adaptive_overrides` adds the cells whose τ is
controlled toward an EUR target, and :func:`baseline_jobs` adds one evaluation of the starting checkpoint per model
and evaluation. The Optuna tuner builds its trials from the same pieces (:func:`gate_overrides`,
:func:`tied_tau_neg`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from harness.cell import BASELINE_KEYS
from harness.config import ConfigError
from harness.gates import has_temperature
from harness.schema import gate_option_exists, gate_schema

TAU_MODES = ("tied", "separate")
# τ_neg / τ_pos of a tied pair when a sweep does not say: the paper's (τ_pos, τ_neg) = (10, 12).
TIED_TAU_NEG_SCALE = 1.2


def tied_tau_neg(tau_pos: float, scale: float) -> float:
    """τ_neg of a tied pair: τ_pos · scale (SAPO's asymmetry kept at every τ), rounded so that 4 · 1.05 is 4.2."""
    return round(tau_pos * scale, 10)


def override_value(value: str) -> str:
    """A string as a Hydra override value: bare when it only has safe characters, else single-quoted."""
    if re.fullmatch(r"[\w./:@+-]+", value) and "//" not in value:
        return value
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot pass {value!r} as a Hydra override value (quote or backslash in it)")
    return f"'{value}'"


def for_the_cells_gate(cell: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``overrides`` for one cell: a ``gate.KEY=...`` override reaches only the cells whose gate node has KEY (each
    gate has only the keys it uses), so ``harness sweep gate.width=hwhm`` sets the width of every smooth gate and
    leaves clip alone."""
    option = next((o.split("=", 1)[1] for o in cell if o.startswith("gate=")), None)
    if option is None or not gate_option_exists(option):  # an unknown option: composing the cell names the options
        return list(overrides)
    keys = {f.name for f in dataclasses.fields(gate_schema(option))}
    return [o for o in overrides if not o.startswith("gate.") or o.split("=", 1)[0].split(".")[1] in keys]


def check_gate_overrides(cells: Sequence[Sequence[str]], overrides: Sequence[str]) -> None:
    """``ConfigError`` for a ``gate.KEY=...`` override that no cell's gate has (it would reach no cell)."""
    for o in overrides:
        if o.startswith("gate.") and not any(o in for_the_cells_gate(c, [o]) for c in cells):
            options = sorted({x.split("=", 1)[1] for c in cells for x in c if x.startswith("gate=")})
            raise ConfigError(f"{o.split('=', 1)[0]} is a key of none of the sweep's gates ({', '.join(options)}); "
                              "clip has eps_low/eps_high, smooth gates tau_pos, tau_neg, width, tau_schedule, ...; "
                              "a method's keys are in its conf/gate/<name>.yaml")


def gate_overrides(gate: str) -> list[str]:
    """Overrides that select a gate (a custom ``pkg.module:F`` spec goes through ``gate=custom``)."""
    if ":" in gate:
        return ["gate=custom", f"gate.name={override_value(gate)}"]
    return [f"gate={gate}"]


def cell_overrides(gates: Sequence[str], taus: Sequence[float], seeds: Sequence[int], *, tau_mode: str = "tied",
                   tau_neg_scale: float = TIED_TAU_NEG_SCALE, tau_neg: Sequence[float] = (),
                   tau_pairs: Sequence[Sequence[float]] = ()) -> list[list[str]]:
    """The override list of every cell of a gate × τ × seed grid. Clip and the ratio-control methods have no τ,
    so each gets one cell per seed; ``tau_mode=tied`` pairs τ_pos with :func:`tied_tau_neg`, ``separate`` crosses
    τ_pos with ``tau_neg``; explicit ``tau_pairs`` ([[τ_pos, τ_neg], ...]) replace the τ grid."""
    pairs_given = [tuple(float(v) for v in p) for p in tau_pairs]
    if any(len(p) != 2 or min(p) <= 0 for p in pairs_given):
        raise ValueError(f"hydra.sweeper.tau_pairs must be [[tau_pos, tau_neg], ...] of numbers > 0, got "
                         f"{[list(p) for p in tau_pairs]}")
    if tau_mode not in TAU_MODES:
        raise ValueError(f"hydra.sweeper.tau_mode must be one of {', '.join(TAU_MODES)}, got {tau_mode!r}")
    if tau_mode == "separate" and not tau_neg and not pairs_given:
        raise ValueError("hydra.sweeper.tau_mode=separate needs a hydra.sweeper.tau_neg grid")
    if not gates or not seeds:
        raise ValueError("hydra.sweeper.gates and hydra.sweeper.seeds must not be empty")
    cells = []
    for gate, seed in itertools.product(gates, seeds):
        base = [*gate_overrides(gate), f"seed={seed}"]
        if not has_temperature(gate):
            cells.append(base)
            continue
        if pairs_given:
            pairs = pairs_given
        elif not taus:
            raise ValueError("hydra.sweeper.taus (or tau_pairs) must not be empty when a smooth gate is swept")
        elif tau_mode == "tied":
            pairs = [(t, tied_tau_neg(t, tau_neg_scale)) for t in taus]
        else:
            pairs = list(itertools.product(taus, tau_neg))
        cells += [[*base, f"gate.tau_pos={tp}", f"gate.tau_neg={tn}"] for tp, tn in pairs]
    return cells


def adaptive_overrides(gates: Sequence[str], taus: Sequence[float], seeds: Sequence[int],
                       eur_targets: Sequence[float], *, tau_mode: str = "tied",
                       tau_neg_scale: float = TIED_TAU_NEG_SCALE, tau_neg: Sequence[float] = (),
                       tau_pairs: Sequence[Sequence[float]] = ()) -> list[list[str]]:
    """The ``eur_targets`` cells: every smooth gate × target × seed with ``gate.tau_schedule=eur_target``, τ
    starting at the first pair of the grid :func:`cell_overrides` makes of the same arguments."""
    if not eur_targets:
        return []
    smooth = [g for g in gates if has_temperature(g)]
    if not smooth:
        raise ValueError("hydra.sweeper.eur_targets needs a smooth gate in hydra.sweeper.gates (clip and the "
                         "ratio-control methods have no τ)")
    bad = [t for t in eur_targets if not 0 < float(t) < 1]
    if bad:
        raise ValueError(f"hydra.sweeper.eur_targets must lie in (0, 1), got {bad}")
    start = cell_overrides(smooth[:1], taus[:1], seeds[:1], tau_mode=tau_mode, tau_neg_scale=tau_neg_scale,
                           tau_neg=tau_neg[:1], tau_pairs=tau_pairs[:1])[0][-2:]  # the first gate.tau_pos/neg
    return [[*gate_overrides(g), f"seed={s}", *start, "gate.tau_schedule=eur_target", f"gate.eur_target={float(t)}"]
            for g in smooth for t in eur_targets for s in seeds]


def baseline_jobs(jobs: Sequence[list[str]], composed: Sequence[DictConfig]) -> list[list[str]]:
    """One ``role=baseline`` job per distinct (model, evaluation) among the cells that evaluate: the starting
    checkpoint, evaluated once per sweep whatever the gates, temperatures and seeds."""
    out, seen = [], set()
    for job, cfg in zip(jobs, composed, strict=True):
        if not cfg.eval.get("enabled", True):
            continue
        key = json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True) for k in BASELINE_KEYS}, sort_keys=True,
                         default=str)
        if key not in seen:
            seen.add(key)
            out.append([*job, "role=baseline"])
    return out
