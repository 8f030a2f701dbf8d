"""The prepared GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py) and the GPU-path fixes it came with, on CPU.

The dry run is the real script at tiny shapes, so it cannot rot between GPU loans; the other tests pin what the GPU
run relies on: a step past its limit is killed with its children, a failed step leaves the others' results, no tensor
of the loss is made off its inputs' device, and a bf16 checkpoint trains in float32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from harness.gates import BUILTIN_GATES, RATIO_CONTROL
from tests.conftest import compose

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

STEPS = ("env", "tiny_model", "objective", "run_cell", "trainer_tiny", "trainer_0.5b")


@pytest.mark.slow
def test_dry_run_of_the_gpu_check_measures_every_step(tmp_path, cache_dir):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "HARNESS_CACHE_DIR": str(cache_dir), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--work", str(tmp_path / "work")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The device machine brings back at most 8 plain files from $OUT.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry"] is True and list(data["steps"]) == list(STEPS)
    assert {n: s["status"] for n, s in data["steps"].items()} == dict.fromkeys(STEPS, "ok")
    res = {n: s["result"] for n, s in data["steps"].items()}

    assert res["env"]["packages"]["trl"] and res["env"]["packages"]["hydra-core"]
    assert Path(res["tiny_model"]["path"]).is_dir()
    for dtype in ("float32", "bfloat16"):
        timing = res["objective"]["timing"][dtype]
        assert timing["dtype"] == dtype and set(timing["gates"]) == {*BUILTIN_GATES, *RATIO_CONTROL}
        assert timing["gates"]["clip"]["diag=True"]["x_clip"] == 1.0
        assert all(r[k]["ms"] > 0 for r in timing["gates"].values() for k in ("diag=True", "diag=False"))
    err = res["objective"]["bf16_error"]
    assert 0 < err["ratio_abs_err_mean"] < err["ratio_dev_mean"]
    assert set(err["gates"]) == set(BUILTIN_GATES)
    assert all(0 < g["grad_rel_err"] < 0.5 for g in err["gates"].values())  # bf16 differs from float64, not wildly

    cell = res["run_cell"]
    assert cell["steps"] == 1 and cell["train_time_s"] > 0 and cell["eval_time_s"] > 0
    assert 0 <= cell["accuracy_before"] <= 1 and 0 <= cell["accuracy_after"] <= 1
    for name, model, rows in (("trainer_tiny", "tiny", {"native", "trl"}),
                              ("trainer_0.5b", "mini", {"native", "trl, no grad ckpt"})):
        tr = res[name]
        assert tr["settings"]["model"] == model and set(tr["rows"]) == rows
        # tokens/s of every row: the TRL count once missed a batch, which one timed batch shows as 0
        assert all(r["tps"] > 0 and r["step"] > 0 for r in tr["rows"].values()), tr["rows"]
    tiny = res["trainer_tiny"]
    assert tiny["native_over_trl"] == pytest.approx(tiny["rows"]["native"]["tps"] / tiny["rows"]["trl"]["tps"])

    md = (out / "gpu_check.md").read_text()
    assert "| step | status | wall s |" in md and "| softsign_abs |" in md and "**mini model**" in md
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {n} " in log for n in STEPS)


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the step starts a grandchild (as TRL's scorer pool does) and both would sleep for a minute
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    with (tmp_path / "log").open("a") as log:
        t0 = time.perf_counter()
        deadline = t0 + 20
        status, seconds, _ = gpu_check.run_step([sys.executable, "-c", code], 3.0, log)
    assert status == "timeout" and seconds < 10 and time.perf_counter() < deadline
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with its group; give the kernel a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process outlived the step")


def test_a_failed_step_keeps_the_others_results(tmp_path, monkeypatch):
    py = sys.executable
    steps = [gpu_check.Step("boom", [py, "-c", "print('about to fail'); raise SystemExit(3)"], 30),
             gpu_check.Step("fine", [py, "-c", "print('fine')"], 30, result=lambda: {"x": 1}),
             gpu_check.Step("late", [py, "-c", "pass"], 30)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: steps)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0)
    out = tmp_path / "out"
    rc = gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work"), "--budget-s", "60"])
    data = json.loads((out / "gpu_check.json").read_text())
    assert rc == 1
    assert data["steps"]["boom"]["status"] == "failed" and data["steps"]["boom"]["exit_code"] == 3
    assert "about to fail" in data["steps"]["boom"]["output_tail"]
    assert data["steps"]["fine"] == {**data["steps"]["fine"], "status": "ok", "result": {"x": 1}}
    assert data["steps"]["late"]["status"] == "ok"
    assert "| boom | failed |" in (out / "gpu_check.md").read_text()


def test_a_step_without_budget_left_is_skipped(tmp_path, monkeypatch):
    steps = [gpu_check.Step("only", [sys.executable, "-c", "pass"], 30)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: steps)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work"), "--budget-s", "1"]) == 1
    assert json.loads((out / "gpu_check.json").read_text())["steps"]["only"]["status"] == "skipped (budget)"


@pytest.mark.parametrize("gate", BUILTIN_GATES)
def test_policy_loss_makes_no_tensor_off_its_inputs_device(gate):
    """With the default device set to ``meta``, a tensor made without ``device=`` lands on meta while the inputs are
    on the CPU, and any op mixing the two fails: the CPU stand-in for a CPU tensor meeting CUDA inputs (the bug this
    caught: torch.quantile's q on the CPU for CUDA ratios, in every trainer's diagnostics)."""
    from harness.objective import policy_loss

    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 16, generator=gen) * 3).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(4, 16, generator=gen)
    ref = logp.detach() + 0.05 * torch.randn(4, 16, generator=gen)
    adv, mask, groups = torch.randn(4, generator=gen), torch.rand(4, 16, generator=gen) < 0.8, torch.arange(4) // 2
    with torch.device("meta"):
        loss, diag = policy_loss(logp, old, adv, mask, gate=gate, groups=groups, ref_logp=ref, kl_beta=0.1)
    loss.backward()
    assert loss.device.type == "cpu" and math.isfinite(float(loss.detach()))
    assert all(math.isfinite(v) for k, v in diag.items() if not math.isnan(v)) and 0 < diag["eur"] <= 1


def test_native_trains_a_bf16_checkpoint_in_float32(tmp_path, cache_dir):
    """transformers 5 loads a checkpoint in the dtype it was saved in, and Qwen2.5's are bf16: AdamW on bf16 weights
    drops updates smaller than half a bf16 step (a step is 1.2e-4 at |w| ~ 0.03), so most weights would not move at
    the paper recipe's lr. The native trainer keeps float32 master weights (bf16 only in the autocast compute)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.backends.native import train
    from harness.models import resolve_model_path

    tiny = resolve_model_path("tiny", cache_dir=cache_dir)
    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(bf16_dir)
    cfg = compose(["train.steps=1", "train.rollout_batch_size=64", "train.mini_batch_size=64",
                   "train.micro_batch_size=32", "backend.progress=false", "backend.threads=1", "eval.enabled=false",
                   f"model.path={bf16_dir}", f"cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    result = train(cfg)
    key = "model.layers.0.mlp.down_proj.weight"
    before = load_file(bf16_dir / "model.safetensors")[key]
    after = load_file(Path(result.final_checkpoint) / "model.safetensors")[key]
    assert before.dtype == torch.bfloat16 and after.dtype == torch.float32
    assert result.history[0]["grad_norm"] > 0
    assert (after != before.float()).float().mean() > 0.9  # in bf16 most of them would not have moved
