"""`harness report`: a real MLflow store (SQLite in tmp) filled through harness.tracking with plausible cell runs.

The report is the component under test; MLflow and Optuna are real. Cells: sigmoid and erf at τ = 1 and 4 with two
seeds, clip with one seed, one FAILED cell and one pruned (KILLED) run; per-sample JSONL artifacts whose summary
metrics come from harness.evaluation.benchmark_metrics, as in a real evaluation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import compose

from harness import reporting, stats, tracking
from harness.cell import cell_params, cell_tags, config_hash, summary_tags
from harness.evaluation import benchmark_metrics, write_jsonl

BENCHES = {"arith": (60, 4), "gsm8k": (40, 2)}  # name -> (problems, k)
STEPS = 12
# (gate, tau, seeds, true accuracy): erf at τ=1 is clearly better than sigmoid at τ=1 (4 seeds each: the IQM too).
CELLS = [("sigmoid", 1.0, (0, 1, 2, 3), 0.45), ("sigmoid", 4.0, (0, 1), 0.40), ("erf", 1.0, (0, 1, 2, 3), 0.70),
         ("erf", 4.0, (0,), 0.43), ("clip", None, (0,), 0.38)]


def _records(bench: str, p_true: float, rng: np.random.Generator) -> list[dict]:
    n, k = BENCHES[bench]
    difficulty = np.linspace(-1.5, 1.5, n)  # shared across cells: the pairing has something to remove
    out = []
    for i in range(n):
        p = 1 / (1 + np.exp(-(np.log(p_true / (1 - p_true)) - difficulty[i])))
        for j in range(k):
            correct = bool(rng.random() < p)
            out.append({"benchmark": bench, "problem_id": f"{bench}-{i}", "sample_index": j, "correct": correct,
                        "strict_correct": correct, "fallback": "answer", "format_ok": True, "num_tokens": 10 + j,
                        "finish_reason": "stop", "prompt": "p", "response": "r", "gold": "1", "extracted": "1"})
    return out


def _cfg(gate: str, tau: float | None, seed: int, uri: str, experiment: str, out: Path, extra=()):
    ov = [f"gate={gate}", f"seed={seed}", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
          f"output_dir={out}", *extra]
    if tau is not None:
        ov += [f"gate.tau_pos={tau}", f"gate.tau_neg={round(tau * 1.05, 10)}"]
    return compose(ov)


class _Pruned(Exception):
    """Stands for optuna.TrialPruned: a run stopped on purpose, which ends KILLED."""


def _open(cfg, store: tracking.Store, parent: str | None, name: str, **kw):
    """A cell run as harness.cell.run_tracked opens it (tags, params, config)."""
    from omegaconf import OmegaConf

    tags = {**cell_tags(cfg, config_hash(cfg)), **kw.pop("extra_tags", {})}
    return tracking.cell_run(store, run_name=name, tags=tags, params=cell_params(cfg),
                             config_yaml=OmegaConf.to_yaml(cfg, resolve=True), parent_run_id=parent, **kw)


def _train_metrics(step: int, gate: str, rng: np.random.Generator) -> dict[str, float]:
    m = {"reward": 0.8 + 0.04 * step + 0.05 * rng.standard_normal(), "reward_accuracy": 0.3 + 0.02 * step,
         "reward_format": 0.9, "entropy": 1.5 - 0.05 * step, "response_length": 12.0, "truncation_rate": 0.05,
         "grad_norm": 0.5, "lr": 1e-4, "loss": -0.01, "zero_var_frac": 0.2}
    for it in (1, 2):
        dev = 0.0 if it == 1 else 0.1 + 0.01 * rng.random()
        m.update({f"it{it}/ratio_mean": 1.0, f"it{it}/ratio_std": dev, f"it{it}/abs_ratio_dev": dev * 0.8,
                  f"it{it}/gate_weight": 1.0 - dev, f"it{it}/frac_w_lt_0.5": dev / 4, f"it{it}/frac_w_lt_0.1": 0.0,
                  f"it{it}/eur": 1.0 - dev, f"it{it}/abs_ratio_dev_p95": 2 * dev, f"it{it}/ratio_max": 1.0 + 3 * dev})
        if gate == "clip":
            m[f"it{it}/clip_frac"] = dev / 3
    return m


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One SQLite MLflow store with the experiments every test reads (creating a store takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    samples: dict[tuple[str, str], list[dict]] = {}  # (run_id, bench) -> records
    rng = np.random.default_rng(7)

    def cell(gate, tau, seed, p, experiment, exp, parent, *, evaluate=True, baseline=False, extra=(),
             tau_path=None, warnings=()):
        out = root / f"{experiment}-{gate}-{tau}-{seed}{'-base' if baseline else ''}{len(extra)}"
        cfg = _cfg(gate, tau, seed, uri, experiment, out, extra=["role=baseline"] if baseline else extra)
        with _open(cfg, exp, parent, f"{gate}-{tau}-s{seed}") as run:
            for step in range(1, 0 if baseline else STEPS + 1):
                taus = {} if tau_path is None else {"tau_pos": tau_path(step), "tau_neg": 1.05 * tau_path(step)}
                run.log_step(step, {**_train_metrics(step, gate, rng), **taus})
            summary = {"train": {}, **({"warnings": list(warnings)} if warnings else {})}
            if evaluate:
                ev = {"benchmarks": {}, "out_dir": str(out / "eval")}
                for bench in BENCHES:
                    recs = _records(bench, p, rng)
                    samples[(run.run_id, bench)] = recs
                    write_jsonl(out / "eval" / "samples" / f"{bench}.jsonl", recs)
                    ev["benchmarks"][bench] = benchmark_metrics(recs, BENCHES[bench][1], n_boot=200, seed=seed)
                ev["mean_accuracy"] = float(np.mean([m["acc"] for m in ev["benchmarks"].values()]))
                summary["eval"] = ev
            run.log_cell(summary, out)
            run.set_tags(summary_tags(summary))
        return run.run_id

    exp = tracking.open_store(_cfg("sigmoid", 1.0, 0, uri, "gates", root).tracking)
    parent = tracking.start_parent(exp, name="sweep-test", tags={"sweep": "gates"})
    runs = {"base": cell("sigmoid", 1.0, 0, 0.30, "gates", exp, parent, baseline=True)}  # the starting checkpoint
    for gate, tau, seeds, p in CELLS:
        for seed in seeds:
            runs[(gate, tau, seed)] = cell(gate, tau, seed, p, "gates", exp, parent)
    # An older FINISHED run of one config hash: the report must take the newest one.
    stale = cell("clip", None, 0, 0.9, "gates", exp, parent)
    runs[("clip", None, 0)] = cell("clip", None, 0, 0.38, "gates", exp, parent)
    # A FAILED cell and a pruned (KILLED) one: reported as such, not used as results.
    with pytest.raises(RuntimeError), _open(_cfg("arctan", 2.0, 0, uri, "gates", root / "f"), exp, parent, "boom"):
        raise RuntimeError("NaN loss at step 3")
    with pytest.raises(_Pruned), _open(_cfg("arctan", 3.0, 0, uri, "gates", root / "k"), exp, parent, "pruned",
                                       stop_exceptions=(_Pruned,)) as run:
        run.log_step(1, _train_metrics(1, "arctan", rng))
        raise _Pruned
    tracking.end_parent(exp, parent, {"cells": 10, "finished": 9, "failed": 1})

    # One seed, no evaluation, no parent run, no study: every optional piece missing.
    bare = tracking.open_store(_cfg("sigmoid", 1.0, 0, uri, "bare", root).tracking)
    for gate, tau in (("sigmoid", 1.0), ("softsign", 2.0)):
        cell(gate, tau, 0, 0.5, "bare", bare, None, evaluate=False,
             warnings=["no learning signal in 3 of 3 steps"] if gate == "softsign" else ())

    # Adaptive τ: sigmoid at two fixed τ and under the EUR controller (its τ falls from 4 to 2), 3 seeds each.
    adaptive = tracking.open_store(_cfg("sigmoid", 1.0, 0, uri, "adaptive", root).tracking)
    for seed in (0, 1, 2):
        runs[("adaptive", 1.0, seed)] = cell("sigmoid", 1.0, seed, 0.40, "adaptive", adaptive, None,
                                             tau_path=lambda s: 1.0)
        runs[("adaptive", 4.0, seed)] = cell("sigmoid", 4.0, seed, 0.45, "adaptive", adaptive, None,
                                             tau_path=lambda s: 4.0)
        runs[("adaptive", "eur", seed)] = cell(
            "sigmoid", 4.0, seed, 0.47, "adaptive", adaptive, None,
            extra=("gate.tau_schedule=eur_target", "gate.eur_target=0.9"),
            tau_path=lambda s, seed=seed: 4.0 * 0.5 ** ((s - 1) / (STEPS - 1)) * (1 + 0.01 * seed))
    return {"uri": uri, "root": root, "runs": runs, "stale": stale, "samples": samples}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report")
    path = reporting.write_report("gates", tracking_uri=store["uri"], out_dir=out)
    return {"path": path, "html": path.read_text(), "md": (out / "report.md").read_text(),
            "json": json.loads((out / "report.json").read_text()), "out": out}


def _per_problem(records) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for x in records:
        per.setdefault(x["problem_id"], []).append(float(x["correct"]))
    return {p: float(np.mean(v)) for p, v in per.items()}


def _seed_problem_matrix(store, run_ids, bench) -> np.ndarray:
    """Seeds x problems accuracy, by hand from the records logged as artifacts (runs in seed order)."""
    rows = [_per_problem(store["samples"][(rid, bench)]) for rid in run_ids]
    problems = sorted(rows[0])
    return np.array([[row[p] for p in problems] for row in rows])


def _selection_accuracy(store, run_ids, bench) -> float:
    """Mean over seeds of the accuracy on the selection half, by hand from the logged records."""
    problems = sorted(_per_problem(store["samples"][(run_ids[0], bench)]))
    keep = [i for i, p in enumerate(problems) if stats.in_selection_half(p)]
    return float(_seed_problem_matrix(store, run_ids, bench)[:, keep].mean())


def _by_hand(store, run_ids_a, run_ids_b, bench, *, paired: bool, test_half: bool):
    """A comparison recomputed from the logged records: problems paired (the test half only if asked), seeds
    paired by index or not; one seed on a side: the problems-only interval of the first seeds."""
    problems = sorted(_per_problem(store["samples"][(run_ids_a[0], bench)]))
    keep = [i for i, p in enumerate(problems) if not test_half or not stats.in_selection_half(p)]
    a = _seed_problem_matrix(store, run_ids_a, bench)[:, keep]
    b = _seed_problem_matrix(store, run_ids_b, bench)[:, keep]
    if min(len(a), len(b)) < 2:
        return stats.two_stage_interval(a[:1] - b[:1])
    if paired:
        m = min(len(a), len(b))
        return stats.two_stage_interval(a[:m] - b[:m])
    return stats.unpaired_two_stage_interval(a, b)


def _metrics(store, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store["uri"]).get_run(run_id).data.metrics


def test_every_section_renders(report):
    html = report["html"]
    for title in ("Verdict", "Overview", "(a) Gate shapes", "(b) Training curves", "(c) Accuracy by gate",
                  "(d) Each gate against the sigmoid baseline", "(e) τ sensitivity",
                  "(h) Stability scorecard", "(i) Power", "(k) Provenance"):
        assert f"<h2>{title}" in html, title
        assert f"## {title}" in report["md"], title
    assert "This section failed" not in html
    # the verdict comes first, right under the title
    assert html.index("<h2>Verdict") < html.index("<h2>Overview")
    for name in ("fig_gate_shapes.png", "fig_training.png", "fig_paired.png", "fig_tau.png", "fig_scorecard.png"):
        assert (report["out"] / name).stat().st_size > 10_000, name
        assert f"]({name})" in report["md"]
    # a section with nothing to show (no Optuna study here) is one line at the end, not a boxed section
    assert "<h2>(f) Optuna" not in html and "Optuna temperature tuning: no Optuna study" in html
    assert "<h2>(j) Adaptive" not in html and "best fixed τ: no configuration with a moving τ" in html
    assert html.index("<h2>Not shown: nothing to report") > html.index("<h2>(k) Provenance")
    assert "NaN loss at step 3" in html  # the FAILED cell is listed with its reason
    assert "KILLED" in html


def test_html_is_self_contained(report):
    html = report["html"]
    srcs = re.findall(r"src='([^']*)'", html) + re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html and "http://" not in html and "https://" not in html
    assert "<style>" in html


def test_accuracy_numbers_equal_mlflow(store, report):
    records = report["json"]["accuracy"]
    assert len(records) == (1 + 5) * 2  # the base model and 5 configurations x 2 benchmarks
    assert [r["group"] for r in records[:2]] == ["base model (no RL)"] * 2  # the base model comes first
    assert all(not r["chosen"] for r in records[:2])  # and is never the chosen configuration
    for r in records:
        metrics = [_metrics(store, rid) for rid in r["run_ids"]]
        accs = [m[f"eval/{r['benchmark']}/strict_acc"] for m in metrics]
        assert r["lenient_acc"] == pytest.approx(np.mean([m[f"eval/{r['benchmark']}/acc"] for m in metrics]))
        if r["n_seeds"] == 1:  # exactly the logged values, CI included
            m = metrics[0]
            assert r["acc"] == m[f"eval/{r['benchmark']}/strict_acc"]
            assert r["ci_low"] == m[f"eval/{r['benchmark']}/strict_acc_ci_low"]
            assert r["ci_high"] == m[f"eval/{r['benchmark']}/strict_acc_ci_high"]
        else:  # the two-stage interval of the seeds x problems matrix of the logged per-sample records
            assert r["acc"] == pytest.approx(np.mean(accs), abs=1e-12)
            assert r["ci_kind"] == "two-stage (seeds, then problems)"
            matrix = _seed_problem_matrix(store, r["run_ids"], r["benchmark"])
            ts = stats.two_stage_interval(matrix)
            assert ts["mean"] == pytest.approx(r["acc"], abs=1e-12)
            assert (r["ci_low"], r["ci_high"]) == (max(0.0, ts["ci_low"]), min(1.0, ts["ci_high"]))
            if len(accs) >= 4:
                assert r["iqm"] == pytest.approx(stats.interquartile_mean(accs))
        # what the page shows is the MLflow number, rounded for display
        assert f"{r['acc']:.3f}" in report["html"] and f"{r['acc']:.3f}" in report["md"]
        assert f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" in report["html"]
    # the newest run of a config hash wins over an older FINISHED one
    clip = [r for r in records if r["gate"] == "clip"]
    assert all(store["stale"] not in r["run_ids"] for r in clip)
    assert clip[0]["run_ids"] == [store["runs"][("clip", None, 0)]]
    # the configuration chosen per benchmark has the highest accuracy on the selection half, by hand
    for bench in BENCHES:
        rows = [r for r in records if r["benchmark"] == bench and r["gate"] != "base"]
        assert [r["chosen"] for r in rows].count(True) == 1
        assert max(rows, key=lambda r: _selection_accuracy(store, r["run_ids"], bench))["chosen"]


def test_paired_rows_recomputed_from_the_logged_samples(store, report):
    rows = report["json"]["paired"]
    pairing = {v["benchmark"]: v["pairing"]["paired"] for v in report["json"]["verdict"]}
    # erf at τ=1 is paired with sigmoid at the same τ (all problems); clip with the sigmoid cell that is best on the
    # selection half, compared on the test half
    erf1 = next(r for r in rows if r["cell"].startswith("erf τ=1/") and r["benchmark"] == "arith")
    assert erf1["why"] == "same τ" and erf1["sigmoid_cell"].startswith("sigmoid τ=1/") and not erf1["test_half"]
    clip = next(r for r in rows if r["gate"] == "clip" and r["benchmark"] == "arith")
    assert clip["why"].startswith("clip has no τ") and clip["test_half"]
    by_label = {(r["group"], r["benchmark"]): r["run_ids"] for r in report["json"]["accuracy"]}
    sig = [g for g, b in by_label if g.startswith("sigmoid") and b == "arith"]
    assert clip["sigmoid_cell"] == max(sig, key=lambda g: _selection_accuracy(store, by_label[(g, "arith")], "arith"))
    for r in (erf1, clip):
        ts = _by_hand(store, r["run_ids"], r["sigmoid_run_ids"], "arith", paired=pairing["arith"],
                      test_half=r["test_half"])
        assert r["diff"] == pytest.approx(ts["mean"], abs=1e-12)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ts["ci_low"], ts["ci_high"]), abs=1e-12)
        assert f"{r['diff']:+.3f}" in report["html"]
    assert clip["n"] < BENCHES["arith"][0] == erf1["n"]  # the test half of 60 problems
    assert clip["kind"] == "problems only (one seed)" and erf1["ranked"]
    # erf τ=1 (true 0.70) vs sigmoid τ=1 (true 0.45), 4 seeds x 60 problems x 4 samples: the difference survives
    assert erf1["ci_low"] > 0 and erf1["verdict"] == "yes: better"


def test_verdict_orders_pairs_of_gates_and_says_what_it_cannot(report):
    verdict = {v["benchmark"]: v for v in report["json"]["verdict"]}
    assert set(verdict) == set(BENCHES)
    family = [r for r in report["json"]["comparisons"] if "p_holm" in r]
    # erf and sigmoid have several configurations: each gate's is chosen on the selection half, tested on the rest
    for bench, v in verdict.items():
        assert v["selected"] and v["n_selection"] + v["n_test"] == BENCHES[bench][0]
        assert set(v["chosen"]) == {"sigmoid", "erf", "clip"}
    # only pairs where both sides have >= 2 seeds are ranked (clip ran one seed): erf vs sigmoid per benchmark
    assert {(r["benchmark"], frozenset((r["gate_a"], r["gate_b"]))) for r in family} == {
        (b, frozenset(("erf", "sigmoid"))) for b in BENCHES}
    assert [r["p_holm"] for r in family] == pytest.approx(stats.holm([r["p_value"] for r in family]))
    assert all(r["family_size"] == len(family) for r in family)
    arith = next(r for r in family if r["benchmark"] == "arith")
    assert arith["gate_a"] == "erf" and arith["survives"]  # true 0.70 against 0.45
    assert ["erf", "sigmoid"] in verdict["arith"]["ahead"]
    unranked = [r for r in report["json"]["comparisons"] if not r["ranked"]]
    assert unranked and all("clip" in (r["gate_a"], r["gate_b"]) for r in unranked)
    text = report["html"][report["html"].index("<h2>Verdict"):report["html"].index("<h2>Overview")]
    assert "erf ahead of sigmoid" in text and "One Holm family of 2 comparisons" in text
    assert "test half only" in text and "Not ranked, one side has a single seed" in text


def test_report_is_logged_to_the_parent_run(store, report):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(store["uri"])
    parent = mlflow.search_runs(experiment_names=["gates"], filter_string="tags.sweep = 'gates'",
                                output_format="list")[0]
    names = {f.path for f in MlflowClient(tracking_uri=store["uri"]).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/report.json", "report/fig_training.png"} <= names


def test_missing_pieces_degrade_to_notes(store, tmp_path):
    path = reporting.write_report("bare", tracking_uri=store["uri"], out_dir=tmp_path)
    html = path.read_text()
    assert "This section failed" not in html
    assert "No evaluation metrics" in html  # (c)
    assert "One seed per configuration" in html  # (b)
    assert "no Optuna study" in html  # (f)
    assert "final training reward" in html  # (e) falls back to the proxy
    # a run's warning (from its cell summary, e.g. no learning signal) is listed in the overview
    assert "Warnings: what these runs" in html and "no learning signal in 3 of 3 steps" in html
    # no parent run: the report goes to a new run named "report", which later reports ignore
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    runs = mlflow.search_runs(experiment_names=["bare"], output_format="list")
    report_runs = [r for r in runs if r.info.run_name == "report"]
    assert len(report_runs) == 1
    again = reporting.write_report("bare", tracking_uri=store["uri"], out_dir=tmp_path / "2")
    assert "2 cell runs" in again.read_text()  # the report run is not counted as a run of the experiment


def test_optuna_section(store, tmp_path):
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="opt-sigmoid", storage=storage, direction="maximize")
    study.set_user_attr("objective", "eval/mean_accuracy")
    study.set_user_attr("gate", "sigmoid")
    for i, tau in enumerate((0.5, 1.0, 2.0, 4.0, 3.0)):
        study.enqueue_trial({"tau_pos": tau})
        t = study.ask({"tau_pos": optuna.distributions.FloatDistribution(0.25, 8, log=True)})
        t.set_user_attr("tau_pos", t.params["tau_pos"])
        t.set_user_attr("tau_neg", t.params["tau_pos"] * 1.05)
        for step in range(1, 6):
            t.report(0.5 + 0.1 * step * (1 if i != 4 else -1), step)
        if i == 4:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, 0.3 + 0.05 * i)
    exp = tracking.open_store(_cfg("sigmoid", 1.0, 0, store["uri"], "tuned", tmp_path).tracking)
    parent = tracking.start_parent(exp, name="tune-x", tags={"sweep": "tune", "optuna_storage": storage})
    with _open(_cfg("sigmoid", 1.0, 0, store["uri"], "tuned", tmp_path / "o"), exp, parent, "trial0",
               extra_tags={"study": "opt-sigmoid", "trial": "0"}) as run:
        run.log_step(1, _train_metrics(1, "sigmoid", np.random.default_rng(0)))
    tracking.end_parent(exp, parent, {"cells": 1, "finished": 1})
    path = reporting.write_report("tuned", tracking_uri=store["uri"], out_dir=tmp_path / "r")
    html = path.read_text()
    data = json.loads((tmp_path / "r" / "report.json").read_text())["optuna"]["opt-sigmoid"]
    best = study.best_trial
    assert data["best_trial"] == best.number and data["best_value"] == best.value
    assert data["best_tau_pos"] == best.params["tau_pos"] == 4.0
    assert data["states"] == {"COMPLETE": 4, "PRUNED": 1}
    assert "importances" in data and "1 by construction" in html
    assert (tmp_path / "r" / "fig_optuna_opt-sigmoid.png").stat().st_size > 10_000
    assert f"{best.value:.4f}" in html


def test_cli(store, tmp_path, capsys):
    assert reporting.main(["gates", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-log"]) == 0
    assert (tmp_path / "report.html").exists() and "wrote" in capsys.readouterr().out
    assert reporting.main(["nope", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_against_the_paper_section_and_latex_table(store, tmp_path):
    """A paper-sweep experiment (parent tag sweep=paper): the report lays our numbers beside Table 1 row by row
    and writes table.tex (booktabs, best per column bold)."""
    uri = store["uri"]
    exp = tracking.open_store(_cfg("sigmoid", 1.0, 0, uri, "paperlike", tmp_path).tracking)
    parent = tracking.start_parent(exp, name="sweep-paper", tags={"sweep": "paper"})
    rng = np.random.default_rng(5)
    sizes = {"gsm8k": (50, 1), "math500": (40, 2), "aime24": (30, 2), "aime25": (30, 2)}
    truth = {"base": 0.3, "clip": 0.35, "sigmoid": 0.4, "erf": 0.45, "arctan": 0.38, "softsign": 0.42}
    for gate, p in truth.items():
        tau = None if gate in ("base", "clip") else 10.0
        extra = ["role=baseline"] if gate == "base" else []
        cfg = _cfg("sigmoid" if gate == "base" else gate, tau, 0, uri, "paperlike", tmp_path / gate, extra=extra)
        if tau is not None:
            cfg.gate.tau_neg = 12.0
        with _open(cfg, exp, parent, gate) as run:
            ev = {"benchmarks": {}}
            recs = {}
            for bench, (n, k) in sizes.items():
                recs[bench] = [{"problem_id": f"{bench}-{i}", "correct": bool(rng.random() < p), "strict_correct": True,
                                "format_ok": True, "num_tokens": 5, "finish_reason": "stop", "fallback": "answer"}
                               for i in range(n) for _ in range(k)]
                ev["benchmarks"][bench] = benchmark_metrics(recs[bench], k, n_boot=100)
            ev["benchmarks"]["aime"] = benchmark_metrics(recs["aime24"] + recs["aime25"], 2, n_boot=100)
            run.log_eval(ev)
    tracking.end_parent(exp, parent, {"cells": 6, "finished": 6})
    out = tmp_path / "r"
    html = reporting.write_report("paperlike", tracking_uri=uri, out_dir=out, log_to_mlflow=False).read_text()
    assert "(g) Against the paper" in html and "not the paper" in html  # the tiny model, not Qwen2.5-7B
    rows = json.loads((out / "report.json").read_text())["against_the_paper"]
    ref = reporting.sections.against_the_paper.paper_reference()
    assert [r["paper_row"] for r in rows] == [r["label"] for r in ref["rows"]]
    erf = next(r for r in rows if r["paper_row"] == "+ erf")
    assert erf["ours"] == "erf τ=10/12" and erf["gsm8k"]["paper"] == 82.7 and 0 <= erf["gsm8k"]["ours"] <= 1
    assert rows[0]["ours"] == "base model (no RL)" and rows[0]["aime"]["paper"] == 3.3
    tex = (out / "table.tex").read_text()
    assert tex.startswith("\\begin{tabular}{lccccc}") and "\\toprule" in tex and "\\bottomrule" in tex
    assert tex.splitlines()[2].startswith("configuration & gsm8k & math500 & aime24 & aime25 & aime")
    assert tex.splitlines()[4].startswith("base model (no RL) &") and "\\textbf{" in tex
    bold_rows = [line for line in tex.splitlines() if "\\textbf{" in line]
    assert not any(line.startswith("base model") for line in bold_rows)  # the best is a trained configuration


def test_adaptive_configurations_against_the_best_fixed_tau(store, tmp_path):
    """An EUR-controller group: its τ per step is drawn next to EUR, it is a line (not a point) in the τ-sensitivity
    figure, and section (j) gives its τ trajectory and a paired comparison with the best fixed τ of its gate."""
    out = reporting.write_report("adaptive", tracking_uri=store["uri"], out_dir=tmp_path)
    html, rep = out.read_text(), json.loads((tmp_path / "report.json").read_text())
    assert "sigmoid EUR→0.9" in html and "τ_pos: the temperature each step ran at" in html  # the τ panel's caption
    assert all(r["tau_pos"] in (1.0, 4.0) for r in rep["tau_sensitivity"])  # only the fixed-τ groups are points
    trajectories = rep["adaptive"]["trajectories"]
    assert [t["group"] for t in trajectories] == ["sigmoid EUR→0.9"]
    t = trajectories[0]
    assert t["eur_target"] == 0.9 and t["tau_first"]["mean"] == pytest.approx(4.0 * 1.01)
    assert t["tau_last"]["mean"] == pytest.approx(2.0 * 1.01) and t["tau_last_range"] == pytest.approx((2.0, 2.04))
    comparisons = rep["adaptive"]["comparisons"]
    assert {c["benchmark"] for c in comparisons} == set(BENCHES)
    acc = {(r["group"], r["benchmark"]): r for r in rep["accuracy"]}
    pairing = {v["benchmark"]: v["pairing"]["paired"] for v in rep["verdict"]}
    for c in comparisons:
        fixed = [g for g, b in acc if b == c["benchmark"] and g.startswith("sigmoid τ=")]
        assert c["best_fixed"] == max(fixed, key=lambda g: _selection_accuracy(store, acc[(g, c["benchmark"])]
                                                                             ["run_ids"], c["benchmark"]))
        ts = _by_hand(store, c["run_ids_a"], c["run_ids_b"], c["benchmark"], paired=pairing[c["benchmark"]],
                      test_half=True)
        assert (c["diff"], c["ci_low"], c["ci_high"]) == pytest.approx((ts["mean"], ts["ci_low"], ts["ci_high"]))
        assert c["test_half"] and "p_holm" in c and c["outcome"] in html


def test_power_cli_prints_only_the_power_lines(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert reporting.main(["gates", "--tracking-uri", store["uri"], "--power"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("power of the verdict's comparisons in 'gates'")
    rows = [line for line in lines[1:] if line.startswith("  ")]
    assert rows and all("detectable" in r and "seeds for 0.02" in r for r in rows)
    assert lines[-1].startswith("With these seeds and problems, differences smaller than")
    assert not list(tmp_path.iterdir())  # no report files written
    assert reporting.main(["nope", "--tracking-uri", store["uri"], "--power"]) == 2


def test_power_numbers_are_the_stats_module_on_the_logged_samples(store, report):
    """Each power row is the stats module's simulation-based power of the verdict's own comparison."""
    rows = report["json"]["power"]
    family = [r for r in report["json"]["comparisons"] if "p_holm" in r]
    assert len(rows) == len(family)
    for row, comp in zip(rows, family, strict=True):
        assert (row["benchmark"], row["gate_a"], row["gate_b"]) == (comp["benchmark"], comp["gate_a"], comp["gate_b"])
        fitted = stats.fitted_components(comp["design"], comp["components"])
        assert row["mde"] == pytest.approx(stats.minimum_detectable_effect(comp["design"], fitted))
        assert row["power_at_effect"] == pytest.approx(stats.two_stage_power(
            comp["design"], stats.expected_components(comp["design"], **fitted), 0.02))
        need = stats.seeds_needed_range(comp["design"], comp["components"], 0.02)
        assert (row["seeds_needed"], row["seeds_needed_low"], row["seeds_needed_high"]) == (
            need["point"], need["low"], need["high"])
        assert row["mde"] > 0 and row["se"] > 0


def test_provenance_section_states_what_a_rerun_needs(report):
    import torch

    prov = report["json"]["provenance"]
    assert prov["versions"]["torch"] == [torch.__version__]
    for name in ("transformers", "mlflow", "optuna", "math-verify"):
        assert prov["versions"].get(name), name
    assert prov["git_commit"] and all(len(c) == 40 or c == "unknown" for c in prov["git_commit"])
    assert prov["git_dirty"] and set(prov["git_dirty"]) <= {"true", "false", "unknown"}
    assert prov["host"] and prov["seeds"] == ["0", "1", "2", "3"]
    assert prov["evaluation temperature"] and prov["aggregation"] == ["seq-mean-token-mean"]
    assert prov["τ scaling (gate.width)"] == ["raw"]
    html = report["html"]
    assert "<h2>(k) Provenance" in html and "version: torch" in html and "git commit" in html


def test_a_failing_section_becomes_a_note_and_one_that_does_not_apply_is_left_out(store, tmp_path, monkeypatch):
    """build_sections walks SECTIONS in page order: a section that raises is a note titled by its function (the
    others and their report.json numbers are still there), a section that returns None is not shown."""
    from harness.reporting.data import load_experiment
    from harness.reporting.render import Section

    def broken_section(data):
        raise RuntimeError("no such column")

    def not_here(data):
        return None

    def numbers(data):
        sec = Section("numbers", paragraphs=["1 and 2"])
        sec.record["numbers"] = [1, 2]
        return sec

    monkeypatch.setattr(reporting, "SECTIONS", (broken_section, not_here, numbers))
    record: dict = {}
    sections = reporting.build_sections(load_experiment("bare", store["uri"], tmp_path), record)
    assert [s.title for s in sections] == ["broken section", "numbers"]
    assert sections[0].notes == ["This section failed: RuntimeError: no such column"]
    assert record == {"numbers": [1, 2]}


def test_the_verdict_and_power_sections_read_one_set_of_comparisons(store, tmp_path):
    """The verdict's comparisons are computed once, on the experiment data, and both sections read those rows."""
    from harness.reporting.data import load_experiment
    from harness.reporting.sections import power, verdict

    data = load_experiment("gates", store["uri"], tmp_path)
    family = data.verdict_comparisons
    assert family and data.verdict_comparisons is family and data.verdict is data.verdict
    assert verdict.verdict(data).record["comparisons"] is family
    rows = power.power_section(data).record["power"]
    assert [(r["benchmark"], r["gate_a"], r["gate_b"]) for r in rows] == [
        (r["benchmark"], r["gate_a"], r["gate_b"]) for r in data.verdict["family"]]


def test_stability_under_staleness_section(tmp_path):
    """Section (l) on a sweep over train.staleness: one row per configuration and lag, numbers equal to what MLflow
    holds, and each configuration's frontier in one sentence (clip collapses in 2 of 3 seeds at lag 4)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(3)
    exp = tracking.open_store(_cfg("sigmoid", 10.0, 0, uri, "stale", tmp_path).tracking)
    parent = tracking.start_parent(exp, name="sweep-stale", tags={"sweep": "offpolicy"})
    steps, logged = 30, {}
    for gate, tau in (("sigmoid", 10.0), ("clip", None)):
        for lag in (0, 2, 4):
            for seed in (0, 1, 2):
                cfg = _cfg(gate, tau, seed, uri, "stale", tmp_path / f"{gate}-{lag}-{seed}",
                           extra=[f"train.staleness={lag}"])
                collapses = gate == "clip" and lag == 4 and seed < 2
                with _open(cfg, exp, parent, f"{gate}-lag{lag}-s{seed}") as run:
                    devs = []
                    for step in range(1, steps + 1):
                        m = _train_metrics(step, gate, rng)
                        m["reward"] = 1.2 + 0.02 * rng.standard_normal() - (0.9 if collapses and step > 18 else 0)
                        m["it1/abs_ratio_dev"] = 0.01 + 0.02 * lag + 0.001 * rng.random()
                        m["policy_lag"] = float(min(step - 1, lag))
                        devs.append(m["it1/abs_ratio_dev"])
                        run.log_step(step, m)
                    recs = _records("arith", 0.5, rng)
                    write_jsonl(tmp_path / f"{gate}-{lag}-{seed}" / "eval" / "samples" / "arith.jsonl", recs)
                    ev = {"benchmarks": {"arith": benchmark_metrics(recs, BENCHES["arith"][1], n_boot=100)},
                          "out_dir": str(tmp_path / f"{gate}-{lag}-{seed}" / "eval")}
                    summary = {"train": {}, "eval": ev}
                    run.log_cell(summary, tmp_path / f"{gate}-{lag}-{seed}")
                    run.set_tags(summary_tags(summary))
                    logged[(gate, lag, seed)] = float(np.mean(devs))
    tracking.end_parent(exp, parent, {"cells": 18, "finished": 18})
    out = tmp_path / "r"
    html = reporting.write_report("stale", tracking_uri=uri, out_dir=out, log_to_mlflow=False).read_text()
    full = json.loads((out / "report.json").read_text())
    rep = full["staleness"]
    # the verdict compares the gates within each lag, never one gate's lag-0 cells with another's lag-4 cells
    assert [v["benchmark"] for v in full["verdict"]] == [f"arith at staleness {k}" for k in (0, 2, 4)]
    assert "<b>arith at staleness 4</b>: no difference between gates" in html
    assert "<h2>(l) Stability under staleness" in html and (out / "fig_staleness.png").exists()
    levels = {(lv["gate"], lv["staleness"]): lv for lv in rep["levels"]}
    assert set(levels) == {(g, k) for g in ("sigmoid", "clip") for k in (0, 2, 4)}
    for (gate, lag), lv in levels.items():
        assert lv["first_pass_abs_ratio_dev"]["mean"] == pytest.approx(np.mean([logged[(gate, lag, s)]
                                                                               for s in range(3)]))
        assert lv["policy_lag_mean"] == pytest.approx(np.mean([min(s, lag) for s in range(steps)]))
        assert lv["seeds_collapsed"] == (2 if (gate, lag) == ("clip", 4) else 0)
        assert lv["accuracy"]["arith"]["n_seeds"] == 3
        assert lv["configuration"] in ("sigmoid τ=10/10.5", "clip ε=0.2/0.2")
    frontiers = {f["gate"]: f for f in rep["frontiers"]}
    assert frontiers["sigmoid"]["stable_up_to"] == 4 and frontiers["sigmoid"]["first_collapse"] is None
    assert frontiers["clip"]["stable_up_to"] == 2 and frontiers["clip"]["first_collapse"]["seeds_collapsed"] == 2
    assert frontiers["clip"]["collapse_probability_bound"] == pytest.approx(1 - 0.05 ** (1 / 3))
    assert "sigmoid τ=10/10.5: no collapse in any seed up to staleness 4, the largest tried" in html
    assert "clip ε=0.2/0.2: no collapse in any seed up to staleness 2; at staleness 4 2 of 3 seeds collapsed" in html


def test_verdict_lists_the_largest_undecided_gaps_and_sums_up_the_rest():
    """A many-method sweep has 45 pairs per benchmark: the verdict writes the MAX_LISTED largest gaps, largest first,
    and counts the rest with their largest |gap| (every pair stays in report.json)."""
    from harness.reporting.sections.verdict import MAX_LISTED, bench_text

    rows = [{"gate_a": f"g{i}", "gate_b": "base", "diff": d, "ci_low": d - 0.05, "ci_high": d + 0.05, "p_holm": 1.0,
             "survives": False, "ranked": True} for i, d in enumerate([0.001 * k for k in range(15)] + [-0.2])]
    info = {"rows": rows, "chosen": ["a", "b"], "n_test": 100, "one_seed": False, "leader": None,
            "pairing": {"paired": False, "reason": "no shared seed effect"}}
    text = bench_text("arith", info)
    assert text.index("g15 and base (-0.200") < text.index("g14 and base (+0.014")
    assert text.count(" and base (") == MAX_LISTED
    assert f"nor the other {len(rows) - MAX_LISTED} pairs, each within ±0.005" in text
    info["rows"] = rows[:3]
    assert "nor the other" not in bench_text("arith", info) and bench_text("arith", info).count(" and base (") == 3
