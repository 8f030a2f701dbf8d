"""The evaluator: metrics, config validation, the hf engine, evaluate(), the Hydra app and the lm-eval path.

The vllm engine has its own file (tests/test_vllm_engine.py, marker ``vllm``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import evaluation as E
from harness import stats
from harness.cli import eval_main
from harness.config import EVAL_TASK_DIR
from harness.prompts import PromptConfig, render_prompt

TINY_PROMPT = {"template": "{problem}", "system_prompt": None}
# One torch thread for generation: on a busy 2-core machine two OpenMP threads spin-wait on each other (7-35x slower).
HF_OPTS = {"num_threads": 1}


# ---------------------------------------------------------------------------------------------------------------
# metrics (pass@k and bootstrap CIs themselves: tests/test_stats.py)


def _record(pid, j, correct, *, strict=None, fmt=True, tokens=10, finish="stop", fallback="answer"):
    return {"problem_id": pid, "sample_index": j, "correct": correct,
            "strict_correct": correct if strict is None else strict, "format_ok": fmt, "num_tokens": tokens,
            "finish_reason": finish, "fallback": fallback}


def test_benchmark_metrics_on_known_records():
    records = [
        _record("a", 0, True), _record("a", 1, True), _record("a", 2, False, finish="length", tokens=20),
        _record("a", 3, False, fmt=False, fallback="none"),
        _record("b", 0, True, strict=False, fallback="last_number", fmt=False), _record("b", 1, False),
        _record("b", 2, False), _record("b", 3, False),
    ]
    m = E.benchmark_metrics(records, 4, pass_k=[2], n_boot=200)
    assert m["n_problems"] == 2 and m["n_samples"] == 8 and m["k"] == 4
    assert m["acc"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["strict_acc"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["pass_at_1"] == pytest.approx(m["acc"])
    assert m["pass_at_2"] == pytest.approx((stats.pass_at_k(4, 2, 2) + stats.pass_at_k(4, 1, 2)) / 2)
    assert m["pass_at_4"] == 1.0
    assert m["format_rate"] == pytest.approx(6 / 8)
    assert m["truncation_rate"] == pytest.approx(1 / 8)
    assert m["mean_tokens"] == pytest.approx((7 * 10 + 20) / 8)
    assert m["acc_ci_low"] <= m["acc"] <= m["acc_ci_high"]
    assert m["fallback_none_rate"] == pytest.approx(1 / 8) and m["fallback_last_number_rate"] == pytest.approx(1 / 8)
    # "a" and "b" both fall in the selection half (a fixed coin per id); "e" (all strict-correct) in the test half
    assert stats.in_selection_half("a") and stats.in_selection_half("b") and not stats.in_selection_half("e")
    m = E.benchmark_metrics(records + [_record("e", i, True) for i in range(4)], 4, n_boot=50)
    assert m["strict_acc"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["selection_strict_acc"] == pytest.approx((0.5 + 0.0) / 2)
    assert all(isinstance(v, int | float) for v in m.values())  # tracking.log_eval logs every number


# ---------------------------------------------------------------------------------------------------------------
# validation: clear ValueErrors before any generation


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"benchmarks": ["gsm8k", "mmlu"]}, r"unknown benchmark.*mmlu.*known: arith, gsm8k, math500, aime24, aime25"),
        ({"k": 0}, r"k of benchmark 'arith'.*>= 1"),
        ({"bench": {"aime24": {"k": -2}}, "benchmarks": ["aime24"]}, r"k of benchmark 'aime24'"),
        ({"temperature": -0.1}, r"temperature must be >= 0"),
        ({"engine": "sglang"}, r"eval.engine='sglang' is unknown; known engines: hf, vllm, lm_eval"),
        ({"top_p": 0}, r"top_p"),
        ({"benchmark": ["arith"]}, r"unknown key.*benchmark"),
        ({"bench": {"arith": {"max_tokens": 5}}}, r"eval.bench.arith: unknown key"),
        ({"bench": {"arith": {"template": "no placeholder"}}}, r"\{problem\}"),
        ({"scoring": {"fallbacks": ["regex"]}}, r"unknown rule"),
        ({"engine": "vllm", "vllm": {"python": "/nonexistent/python"}}, r"eval.vllm.python.*does not exist"),
        ({"context_len": 0}, r"eval.context_len must be an integer >= 1"),
        ({"context_len": "long"}, r"eval.context_len must be an integer >= 1"),
    ],
)
def test_validate_eval_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        E.validate_eval_config(cfg)


def test_validate_missing_local_file(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(ValueError, match=r"benchmark 'gsm8k': local file .*gsm8k/test.jsonl not found"):
        E.validate_eval_config({"benchmarks": ["gsm8k"]}, data_dir=tmp_path)
    # arith is built in: no file needed
    assert E.validate_eval_config({"benchmarks": ["arith"]}, data_dir=tmp_path).benchmarks[0].name == "arith"


def test_vllm_python_without_vllm_is_rejected():
    import importlib.util
    import sys

    # This interpreter (the harness's .venv) has no vllm: validation must say so before anything runs.

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    with pytest.raises(ValueError, match="cannot import vllm"):
        E.validate_eval_config({"engine": "vllm", "vllm": {"python": sys.executable}})


def test_vllm_worker_failure_is_reported(tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    # A child that dies (here: no vllm in that interpreter) surfaces as an error with the tail of its log.
    engine = E.VllmEngine(str(tmp_path), {"python": sys.executable, "stream_logs": False}, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)vllm worker 0 failed.*No module named 'vllm'"):
        engine.generate(["hi"], 2, E.Sampling(0.7, max_new_tokens=4))
    assert (tmp_path / "vllm_worker.log").exists()


def test_per_benchmark_defaults_and_overrides(data_dir):
    s = E.validate_eval_config({"benchmarks": ["gsm8k", "math500", "aime24", "aime25"]}, data_dir=data_dir)
    assert [(b.name, b.k) for b in s.benchmarks] == [("gsm8k", 1), ("math500", 4), ("aime24", 16), ("aime25", 16)]
    s = E.validate_eval_config({"benchmarks": ["aime25"], "k": 2, "max_new_tokens": 64}, data_dir=data_dir)
    assert (s.benchmarks[0].k, s.benchmarks[0].max_new_tokens) == (2, 64)


def test_paper_and_default_configs_compose(data_dir):
    from conftest import compose

    cfg = compose(["eval=paper"], config_name="evaluate")
    s = E.validate_eval_config({**cfg.eval, "engine": "hf"}, data_dir=data_dir)
    assert [b.name for b in s.benchmarks] == ["gsm8k", "math500", "aime24", "aime25"]
    assert s.temperature == 0.7 and [b.k for b in s.benchmarks] == [1, 4, 16, 16]
    assert compose([], config_name="evaluate").eval.benchmarks == ["arith"]


def test_evaluation_follows_the_task():
    """`harness run` evaluates the task's own test split (never silently arith), `eval=paper` or an explicit list
    still win, and a model node that sets eval keys (the SmolLM2 preset) is not overridden by eval's defaults."""
    from conftest import compose

    expected = {"arith": ["arith"], "gsm8k": ["gsm8k"], "deepmath": ["math500"],
                "gsm8k_deepmath": ["gsm8k", "math500", "aime24", "aime25"]}
    for task, benchmarks in expected.items():
        assert list(compose([f"task={task}"]).eval.benchmarks) == benchmarks, task
        assert list(compose([f"task={task}"], config_name="evaluate").eval.benchmarks) == benchmarks, task
    assert list(compose(["task=gsm8k", "eval=paper"]).eval.benchmarks) == ["gsm8k", "math500", "aime24", "aime25"]
    assert list(compose(["task=gsm8k", "eval.benchmarks=[math500]"]).eval.benchmarks) == ["math500"]
    smol = compose(["model=smollm2-135m", "task=gsm8k"])
    assert smol.eval.bench.gsm8k.max_new_tokens == 256 and smol.eval.bench.arith.limit == 200
    assert smol.train.rewards.accuracy_fallbacks == ["last_number"] and smol.train.rollout_batch_size == 32
    assert compose(["model=smollm2-135m", "train.rollout_batch_size=64"]).train.rollout_batch_size == 64
    settings = E.validate_eval_config(smol.eval)
    assert E.describe_plan(settings) == "gsm8k (all problems, k=1, <= 256 new tokens) at T=0.7 on hf"


def test_four_cpu_preset_and_the_models_context_compose(data_dir):
    from conftest import compose

    cfg = compose(["eval=four_cpu"], config_name="evaluate")
    s = E.validate_eval_config(cfg.eval, data_dir=data_dir)
    assert [b.name for b in s.benchmarks] == ["gsm8k", "math500", "aime24", "aime25"]  # both AIME years: pooled aime
    assert s.engine == "hf" and s.temperature == 0.7 and all(b.limit is None for b in s.benchmarks)
    assert s.context_len == 8192  # conf/model/tiny.yaml's model.context_len, read by eval.context_len
    limited = E.validate_eval_config(compose(["eval=four_cpu", "eval.limit=3"], config_name="evaluate").eval)
    assert {b.limit for b in limited.benchmarks} == {3}
    # a model without model.context_len keeps its checkpoint's own context; the paper preset is unchanged
    hub = compose(["model=hf", "model.path=org/x", "eval=paper"], config_name="evaluate")
    assert hub.eval.context_len is None and [b.k for b in E.validate_eval_config(
        {**hub.eval, "engine": "hf"}, data_dir=data_dir).benchmarks] == [1, 4, 16, 16]


def test_evaluate_rejects_missing_model_before_generating(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("generation must not start")

    monkeypatch.setattr(E, "make_engine", boom)
    with pytest.raises(ValueError, match="does not exist"):
        E.evaluate(str(tmp_path / "no-such-model"), {}, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown benchmark"):
        E.evaluate(str(tmp_path), {"benchmarks": ["nope"]}, out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# the hf engine and evaluate() on the tiny model


@pytest.fixture(scope="module")
def tiny(cache_dir) -> str:
    from harness.models import resolve_model_path

    return resolve_model_path("tiny", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def arith_prompts(tiny):
    from transformers import AutoTokenizer

    from harness.data import load_task

    tok = AutoTokenizer.from_pretrained(tiny)
    problems = load_task("arith", "test", limit=24)
    return problems, [render_prompt(tok, p["problem"], PromptConfig(**TINY_PROMPT)) for p in problems]


def test_hf_engine_sampling_semantics(tiny, arith_prompts):
    _, prompts = arith_prompts
    engine = E.HFEngine(tiny, batch_size=32, progress=False, num_threads=1)
    greedy = engine.generate(prompts[:6], 3, E.Sampling(0.0, max_new_tokens=16))
    assert [len(c) for c in greedy] == [3] * 6
    assert all(len({x.text for x in c}) == 1 for c in greedy)  # T = 0: one completion, repeated
    s = E.Sampling(1.0, max_new_tokens=16, seed=7)
    a = engine.generate(prompts[:6], 4, s)
    b = engine.generate(prompts[:6], 4, s)
    assert a == b  # seeded
    assert a != engine.generate(prompts[:6], 4, E.Sampling(1.0, max_new_tokens=16, seed=8))
    for comps in a:
        for c in comps:
            assert c.finish_reason in E.FINISH_REASONS and 1 <= c.num_tokens <= 16
            assert (c.finish_reason == "length") == (c.num_tokens == 16) or c.finish_reason == "stop"
    # Batching does not change greedy output (left padding + attention mask).
    single = E.HFEngine(tiny, batch_size=1, progress=False, num_threads=1)
    one_by_one = [single.generate([p], 1, E.Sampling(0.0, max_new_tokens=16))[0] for p in prompts[:4]]
    assert [c[0].text for c in one_by_one] == [c[0].text for c in greedy[:4]]


def test_context_overrides_only_where_no_number_changes(tiny, tmp_path):
    """eval.context_len is applied as a config override at load time, and only to rotary models whose RoPE does
    not read max_position_embeddings; anything else is refused naming the key and what is allowed."""
    from transformers import AutoConfig

    assert E.model_context_len(tiny) == 256  # the recipe's config: the weights are not rebuilt
    assert E.model_context_len(tiny, 8192) == 8192
    assert E.context_overrides(tiny, None) == {} and E.context_overrides(tiny, 256) == {}
    assert E.context_overrides(tiny, 8192) == {"max_position_embeddings": 8192}
    learned = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(learned)
    with pytest.raises(ValueError, match=r"eval.context_len=2048 .*gpt2.*no rotary position embeddings.*"
                                         r"allowed: null or 1024"):
        E.context_overrides(str(learned), 2048)
    dynamic = tmp_path / "dynamic"
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cfg.save_pretrained(dynamic)
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.*rope types default, linear only"):
        E.model_context_len(str(dynamic), 8192)


def test_context_override_changes_no_completion(tiny, arith_prompts):
    """The tiny model loaded with max_position_embeddings=8192 (its conf/model/tiny.yaml context) generates exactly
    what the recipe's 256-position config generates, greedy and seeded sampling alike: RoPE has no table to grow."""
    _, prompts = arith_prompts
    wide = {"max_position_embeddings": 8192}
    for sampling in (E.Sampling(0.0, max_new_tokens=16), E.Sampling(0.7, max_new_tokens=16, seed=3)):
        a = E.HFEngine(tiny, batch_size=32, progress=False, num_threads=1).generate(prompts, 4, sampling)
        raised = E.HFEngine(tiny, batch_size=32, progress=False, num_threads=1, config_overrides=wide)
        b = raised.generate(prompts, 4, sampling)
        assert raised.model.config.max_position_embeddings == 8192
        assert a == b


def test_prompts_past_the_context_name_the_setting(tiny, data_dir, tmp_path):
    cfg = {"benchmarks": ["gsm8k"], "limit": 5, "context_len": None}  # gsm8k's 5th prompt is longer than 256 tokens
    with pytest.raises(ValueError, match=r"benchmark 'gsm8k': 1 prompt\(s\) do not fit the model's context "
                                         r"\(\d+ >= 256 tokens\); raise it with eval.context_len=N"):
        E.evaluate(tiny, cfg, prompt_cfg=TINY_PROMPT, data_dir=data_dir, out_dir=tmp_path)


def test_evaluate_hf_end_to_end(tiny, tmp_path):
    cfg = {"benchmarks": ["arith"], "bench": {"arith": {"limit": 40, "k": 4}}, "temperature": 0.7, "hf": HF_OPTS}
    summary = E.evaluate(tiny, cfg, prompt_cfg=TINY_PROMPT, out_dir=tmp_path, seed=1)
    m = summary["benchmarks"]["arith"]
    assert (m["n_problems"], m["k"], m["n_samples"], m["n_total"]) == (40, 4, 160, 500)
    assert summary["limits"] == {"arith": 40} and summary["notes"]["arith"] == "first 40 of 500 problems (limit 40)"
    assert "note: arith: first 40 of 500 problems" in E.format_summary(summary)
    assert m["acc_ci_low"] <= m["acc"] <= m["acc_ci_high"]
    assert 0 <= m["strict_acc"] <= m["acc"] <= m["pass_at_4"] <= 1
    assert m["acc"] > 0.05  # the warm-started tiny model solves some arith problems
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["arith"]["acc"] == m["acc"]
    rows = [json.loads(x) for x in (tmp_path / "samples" / "arith.jsonl").read_text().splitlines()]
    assert len(rows) == 160
    assert set(rows[0]) >= {"problem_id", "sample_index", "prompt", "response", "extracted", "correct",
                            "strict_correct", "fallback", "num_tokens", "finish_reason", "format_ok"}
    assert rows[0]["prompt"].startswith("Q: ") and rows[0]["prompt"].endswith("\nA:")  # the tiny chat template
    assert [r["sample_index"] for r in rows[:4]] == [0, 1, 2, 3]


def test_hydra_app(tiny, tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache_dir))
    eval_main(["--cfg", "job", "eval.benchmarks=[gsm8k]"])
    assert "benchmarks:\n  - gsm8k" in capsys.readouterr().out
    out = tmp_path / "run"
    eval_main(["eval.bench.arith.limit=8", "eval.k=2", "eval.hf.num_threads=1", f"hydra.run.dir={out}"])
    assert "arith" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["arith"]["n_samples"] == 16


# ---------------------------------------------------------------------------------------------------------------
# lm-eval cross-check


def test_lm_eval_task_files_load(tmp_path):
    from lm_eval.tasks import TaskManager

    docs = [{"id": "x", "problem": "1+1?", "answer": "2"}]
    name = E.write_lm_eval_task(tmp_path, "arith", docs, ["Q: 1+1?\nA:"], k=3, sampling=E.Sampling(0.7, 0.9, 12, 0))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load([name])
    task = next(iter(tasks["tasks"].values())) if "tasks" in tasks else next(iter(tasks.values()))
    assert task.config.repeats == 3
    assert task.config.generation_kwargs["do_sample"] is True
    assert task.config.generation_kwargs["max_gen_toks"] == 12
    assert task.doc_to_text(task.test_docs()[0]) == "Q: 1+1?\nA:"


@pytest.mark.slow
def test_lm_eval_path_gives_identical_verdicts(tiny, tmp_path):
    """Same prompts at T = 0 through lm-eval and through the harness's hf engine: lm-eval's process_results and
    our scorer must judge identical completions identically."""
    cfg = {"benchmarks": ["arith"], "bench": {"arith": {"limit": 32, "k": 1}}, "temperature": 0.0, "hf": HF_OPTS}
    lm = E.evaluate(tiny, {**cfg, "engine": "lm_eval"}, prompt_cfg=TINY_PROMPT, out_dir=tmp_path / "lm")
    hf = E.evaluate(tiny, {**cfg, "engine": "hf"}, prompt_cfg=TINY_PROMPT, out_dir=tmp_path / "hf")
    m = lm["benchmarks"]["arith"]
    assert m["lm_eval_agreement"] == 1.0
    assert m["lm_eval_acc"] == pytest.approx(m["acc"])
    rows = {p: [json.loads(x) for x in (tmp_path / p / "samples" / "arith.jsonl").read_text().splitlines()]
            for p in ("lm", "hf")}
    assert [r["prompt"] for r in rows["lm"]] == [r["prompt"] for r in rows["hf"]]
    same = [a["correct"] == b["correct"] for a, b in zip(rows["lm"], rows["hf"], strict=True)
            if a["response"] == b["response"]]
    assert len(same) >= 0.9 * len(rows["hf"]) and all(same)
    assert hf["benchmarks"]["arith"]["acc"] == pytest.approx(m["acc"], abs=0.1)


def test_lm_eval_utils_process_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_eval_utils", Path(EVAL_TASK_DIR) / "lm_eval_utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = {"problem": "2+3?", "answer": "5"}
    res = mod.process_results(doc, [["<think>x</think> <answer>5</answer>", "the answer is 5", "<answer>4</answer>"]])
    assert res["acc"] == pytest.approx(2 / 3) and res["strict_acc"] == pytest.approx(1 / 3)
    assert res["format_rate"] == pytest.approx(1 / 3) and res["pass_at_k"] == 1.0
    assert mod.keep_all([["a", "b"], ["c", "d"]], [{}, {}]) == [["a", "b"], ["c", "d"]]
    assert "2+3?" in mod.doc_to_text(doc)


def test_aime24_and_aime25_pool_into_one_aime_benchmark():
    """The paper's AIME column: both years' records as one 60-problem benchmark; the mean accuracy of the run
    counts each year once, not the pooled column again."""
    settings = E.validate_eval_config({"benchmarks": ["aime24", "aime25"], "k": 2, "metrics": {"bootstrap": 200}})
    a24 = [_record(f"2024-{i}", j, (i + j) % 3 == 0) for i in range(30) for j in range(2)]
    a25 = [_record(f"2025-{i}", j, i < 3) for i in range(30) for j in range(2)]
    pooled = E.pooled_benchmarks({"aime24": (2, a24), "aime25": (2, a25)}, settings)
    metrics, records = pooled["aime"]
    assert metrics["n_problems"] == 60 and len(records) == 120
    hand = (sum(r["correct"] for r in a24) + sum(r["correct"] for r in a25)) / 120
    assert metrics["acc"] == pytest.approx(hand)
    assert metrics["acc_ci_low"] < metrics["acc"] < metrics["acc_ci_high"]
    assert E.pooled_benchmarks({"aime24": (2, a24)}, settings) == {}  # one year alone: no pooled column
