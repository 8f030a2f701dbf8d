r"""Temperature schedules of the smooth gates, and a controller that holds the Effective Update Ratio at a target.

``gate.tau_schedule`` picks how τ_pos moves over the training steps (rollout batches) s = 0 … S − 1; τ_neg keeps
the ratio ρ = ``gate.tau_neg`` / ``gate.tau_pos`` of the configured pair throughout:

* ``constant``: τ_pos = ``gate.tau_pos``;
* ``linear`` / ``cosine``: from ``gate.tau_start`` to ``gate.tau_end`` (default: both ``gate.tau_pos``),
  :math:`\tau_s = \tau_{start} + (\tau_{end} - \tau_{start})\,u_s` with :math:`u_s = s/(S-1)` or
  :math:`u_s = (1 - \cos(\pi s/(S-1)))/2`, so the first step runs at τ_start and the last at τ_end; τ_neg follows
  its own path when ``gate.tau_neg_start`` / ``gate.tau_neg_end`` are set (default: ρ·τ_pos);
* ``eur_target``: τ starts at ``gate.tau_pos`` and after every step moves by a bounded proportional step toward
  the EUR target :math:`E^*` (``gate.eur_target``), using that step's measured EUR :math:`E_s` (the last pass over
  the batch, arXiv 2602.19345 eq. 12):

  .. math:: \log\tau_{s+1} = \mathrm{clip}\big(\log\tau_s + \mathrm{clip}(k\,(E_s - E^*), \pm\delta),\
            \log\tau_{min}, \log\tau_{max}\big)

  with gain k (``gate.controller.gain``), step bound δ (``max_step``) and bounds ``tau_min``/``tau_max``.

Why the controller is stable: at fixed ratios every smooth gate's weight w = F'(τ(r − 1)) falls as τ grows, so
EUR is a decreasing function of log τ. Writing the error :math:`e_s = E_s - E^*` near the τ that meets the target,
:math:`e_{s+1} \approx (1 - k\,|dE/d\log\tau|)\,e_s`: negative feedback, which converges when
:math:`0 < k\,|dE/d\log\tau| < 2`. :math:`|dE/d\log\tau| = E[|y F''(y)|]` is at most
:math:`\sup_y |y F''(y)| < 1` for the built-in gates, so the default k = 1 cannot overshoot into oscillation;
δ bounds each move while the ratios drift, as PPO's adaptive-KL coefficient does. If the target cannot be met
(EUR stays above it even at τ_max, e.g. on-policy), τ rests at its bound.

The state (the current log τ) is a function of the measured EURs, so a resumed run replays its history
(:meth:`TauSchedule.replay`) and continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.gates import has_temperature
from harness.schema import ControllerConfig

SCHEDULES = ("constant", "linear", "cosine", "eur_target")


@dataclass
class TauSchedule:
    """τ_pos / τ_neg of each training step (module docstring)."""

    kind: str
    tau_pos: float
    tau_neg: float
    steps: int
    tau_start: float | None = None
    tau_end: float | None = None
    tau_neg_start: float | None = None
    tau_neg_end: float | None = None
    eur_target: float | None = None
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # the gate node's, defaults and all

    def __post_init__(self) -> None:
        self.ratio = self.tau_neg / self.tau_pos
        self.log_tau = math.log(self.tau_pos)  # the controller's state

    @property
    def adaptive(self) -> bool:
        return self.kind == "eur_target"

    def taus(self, step: int) -> tuple[float, float]:
        """(τ_pos, τ_neg) for 0-based ``step``."""
        if self.kind == "constant":
            tp = self.tau_pos
        elif self.kind == "eur_target":
            tp = math.exp(self.log_tau)
        else:
            u = step / (self.steps - 1) if self.steps > 1 else 1.0
            if self.kind == "cosine":
                u = 0.5 * (1.0 - math.cos(math.pi * u))
            tp = _between(self.tau_start, self.tau_end, self.tau_pos, u)
            if self.tau_neg_start is not None or self.tau_neg_end is not None:
                return tp, _between(self.tau_neg_start, self.tau_neg_end, self.tau_neg, u)
        return tp, tp * self.ratio

    def observe(self, eur: float) -> None:
        """The controller's update after a step whose EUR was ``eur`` (no-op for the fixed schedules and for a
        non-finite EUR, e.g. a step where every group had zero advantage)."""
        if not self.adaptive or not math.isfinite(eur):
            return
        ctl = self.controller
        move = max(-ctl.max_step, min(ctl.max_step, ctl.gain * (eur - float(self.eur_target))))
        self.log_tau = max(math.log(ctl.tau_min), min(math.log(ctl.tau_max), self.log_tau + move))

    def replay(self, history: Sequence[Mapping[str, Any]], eur_key: str, tau_key: str | None = None) -> None:
        """Bring the controller to where it was after the steps of ``history`` (a resumed run's checkpoint holds
        every step's EUR and τ). With ``tau_key``, each replayed τ is checked against the τ the step logged, so a
        checkpoint whose history does not fit this schedule (e.g. a changed gain) is refused, not silently
        continued."""
        self.log_tau = math.log(self.tau_pos)
        for s, entry in enumerate(history):
            logged = entry.get(tau_key) if tau_key is not None else None
            if logged is not None and not math.isclose(float(logged), self.taus(s)[0], rel_tol=1e-9):
                raise ValueError(f"resume: step {s + 1} of the checkpoint ran at tau_pos={float(logged):.6g} but "
                                 f"gate.tau_schedule={self.kind} gives {self.taus(s)[0]:.6g}; resume with the "
                                 "schedule settings the run started with")
            self.observe(float(entry.get(eur_key, math.nan)))


def schedule_from_config(cfg: Any) -> TauSchedule:
    """The :class:`TauSchedule` of a run config (``gate`` and ``train.steps``); ``ValueError`` naming the key."""
    g = cfg.gate
    if not has_temperature(str(g.name)):  # a constant schedule whose τ the loss never reads
        return TauSchedule("constant", 1.0, 1.0, int(cfg.train.steps))
    kind = str(g.get("tau_schedule", "constant") or "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"gate.tau_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    c = g.controller
    ctl = ControllerConfig(gain=float(c.gain), max_step=float(c.max_step), tau_min=float(c.tau_min),
                           tau_max=float(c.tau_max))
    sched = TauSchedule(kind, float(g.tau_pos), float(g.tau_neg), int(cfg.train.steps),
                        tau_start=_opt(g.get("tau_start")), tau_end=_opt(g.get("tau_end")),
                        tau_neg_start=_opt(g.get("tau_neg_start")), tau_neg_end=_opt(g.get("tau_neg_end")),
                        eur_target=_opt(g.get("eur_target")), controller=ctl)
    for key in ("tau_start", "tau_end", "tau_neg_start", "tau_neg_end"):
        value = getattr(sched, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"gate.{key} must be a finite number > 0, got {value!r}")
    if kind == "eur_target":
        if sched.eur_target is None or not 0 < sched.eur_target < 1:
            raise ValueError(f"gate.tau_schedule=eur_target needs gate.eur_target in (0, 1), got {sched.eur_target!r}")
        if not ctl.gain > 0 or not ctl.max_step > 0:
            raise ValueError("gate.controller.gain and gate.controller.max_step must be > 0")
        if not 0 < ctl.tau_min <= sched.tau_pos <= ctl.tau_max:
            raise ValueError(f"gate.controller needs 0 < tau_min <= gate.tau_pos <= tau_max, got tau_min="
                             f"{ctl.tau_min}, tau_pos={sched.tau_pos}, tau_max={ctl.tau_max}")
    return sched


def _between(start: float | None, end: float | None, default: float, u: float) -> float:
    start = default if start is None else start
    end = default if end is None else end
    return start + (end - start) * u


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)
