"""harness.data: staged-file loaders, the arith generator, mixtures and config errors (no downloads)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from harness import data as D

EXPECTED_ROWS = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("math500", "test"): 500,
    ("aime24", "test"): 30,
    ("aime25", "test"): 30,
}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_ROWS))
def test_staged_loaders_row_counts_and_schema(data_dir: Path, task: str, split: str) -> None:
    records = D.load_task(task, split, data_dir=data_dir)
    assert len(records) == EXPECTED_ROWS[task, split]
    for r in records:
        assert set(r) == {"id", "problem", "answer"}
        assert all(isinstance(v, str) and v for v in r.values())
    assert len({r["id"] for r in records}) == len(records)


def test_env_var_selects_data_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    assert D.resolve_data_dir(None) == data_dir
    assert len(D.load_task("aime25", "test")) == 30
    monkeypatch.delenv("HARNESS_DATA_DIR")
    assert D.resolve_data_dir(None) is None  # -> hub


def test_answers_normalised(data_dir: Path) -> None:
    gsm = D.load_task("gsm8k", "test", data_dir=data_dir)
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in gsm)  # "#### 40,000" -> "40000"
    assert gsm[0] == {"id": "gsm8k-test-00000", "problem": gsm[0]["problem"], "answer": "18"}
    aime = D.load_task("aime24", "test", data_dir=data_dir)
    assert aime[0]["id"] == "2024-I-1" and all(not a["answer"].startswith("0") for a in aime)
    m500 = D.load_task("math500", "test", data_dir=data_dir, limit=3)
    assert len(m500) == 3 and m500[0]["id"] == "test/precalculus/807.json"


def test_hub_schema_rows_normalise_like_staged_ones(tmp_path: Path) -> None:
    # A JSONL dump of the hub splits (question / "#### N" answers, question / final_answer) loads the same way.
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "Q?", "answer": "2 + 2\n#### 1,004"}) + "\n")
    (tmp_path / "deepmath").mkdir()
    (tmp_path / "deepmath" / "train.jsonl").write_text(json.dumps({"question": "x?", "final_answer": " \\frac12 "}))
    assert D.load_task("gsm8k", "test", data_dir=tmp_path) == [
        {"id": "gsm8k-test-00000", "problem": "Q?", "answer": "1004"}
    ]
    assert D.load_task("deepmath", "train", data_dir=tmp_path)[0]["answer"] == "\\frac12"


def test_arith_deterministic_prefix_stable_and_short() -> None:
    a = D.load_task("arith", "train", limit=300, seed=3)
    assert a == D.load_task({"name": "arith", "n_train": 300}, "train", seed=3)
    assert a[:50] == D.load_task("arith", "train", limit=50, seed=3)
    assert a != D.load_task("arith", "train", limit=300, seed=4)
    for r in a:
        assert 40 <= len(r["problem"]) <= 80
        assert re.fullmatch(r"\d+", r["answer"])
        # the worked computation really computes the answer
        steps = r["think"].split()
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # digits and + - * only
        assert steps[-1].split("=")[1] == r["answer"]


def test_arith_train_test_disjoint() -> None:
    train = D.load_task("arith", "train", seed=0)
    test = D.load_task("arith", "test", seed=0)
    assert len(train) == D.ARITH_DEFAULTS["n_train"] and len(test) == D.ARITH_DEFAULTS["n_test"]
    assert len({r["problem"] for r in train}) == len(train) and len({r["problem"] for r in test}) == len(test)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    # the split is a function of the text alone, so other seeds' test problems never appear in this train split
    other_test = D.load_task("arith", "test", seed=7)
    assert not {r["problem"] for r in train} & {r["problem"] for r in other_test}
    assert all(D._arith_split(r["problem"]) == "test" for r in other_test)
    # the test split still covers every level and template family
    assert {len(r["think"].split()) for r in test} == {1, 2} and any("*" in r["think"] for r in test)


def test_arith_levels() -> None:
    only2 = D.load_task({"name": "arith", "levels": [2], "n_test": 40}, "test")
    assert all(re.fullmatch(r"\d+\*\d+=\d+", r["think"]) for r in only2)
    mixed = D.load_task({"name": "arith", "levels": [1, 3]}, "test", limit=40)
    assert [len(r["think"].split()) for r in mixed[:4]] == [1, 2, 1, 2]  # round-robin levels
    with pytest.raises(ValueError, match="levels"):
        D.load_task({"name": "arith", "levels": [4]}, "train")


def test_pinned_seed_in_spec_wins() -> None:
    spec = {"name": "arith", "seed": 5, "n_test": 20}
    assert D.load_task(spec, "test", seed=0) == D.load_task(spec, "test", seed=99)


def test_mixture_weights_and_determinism(data_dir: Path) -> None:
    spec = {
        "name": "mixture",
        "size": 400,
        "components": [{"name": "gsm8k", "weight": 3}, {"name": "arith", "weight": 1}],
    }
    mix = D.load_task(spec, "train", data_dir=data_dir, seed=1)
    assert len(mix) == 400
    sources = Counter(r["id"].split("-")[0] for r in mix)
    assert sources == {"gsm8k": 300, "arith": 100}
    assert mix == D.load_task(spec, "train", data_dir=data_dir, seed=1)
    assert mix != D.load_task(spec, "train", data_dir=data_dir, seed=2)
    assert len({r["id"] for r in mix}) == 400
    # interleaved, not concatenated
    assert sources != Counter(r["id"].split("-")[0] for r in mix[:300])


def test_mixture_default_size_and_repeats(data_dir: Path) -> None:
    comps = [{"name": "aime24", "weight": 0.5}, {"name": "aime25", "weight": 0.5}]
    mix = D.load_task({"name": "mixture", "components": comps}, "test", data_dir=data_dir)
    assert len(mix) == 60  # largest size without repeats
    big = D.load_task({"name": "mixture", "components": comps, "size": 100}, "test", data_dir=data_dir)
    assert len(big) == 100 and len({r["id"] for r in big}) == 100  # repeats get "#r1" ids


def test_paper_mixture_config_validates_before_loading(tmp_path: Path) -> None:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf/task/gsm8k_deepmath.yaml").read_text())
    assert spec["name"] == "mixture" and [c["weight"] for c in spec["components"]] == [0.5, 0.5]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"deepmath[/\\]train\.jsonl"):  # names the missing file, loads nothing
        D.load_task(spec, "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):  # DeepMath has no test split
        D.load_task(spec, "test", data_dir=tmp_path)


def test_clear_errors(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*arith, gsm8k, deepmath, math500, aime24"):
        D.load_task("gsm9k", "test")
    with pytest.raises(ValueError, match=r"no split 'validation'.*train, test"):
        D.load_task("gsm8k", "validation", data_dir=data_dir)
    with pytest.raises(ValueError, match="no split 'train'"):
        D.load_task("math500", "train", data_dir=data_dir)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist"):
        D.load_task("gsm8k", "test", data_dir=missing)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "aime24" / "test.jsonl"))):
        D.load_task("aime24", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        D.load_task({"name": "arith", "n_trian": 5}, "train")
    with pytest.raises(ValueError, match="needs a 'name'"):
        D.load_task({"levels": [1]}, "train")


def test_missing_env_data_dir_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="HARNESS_DATA_DIR"):
        D.load_task("gsm8k", "test")


def test_hydra_node_spec(data_dir: Path) -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/task/arith.yaml")
    recs = D.load_task(node, "test", limit=5)
    assert recs == D.load_task("arith", "test", limit=5, seed=0)
    assert D.load_task(OmegaConf.create({"name": "aime25"}), "test", data_dir=data_dir, limit=2)[1]["id"] == "2025-I-2"
