"""The metric contract (harness.keys) and the package layout.

The end-to-end check: two real 2-step native cells (a smooth gate and clip) are trained, evaluated and logged
through ``harness.cell.run_tracked``; then the report is built from MLflow, and every metric the report read must
exist in those runs. A renamed producer or consumer key fails here instead of leaving a silent hole in the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO, compose

from harness import keys as K
from harness import tracking
from harness.cell import run_tracked

# A cell that trains 2 steps and evaluates 8 problems x 2 samples: seconds on a CPU.
TINY = ["train.steps=2", "train.rollout_batch_size=16", "train.micro_batch_size=16", "train.save_every=1",
        "eval.bench.arith.limit=8", "eval.bench.arith.k=2", "backend.progress=false", "backend.threads=1"]


def test_key_builders_round_trip():
    assert K.train_key(K.REWARD) == "train/reward"
    assert K.train_key(K.GATE_WEIGHT, 2) == "train/it2/gate_weight"
    assert K.parse_pass_key(K.pass_key(3, K.FRAC_W_LT_HALF)) == (3, "frac_w_lt_0.5")
    assert K.parse_pass_key("reward") is None
    assert K.eval_key("gsm8k", K.ACC) == "eval/gsm8k/acc"
    assert K.parse_eval_key(K.eval_key("aime24", K.ACC_CI_LOW)) == ("aime24", "acc_ci_low")
    assert K.parse_eval_key(K.mean_accuracy_key()) is None
    assert K.samples_artifact("math500") == "eval/samples/math500.jsonl"
    with pytest.raises(ValueError):
        K.pass_key(0, K.GATE_WEIGHT)


@pytest.mark.slow
def test_every_key_the_report_reads_is_produced_by_a_real_cell(tmp_path, cache_dir):
    from harness.reporting import build_sections
    from harness.reporting.data import load_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_ids = []
    for gate in ("erf", "clip"):
        cfg = compose([f"gate={gate}", *TINY, f"cache_dir={cache_dir}", f"tracking.uri={uri}",
                       "tracking.experiment=keys", f"output_dir={tmp_path / gate}"])
        run_id, _ = run_tracked(cfg, tracking.open_store(cfg.tracking))
        run_ids.append(run_id)

    data = load_experiment("keys", uri, tmp_path / "work")
    record: dict = {}
    sections = build_sections(data, record)
    assert not [n for s in sections for n in s.notes if "This section failed" in n]

    logged = set()
    for run_id in run_ids:
        logged |= set(data.client.get_run(run_id).data.metrics)
    read = data.keys_read
    # The report read the curves and the accuracy it shows ...
    for key in (K.train_key(K.REWARD), K.train_key(K.ENTROPY), K.train_key(K.EUR, 2),
                K.train_key(K.FRAC_W_LT_HALF, 2), K.train_key(K.CLIP_FRAC, 2), K.eval_key("arith", K.STRICT_ACC),
                K.eval_key("arith", K.ACC), K.eval_key("arith", K.STRICT_ACC_CI_LOW),
                K.eval_key("arith", K.STRICT_ACC_CI_HIGH)):
        assert key in read, key
    # ... and every key it read was produced by the backend, the evaluator or the tracker.
    assert read <= logged, sorted(read - logged)
    # The per-sample artifacts the paired comparison reads are there too.
    artifacts = {f.path for f in data.client.list_artifacts(run_ids[0], "eval/samples")}
    assert K.samples_artifact("arith") in artifacts


def test_layout_has_no_cycle_no_private_import_no_long_module():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_layout
    finally:
        sys.path.pop(0)
    assert check_layout.check(max_lines=check_layout.MAX_LINES) == []
    # and the checker does see cycles (a → b → a) when there are some
    assert check_layout.find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert check_layout.find_cycles({"a": {"b"}, "b": set()}) == []
    assert Path(check_layout.ROOT) == REPO
