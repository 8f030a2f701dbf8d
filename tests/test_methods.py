"""The ratio-control methods of harness/methods.py (and dual-clip) against the frameworks' own code: TRL's
``GRPOTrainer._compute_loss`` / experimental ``GMPOTrainer._compute_loss`` as installed in this environment, verl's
registered policy losses in the verl virtualenv, and GPPO (which neither has) against its closed-form gradient.
Float64 random tensors, loss value and gradient to 1e-6. The verl subprocess also runs the harness plugin's
``harness_<name>`` losses, so a verl user gets the same numbers through either name."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch

from harness.gates import RATIO_CONTROL, get_gate
from harness.objective import policy_loss
from tests.conftest import needs_verl, run_verl
from tests.test_backend_trl import GA, TAU_NEG, TAU_POS, _run, _tensors

TOL = 1e-6


def _ours(data: dict, gate: str, *, agg: str = "seq-mean-token-mean", eps: tuple[float, float] = (0.2, 0.2),
          params: dict | None = None, weights: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    x = data["_logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(x, data["old_per_token_logps"], data["advantages"], data["completion_mask"], gate=gate,
                          agg=agg, eps_low=eps[0], eps_high=eps[1], method_params=params, token_weights=weights,
                          diagnostics=False)
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad


def _diff(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> float:
    return max(abs(a[0] - b[0]), float((a[1] - b[1]).abs().max()))


# ----------------------------------------------------------------------------------------------------------- TRL


@pytest.mark.parametrize("eps_max", [5.0, 1.15])
def test_cispo_equals_trls_cispo(eps_max):
    """TRL loss_type=cispo (epsilon_high is ε_max) sums tokens over num_items_in_batch: our token-mean."""
    from trl import GRPOTrainer

    worst = 0.0
    for seed in range(3):
        data = _tensors(seed)
        data["num_items_in_batch"] = data["completion_mask"].sum()
        accelerator = SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t, num_processes=1)
        trl = _run(GRPOTrainer, data, loss_type="cispo", epsilon_high=eps_max, accelerator=accelerator)
        data.pop("num_items_in_batch")
        worst = max(worst, _diff(trl, _ours(data, "cispo", agg="token-mean", params={"eps_max": eps_max})))
    assert worst <= TOL, worst


@pytest.mark.parametrize("c", [3.0, 1.25])
def test_dual_clip_equals_trls_delta(c):
    """TRL's two-sided GRPO clip (args.delta, INTELLECT-2) is dual-clip with c = δ."""
    from trl import GRPOTrainer

    worst = 0.0
    for seed in range(3):
        data = _tensors(seed)
        trl = _run(GRPOTrainer, data, loss_type="grpo", args=_trl_args(delta=c))
        ours = _ours(data, "dual_clip", params={"clip_c": c})
        worst = max(worst, _diff(trl, (ours[0] / GA, ours[1] / GA)))
    assert worst <= TOL, worst


def test_gmpo_equals_trls_experimental_gmpo_trainer():
    from trl.experimental.gmpo import GMPOTrainer

    worst = 0.0
    for seed in range(3):
        data = _tensors(seed)
        trl = _run(GMPOTrainer, data, epsilon_low=0.4, epsilon_high=0.4)
        ours = _ours(data, "gmpo", eps=(0.4, 0.4))
        worst = max(worst, _diff(trl, (ours[0] / GA, ours[1] / GA)))
    assert worst <= TOL, worst


@pytest.mark.parametrize("with_weights", [False, True])
def test_vespo_equals_trls_vespo(with_weights):
    """TRL loss_type=vespo (TRL's k, λ defaults and others), token sums over num_items_in_batch: our token-mean; with
    vLLM importance ratios TRL folds them into the sequence weight, as ``token_weights`` are folded here."""
    from trl import GRPOTrainer

    worst, binds = 0.0, False
    for seed in range(3):
        data = _tensors(seed)
        data["advantages"][1] = -data["advantages"][1].abs() - 0.5
        mask = data["completion_mask"].bool()
        w = torch.rand(data["_logp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5
        w = torch.where(mask, w, 1.0)  # TRL sums log w over every position: 1 (log 0) on padding
        keys = dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=1.5, vespo_lambda_neg=1.0) if seed else {}
        params = {k.removeprefix("vespo_"): v for k, v in keys.items()} or None
        data["num_items_in_batch"] = data["completion_mask"].sum()
        if with_weights:
            data["importance_sampling_ratio"] = w
        accelerator = SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t, num_processes=1)
        trl = _run(GRPOTrainer, data, loss_type="vespo", accelerator=accelerator, args=_trl_args(
            **{"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0, **keys}),
                   use_vllm=with_weights, vllm_importance_sampling_correction=with_weights)
        for key in ("num_items_in_batch", "importance_sampling_ratio"):
            data.pop(key, None)
        ours = _ours(data, "vespo", agg="token-mean", params=params, weights=w if with_weights else None)
        worst = max(worst, _diff(trl, ours))
        _, diag = policy_loss(data["_logp"], data["old_per_token_logps"], data["advantages"], mask, gate="vespo")
        binds |= diag["eur"] < 0.999
    assert worst <= TOL and binds, worst


def test_luspo_is_clip_at_sequence_level_summed_over_tokens():
    """TRL loss_type=luspo (importance_sampling_level=sequence): GSPO's clipped sequence ratio, each sequence's token
    sum, the mean over sequences = gate=clip, train.loss.ratio_level=sequence, train.loss.agg=seq-mean-token-sum."""
    from trl import GRPOTrainer

    worst = 0.0
    for seed in range(3):
        data = _tensors(seed)
        trl = _run(GRPOTrainer, data, loss_type="luspo", importance_sampling_level="sequence")
        x = data["_logp"].clone().requires_grad_(True)
        loss, _ = policy_loss(x, data["old_per_token_logps"], data["advantages"], data["completion_mask"],
                              gate="clip", ratio_level="sequence", agg="seq-mean-token-sum", diagnostics=False)
        (grad,) = torch.autograd.grad(loss / GA, x)
        worst = max(worst, _diff(trl, (float(loss.detach()) / GA, grad)))
    assert worst <= TOL, worst


def _trl_args(**changes) -> SimpleNamespace:
    """The ``args`` test_backend_trl's fake trainer carries, with ``changes``."""
    return SimpleNamespace(**{**dict(delta=None, sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG,
                                     use_bias_correction_kl=False, steps_per_generation=GA,
                                     gradient_accumulation_steps=GA), **changes})


# ---------------------------------------------------------------------------------------------- the closed form


@pytest.mark.parametrize(("beta_low", "beta_high"), [(1.0, 1.0), (0.5, 1.0), (0.75, 0.5)])
def test_gppo_gradient_is_the_closed_form(beta_low, beta_high):
    """GPPO (β = 1) and CE-GPPO: per token d(−s)/d log π is −r·A inside the band, −β_high(1 + ε)·A above it for
    A > 0 and −β_low(1 − ε)·A below it for A ≤ 0; the value is clip's value scaled by β outside. A loop over tokens."""
    eps = 0.2
    for seed in range(3):
        data = _tensors(seed)
        got = _ours(data, "gppo", params={"beta_low": beta_low, "beta_high": beta_high})
        old, logp, mask, adv = (data[k] for k in ("old_per_token_logps", "_logp", "completion_mask", "advantages"))
        grad, value = torch.zeros_like(logp), 0.0
        rows = [i for i in range(logp.shape[0]) if mask[i].sum() > 0]
        for i in rows:
            n = int(mask[i].sum())
            for t in range(n):
                r, a = float(torch.exp(logp[i, t] - old[i, t])), float(adv[i])
                if a > 0 and r > 1 + eps:
                    s, ds = beta_high * (1 + eps) * a, beta_high * (1 + eps) * a
                elif a <= 0 and r < 1 - eps:
                    s, ds = beta_low * (1 - eps) * a, beta_low * (1 - eps) * a
                else:
                    s, ds = r * a, r * a
                value -= s / n / len(rows)
                grad[i, t] = -ds / n / len(rows)
        assert _diff(got, (value, grad)) <= 1e-12


def test_every_method_reports_its_kept_share_as_eur():
    """EUR's analogue: at r = 1 (nothing moved) every method keeps every token; after a move, the kept share is
    the token share its own rule keeps (here cispo's cap: the tokens with r ≤ ε_max)."""
    data = _tensors(3)
    mask, adv, old = data["completion_mask"].bool(), data["advantages"], data["old_per_token_logps"]
    for gate in RATIO_CONTROL:
        params = {"dro_beta": 0.1} if gate == "dro" else None
        _, diag = policy_loss(old.clone(), old, adv, mask, gate=gate, method_params=params)
        assert (diag["eur"] == 1.0 and diag.get("clip_frac", 0.0) == 0.0) or gate in ("kl_cov", "clip_cov"), gate
    _, diag = policy_loss(data["_logp"], old, adv, mask, gate="cispo", method_params={"eps_max": 1.1})
    r = torch.exp(data["_logp"] - old)[mask]
    assert diag["clip_frac"] == pytest.approx(float((r > 1.1).double().mean()), abs=1e-12)


def test_bad_method_settings_name_the_key():
    with pytest.raises(ValueError, match=r"gate\.eps_max must be a number > 0"):
        get_gate("cispo", params={"eps_max": -1.0})
    with pytest.raises(ValueError, match=r"gate\.clip_c must be a finite number > 1"):
        get_gate("dual_clip", params={"clip_c": 0.5})
    data = _tensors(0)
    with pytest.raises(ValueError, match=r"train\.loss\.agg=seq-mean-token-mean"):
        _ours(data, "gmpo", agg="token-mean")
    with pytest.raises(ValueError, match=r"train\.loss\.off_policy\.level must be token"):
        policy_loss(data["_logp"], data["old_per_token_logps"], data["advantages"], data["completion_mask"],
                    gate="vespo", behaviour_logp=data["old_per_token_logps"] - 0.1, off_policy="tis",
                    is_level="sequence")
    assert get_gate("gmpo").eps_high == 0.4 and get_gate("dppo_kl").eps_low == 0.05  # their own defaults


def test_gates_plot_refuses_a_method(tmp_path, capsys):
    from harness.cli import main

    assert main(["gates", "plot", "--gates", "sigmoid", "cispo", "--out", str(tmp_path / "g.png")]) == 2
    assert "cispo: ratio-control methods have no f(r) to draw" in capsys.readouterr().err
    assert main(["gates", "plot", "--gates", "clip", "dual_clip", "--out", str(tmp_path / "g.png")]) == 0


# ---------------------------------------------------------------------------------------------------------- verl

_VERL = textwrap.dedent(r'''
    import json, sys
    import torch
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig
    import harness.backends.verl_plugin  # registers harness_<name>

    out = []
    for case in json.loads(sys.argv[1]):
        old, logp, adv = (torch.tensor(case[k], dtype=torch.float64) for k in ("old", "logp", "adv"))
        mask = torch.tensor(case["mask"])
        w = torch.tensor(case["weights"], dtype=torch.float64) if case["weights"] is not None else None
        cfg = FSDPActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=1,
                              policy_loss=PolicyLossConfig(loss_mode=case["verl"], **case["policy_loss"]),
                              **case["actor"])
        row = {}
        for key, name in (("verl", case["verl"]), ("plugin", "harness_" + case["gate"])):
            torch.manual_seed(case["seed"])  # Clip-Cov's draw
            x = logp.clone().requires_grad_(True)
            loss, _ = get_policy_loss_fn(name)(old, x, adv[:, None].expand_as(x), mask, case["agg"], cfg,
                                               rollout_is_weights=w)
            (grad,) = torch.autograd.grad(loss, x)
            row[key] = {"loss": float(loss), "grad": grad.tolist()}
        out.append(row)
    print("VERL" + json.dumps(out))
''')

# (verl loss_mode, harness gate, actor keys, policy_loss keys, our ε and own keys, aggregation, with IS weights)
VERL_CASES = [
    ("vanilla", "dual_clip", {"clip_ratio_c": 3.0}, {}, (0.2, 0.2), {"clip_c": 3.0}, "seq-mean-token-mean", False),
    ("vanilla", "dual_clip", {"clip_ratio_c": 1.3}, {}, (0.2, 0.2), {"clip_c": 1.3}, "token-mean", True),
    ("cispo", "cispo_two_sided", {}, {}, (0.2, 0.2), {}, "token-mean", False),
    ("cispo", "cispo_two_sided", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3}, {}, (0.1, 0.3), {},
     "seq-mean-token-mean", True),
    ("geo_mean", "gmpo", {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4}, {}, (0.4, 0.4), {},
     "seq-mean-token-mean", False),
    ("geo_mean", "gmpo", {"clip_ratio": 0.1, "clip_ratio_low": 0.1, "clip_ratio_high": 0.2}, {}, (0.1, 0.2), {},
     "seq-mean-token-mean", True),
    ("dppo_tv", "dppo_tv", {"clip_ratio": 0.15, "clip_ratio_low": 0.15, "clip_ratio_high": 0.15, "clip_ratio_c": 20.0},
     {}, (0.15, 0.15), {"clip_c": 20.0}, "token-mean", False),
    ("dppo_tv", "dppo_tv", {"clip_ratio": 0.05, "clip_ratio_low": 0.05, "clip_ratio_high": 0.1, "clip_ratio_c": 1.2},
     {}, (0.05, 0.1), {"clip_c": 1.2}, "seq-mean-token-mean", True),
    ("dppo_kl", "dppo_kl", {"clip_ratio": 0.02, "clip_ratio_low": 0.02, "clip_ratio_high": 0.02, "clip_ratio_c": 20.0},
     {}, (0.02, 0.02), {"clip_c": 20.0}, "token-mean", False),
    ("dppo_kl", "dppo_kl", {"clip_ratio": 0.01, "clip_ratio_low": 0.01, "clip_ratio_high": 0.02, "clip_ratio_c": 1.5},
     {}, (0.01, 0.02), {"clip_c": 1.5}, "seq-mean-token-mean", True),
    ("gpg", "gpg", {}, {}, (0.2, 0.2), {}, "token-mean", False),
    ("dro", "dro", {}, {"dro_beta": 0.3}, (0.2, 0.2), {"dro_beta": 0.3}, "seq-mean-token-mean", True),
    ("kl_cov", "kl_cov", {}, {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5}, (0.2, 0.2),
     {"kl_cov_ratio": 0.1, "kl_coef": 0.5}, "token-mean", False),
    ("kl_cov", "kl_cov", {}, {"kl_cov_ratio": 0.0002, "ppo_kl_coef": 0.1}, (0.2, 0.2), {}, "seq-mean-token-mean", True),
    ("clip_cov", "clip_cov", {}, {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0}, (0.2, 0.2),
     {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0}, "token-mean", False),
    ("clip_cov", "clip_cov", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3}, {"clip_cov_ratio": 0.1,
     "clip_cov_lb": -0.5, "clip_cov_ub": 2.0}, (0.1, 0.3), {"clip_cov_ratio": 0.1, "clip_cov_lb": -0.5,
     "clip_cov_ub": 2.0}, "seq-mean-token-sum", True),
]


@needs_verl
def test_methods_equal_verls_registered_losses():
    """verl 0.9.1's own ``vanilla`` (dual-clip), ``cispo``, ``geo_mean``, ``dppo_tv``, ``dppo_kl``, ``gpg``,
    ``dro``, ``kl_cov`` and ``clip_cov`` (its random draw from the same seed of the global generator), and the plugin's
    ``harness_<name>``, equal policy_loss: value and gradient, with and without rollout importance weights. Prints
    the parity table (method, verl / plugin max abs difference)."""
    cases, ours = [], []
    for k, (verl_name, gate, actor, pl, eps, params, agg, with_w) in enumerate(VERL_CASES):
        data = _tensors(40 + k)
        data["advantages"][1] = -data["advantages"][1].abs() - 0.5  # both signs present in every case
        w = (torch.rand(data["_logp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 2
             if with_w else None)
        cases.append({"verl": verl_name, "gate": gate, "actor": actor, "policy_loss": pl, "agg": agg, "seed": k,
                      "old": data["old_per_token_logps"].tolist(), "logp": data["_logp"].tolist(),
                      "adv": data["advantages"].tolist(), "mask": data["completion_mask"].tolist(),
                      "weights": None if w is None else w.tolist()})
        torch.manual_seed(k)  # Clip-Cov's draw, as in the verl process
        ours.append(_ours(data, gate, agg=agg, eps=eps, params=params or None, weights=w))
        if gate not in ("gpg", "dro"):  # the rule must bind somewhere, or the comparison would not test it
            torch.manual_seed(k)
            _, diag = policy_loss(data["_logp"], data["old_per_token_logps"], data["advantages"],
                                  data["completion_mask"], gate=gate, agg=agg, eps_low=eps[0], eps_high=eps[1],
                                  method_params=params or None)
            assert 0 < diag["clip_frac"] < 1, (gate, diag["clip_frac"])
    proc = run_verl(_VERL, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.split("VERL", 1)[1])
    table = []
    for case, mine, row in zip(cases, ours, theirs, strict=True):
        diffs = {key: _diff(mine, (row[key]["loss"], torch.tensor(row[key]["grad"], dtype=torch.float64)))
                 for key in ("verl", "plugin")}
        table.append((case["gate"], case["verl"], case["agg"], case["weights"] is not None, diffs))
    print("\n".join(f"{g:16s} verl {v:9s} {a:20s} weights={w!s:5s} verl {d['verl']:.1e} plugin {d['plugin']:.1e}"
                    for g, v, a, w, d in table))
    assert all(d["verl"] <= TOL and d["plugin"] <= TOL for *_, d in table), table


# ------------------------------------------------------------------------------------------------------ backends


@pytest.mark.parametrize("overrides", [["gate=gppo", "gate.beta_low=0.5"], ["gate=cispo", "gate.eps_max=1.1"],
                                       ["gate=dual_clip", "gate.clip_c=1.3"], ["gate=gmpo"]])
def test_trl_backend_trains_the_methods_with_their_own_keys(overrides):
    """The TRL backend's _compute_loss with the loss arguments a run config gives (harness.objective.loss_kwargs)
    equals policy_loss with the method's own keys, and differs from the method at its defaults where the key
    binds: the keys reach the loss."""
    from harness.backends.trl_trainer import HarnessGRPOTrainer
    from harness.objective import loss_kwargs
    from tests.conftest import compose

    kwargs = loss_kwargs(compose(overrides))
    assert kwargs.get("method_params") or overrides == ["gate=gmpo"]
    data = _tensors(7)
    data["advantages"][1] = -data["advantages"][1].abs() - 0.5
    got = _run(HarnessGRPOTrainer, data, harness_loss_kwargs=kwargs)
    x = data["_logp"].clone().requires_grad_(True)
    ref, _ = policy_loss(x, data["old_per_token_logps"], data["advantages"], data["completion_mask"],
                         diagnostics=False, **kwargs)
    (grad,) = torch.autograd.grad(ref / GA, x)
    assert _diff(got, (float(ref.detach()) / GA, grad)) <= 1e-12
    if len(overrides) > 1:
        default = _run(HarnessGRPOTrainer, data, harness_loss_kwargs=loss_kwargs(compose(overrides[:1])))
        assert _diff(got, default) > 1e-6


def test_verl_backend_passes_the_methods_keys():
    """verl gets dual-clip's and DPPO's c as actor.clip_ratio_c and the keys verl has none for in
    $HARNESS_VERL_GATE_PARAMS; the plugin reads both back (harness.backends.verl_plugin.loss_options)."""
    from harness.backends.verl import loss_env, verl_overrides
    from harness.backends.verl_plugin import ENV_GATE_PARAMS, loss_options
    from tests.conftest import compose_at

    cfg = compose_at("/runs/x", ["backend=verl", "train.lr_schedule=cosine", "gate=dual_clip", "gate.clip_c=2.5"])
    ov = dict(o.split("=", 1) for o in verl_overrides(cfg))
    assert ov["actor_rollout_ref.actor.clip_ratio_c"] == "2.5"
    assert ov["actor_rollout_ref.actor.policy_loss.loss_mode"] == "harness_dual_clip"
    cfg = compose_at("/runs/x", ["backend=verl", "train.lr_schedule=cosine", "gate=gppo", "gate.beta_low=0.5"])
    env = loss_env(cfg)
    assert json.loads(env[ENV_GATE_PARAMS]) == {"beta_high": 1.0, "beta_low": 0.5}
    opts = loss_options({"clip_ratio_c": 2.5, "clip_ratio_low": 0.1}, env)
    assert opts["method_params"] == {"clip_c": 2.5, "beta_high": 1.0, "beta_low": 0.5} and opts["eps_low"] == 0.1


def test_methods_sweep_cells_and_names():
    """The methods sweep's grid: one cell per seed for every method (no τ), τ pairs for the gates; cell names carry
    the method's own keys, and the staleness axis composes with it (run names ``...-lag4-s0``)."""
    from harness.cell import cell_name
    from harness.sweeping.grid import cell_overrides
    from tests.conftest import compose

    cells = cell_overrides(["sigmoid", "dual_clip", "cispo"], [10.0], [0, 1])
    assert ["gate=dual_clip", "seed=0"] in cells and ["gate=cispo", "seed=1"] in cells
    assert ["gate=sigmoid", "seed=0", "gate.tau_pos=10.0", "gate.tau_neg=12.0"] in cells and len(cells) == 6
    assert cell_name(compose(["gate=dual_clip"])) == "dual_clip-e0.2-0.2-clip_c3-s0"
    assert cell_name(compose(["gate=cispo", "train.staleness=4", "seed=1"])) == "cispo-eps_max5-lag4-s1"
    assert cell_name(compose(["gate=clip"])) == "clip-e0.2-0.2-s0"  # unchanged: finished clip cells are reused


@pytest.mark.parametrize("name", [n for n in RATIO_CONTROL if n != "dro"])
def test_a_methods_own_defaults_are_its_conf_options(name):
    """get_gate(name) without settings (the Python API, ``harness gates check``) builds the method its conf/gate yaml
    runs: the defaults written in two places agree."""
    from harness.gates import gate_params
    from tests.conftest import compose

    g = compose([f"gate={name}"]).gate
    assert get_gate(name) == get_gate(name, eps_low=g.get("eps_low"), eps_high=g.get("eps_high"), params=gate_params(g))
