"""Temperature schedules and the EUR controller: end points, the controller holding its target on a drifting ratio
stream for every smooth gate, its stability bound, exact resume of an adaptive run in the native backend, and the
TRL callback carrying τ into the loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import open_dict

from harness import keys as K
from harness.gates import get_gate
from harness.objective import policy_loss
from harness.schedule import TauSchedule, schedule_from_config
from harness.schema import ControllerConfig
from tests.conftest import compose

SMOOTH = ("sigmoid", "erf", "arctan", "softsign", "softsign_abs", "student")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_fixed_schedules_hit_their_end_points_and_keep_the_ratio(kind):
    sched = TauSchedule(kind, tau_pos=10.0, tau_neg=12.0, steps=7, tau_start=20.0, tau_end=5.0)
    taus = [sched.taus(s) for s in range(7)]
    assert taus[0] == (20.0, pytest.approx(24.0)) and taus[-1] == (5.0, pytest.approx(6.0))
    assert all(tn == pytest.approx(1.2 * tp) for tp, tn in taus)
    assert all(a[0] > b[0] for a, b in itertools.pairwise(taus))  # monotone between the end points
    mid = taus[3][0]
    assert mid == pytest.approx(12.5)  # both schedules pass the midpoint at half-time
    if kind == "cosine":
        assert taus[1][0] > 20.0 - 15.0 / 6  # cosine starts slower than linear


def test_tau_neg_can_follow_its_own_path():
    sched = TauSchedule("linear", 10.0, 12.0, steps=3, tau_start=10.0, tau_end=4.0, tau_neg_end=12.0)
    assert [sched.taus(s) for s in range(3)] == [(10.0, 12.0), (7.0, 12.0), (4.0, 12.0)]


def test_constant_schedule_and_defaults():
    sched = TauSchedule("constant", 10.0, 12.0, steps=5)
    assert {sched.taus(s) for s in range(5)} == {(10.0, 12.0)}
    sched.observe(0.1)  # fixed schedules ignore EUR
    assert sched.taus(4) == (10.0, 12.0)
    lin = TauSchedule("linear", 10.0, 12.0, steps=5)  # tau_start / tau_end default to gate.tau_pos
    assert {lin.taus(s) for s in range(5)} == {(10.0, 12.0)}


def _ratio_stream(step: int, n_steps: int, gen: torch.Generator, tokens: int = 8192) -> torch.Tensor:
    """log r ~ N(0, σ_s²) with σ_s growing geometrically from 0.01 to 0.1 over the stream: the policy drifts
    further from the behaviour policy as training goes on, so the τ that holds EUR must keep falling."""
    sigma = 0.01 * 10 ** (step / (n_steps - 1))
    return sigma * torch.randn(2, tokens // 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("gate", SMOOTH)
def test_controller_holds_eur_near_target_on_a_drifting_stream(gate):
    """From τ = 10 (EUR well off 0.9 for every gate) the controller reaches |EUR − 0.9| <= 0.02 within 40 steps
    and stays inside that band for the remaining 160 steps while the ratio spread grows tenfold; τ falls as the
    spread grows."""
    n_steps, target, band, settle = 200, 0.9, 0.02, 40
    sched = TauSchedule("eur_target", 10.0, 12.0, steps=n_steps, eur_target=target)
    gen = torch.Generator().manual_seed(0)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    eurs, taus = [], []
    for s in range(n_steps):
        tau_pos, tau_neg = sched.taus(s)
        log_ratio = _ratio_stream(s, n_steps, gen)
        mask = torch.ones_like(log_ratio, dtype=torch.bool)
        _, diag = policy_loss(log_ratio, torch.zeros_like(log_ratio), adv, mask, gate=gate, tau_pos=tau_pos,
                              tau_neg=tau_neg, nu=4.0 if gate == "student" else None)
        eurs.append(diag[K.EUR])
        taus.append(tau_pos)
        sched.observe(diag[K.EUR])
    late = eurs[settle:]
    assert max(abs(e - target) for e in late) <= band, (gate, min(late), max(late))
    assert taus[-1] < taus[settle] / 3  # it tracked the drift, not just the start
    assert abs(eurs[0] - target) > 2 * band  # and it did have to move: τ = 10 starts well off the target


@pytest.mark.parametrize("gate", SMOOTH)
def test_loop_gain_bound_of_the_docstring(gate):
    """The stability argument: |dEUR/d log τ| <= sup_y |y F''(y)| < 1 for the built-in gates, so gain 1 keeps the
    loop factor 1 − k|dE/d log τ| inside (−1, 1)."""
    g = get_gate(gate, nu=4.0 if gate == "student" else None)
    y = torch.linspace(-60, 60, 240_001, dtype=torch.float64, requires_grad=True)
    (d2,) = torch.autograd.grad(g.weight_x(y).sum(), y) if g.weight_x(y).requires_grad else (None,)
    if d2 is None:  # closed-form F' is not differentiable through autograd here: finite differences
        h = 1e-5
        yd = y.detach()
        d2 = (g.weight_x(yd + h) - g.weight_x(yd - h)) / (2 * h)
    assert float((y.detach() * d2).abs().max()) < 1.0


def test_controller_rests_at_its_bound_when_the_target_is_unreachable():
    sched = TauSchedule("eur_target", 10.0, 12.0, steps=50, eur_target=0.9, controller=ControllerConfig(tau_max=40.0))
    for s in range(50):
        sched.taus(s)
        sched.observe(1.0)  # on-policy: EUR stays 1 whatever τ is
    assert sched.taus(49) == (pytest.approx(40.0), pytest.approx(48.0))
    sched.observe(float("nan"))  # a step with no trainable group leaves τ where it is
    assert sched.taus(49)[0] == pytest.approx(40.0)


def test_replay_reproduces_the_state_and_refuses_a_changed_schedule():
    a = TauSchedule("eur_target", 10.0, 12.0, steps=6, eur_target=0.9)
    history = []
    for s, e in enumerate([0.99, 0.97, 0.93, 0.88, 0.91]):
        history.append({"eur": e, "tau_pos": a.taus(s)[0]})
        a.observe(e)
    b = TauSchedule("eur_target", 10.0, 12.0, steps=6, eur_target=0.9)
    b.replay(history, "eur", "tau_pos")
    assert b.taus(5) == a.taus(5)
    c = TauSchedule("eur_target", 10.0, 12.0, steps=6, eur_target=0.9, controller=ControllerConfig(gain=3.0))
    with pytest.raises(ValueError, match=r"resume: step 2 .*tau_pos"):
        c.replay(history, "eur", "tau_pos")


@pytest.mark.parametrize(("overrides", "match"), [
    (["gate.tau_schedule=warm"], "gate.tau_schedule must be one of constant, linear, cosine, eur_target"),
    (["gate.tau_schedule=eur_target"], "gate.eur_target in \\(0, 1\\)"),
    (["gate.tau_schedule=eur_target", "gate.eur_target=1.5"], "gate.eur_target in \\(0, 1\\)"),
    (["gate.tau_schedule=linear", "gate.tau_end=-1"], "gate.tau_end must be a finite number > 0"),
    (["gate.tau_schedule=eur_target", "gate.eur_target=0.9", "gate.controller.tau_max=0.5"], "tau_min <= gate.tau_pos"),
])
def test_bad_schedule_config_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_config(compose(overrides))


def test_verl_refuses_a_moving_temperature(tmp_path):
    from harness.cell import validate_cell

    cfg = compose(["backend=verl", "gate.tau_schedule=eur_target", "gate.eur_target=0.9"])
    with pytest.raises(ValueError, match=r"gate\.tau_schedule=eur_target is not supported on backend=verl"):
        validate_cell(cfg)


def test_killed_and_resumed_adaptive_run_matches_uninterrupted(tmp_path, cache_dir):
    """The controller's state survives a kill: τ per step, EUR and the final weights of a resumed run equal an
    uninterrupted one's, and τ did move."""
    from safetensors.torch import load_file

    from harness.backends.native import train

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 2:
            raise Killed

    def cfg_at(path):
        cfg = compose(["train.steps=3", "train.rollout_batch_size=16", "train.mini_batch_size=8",
                       "train.micro_batch_size=8", "train.save_every=1", "backend.progress=false",
                       "backend.threads=1", "eval.enabled=false", f"cache_dir={cache_dir}",
                       "gate.tau_schedule=eur_target", "gate.eur_target=0.5", "gate.controller.gain=4"])
        with open_dict(cfg):
            cfg.output_dir = str(path)
        return cfg

    straight = train(cfg_at(tmp_path / "straight"))
    taus = [h[K.TAU_POS] for h in straight.history]
    assert taus[0] == cfg_at(tmp_path).gate.tau_pos and len(set(taus)) == 3  # it moved after every step
    cfg = cfg_at(tmp_path / "killed")
    with pytest.raises(Killed):
        train(cfg, on_step=kill)
    with open_dict(cfg):
        cfg.resume = True
    resumed = train(cfg)
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in (K.TAU_POS, K.TAU_NEG, K.pass_key(2, K.EUR), K.REWARD):
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-9), key
    wa = load_file(straight.final_checkpoint / "model.safetensors")
    wb = load_file(resumed.final_checkpoint / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_trl_callback_moves_the_loss_temperature_between_steps(tmp_path, cache_dir):
    """On backend=trl the callback sets τ between harness steps: the logged τ of every step is the controller's value
    after the EURs before it, and that τ reaches the loss (the second pass's loss, where r ≠ 1, departs from a
    constant-τ run's after the first step, while the first step, at the same τ, is identical)."""
    from harness.backends.trl import train

    def run(name: str, *extra: str):
        cfg = compose(["backend=trl", "backend.device=cpu", "backend.threads=1", "backend.progress=false",
                       "train.steps=3", "train.rollout_batch_size=16", "train.num_generations=8",
                       "train.mini_batch_size=8", "train.micro_batch_size=8", "train.max_new_tokens=16",
                       "train.warmup_steps=0", "train.save_every=3", "train.lr=1e-3", "eval.enabled=false",
                       "gate.tau_pos=10.0", "gate.tau_neg=12.0", f"cache_dir={cache_dir}", *extra])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / name)
        return cfg, train(cfg)

    cfg, adaptive = run("adaptive", "gate.tau_schedule=eur_target", "gate.eur_target=0.5", "gate.controller.gain=4")
    _, constant = run("constant")
    expected = schedule_from_config(cfg)
    eur = K.pass_key(2, K.EUR)
    for step, h in enumerate(adaptive.history):
        assert h[K.TAU_POS] == pytest.approx(expected.taus(step)[0], rel=1e-12)
        assert h[K.TAU_NEG] == pytest.approx(1.2 * h[K.TAU_POS], rel=1e-12)
        expected.observe(h[eur])
    taus = [h[K.TAU_POS] for h in adaptive.history]
    assert taus[0] == pytest.approx(10.0) and taus[1] > taus[0] and taus[2] > taus[1]  # EUR above 0.5 raises τ
    loss = K.pass_key(2, "loss")
    assert adaptive.history[0][loss] == pytest.approx(constant.history[0][loss], rel=1e-6, abs=1e-9)
    assert adaptive.history[1][loss] != pytest.approx(constant.history[1][loss], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_trl_resume_continues_the_controller_from_its_checkpoint(tmp_path, cache_dir):
    """A TRL run killed after step 2 and resumed from its checkpoint continues the controller where it stood: the
    resumed steps' τ are the controller's values after every EUR before them (the restored history included), as in
    an uninterrupted run."""
    from harness.backends.trl import train

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 2:
            raise Killed

    cfg = compose(["backend=trl", "backend.device=cpu", "backend.threads=1", "backend.progress=false",
                   "train.steps=4", "train.rollout_batch_size=16", "train.num_generations=8",
                   "train.mini_batch_size=8", "train.micro_batch_size=8", "train.max_new_tokens=16",
                   "train.warmup_steps=0", "train.save_every=1", "train.lr=1e-3", "eval.enabled=false",
                   "gate.tau_pos=10.0", "gate.tau_neg=12.0", "gate.tau_schedule=eur_target", "gate.eur_target=0.5",
                   "gate.controller.gain=4", f"cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(Killed):
        train(cfg, on_step=kill)
    with open_dict(cfg):
        cfg.resume = True
    resumed = train(cfg)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    expected = schedule_from_config(cfg)
    for step, h in enumerate(resumed.history):
        assert h[K.TAU_POS] == pytest.approx(expected.taus(step)[0], rel=1e-12), step
        expected.observe(h[K.pass_key(2, K.EUR)])
    taus = [h[K.TAU_POS] for h in resumed.history]
    assert all(b > a for a, b in itertools.pairwise(taus))  # still moving after the resume
