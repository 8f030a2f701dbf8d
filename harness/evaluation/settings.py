"""The ``eval`` node, resolved and checked: which benchmarks with which k, max new tokens, limit and template, which
engine with which options. Everything here is cheap (no model, no data), so ``harness run`` checks it before
training."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.config import REPO_ROOT, to_plain
from harness.data import resolve_data_dir
from harness.prompts import PromptConfig
from harness.schema import EvalConfig
from harness.scoring import FALLBACKS

DEFAULT_VLLM_VENV = REPO_ROOT / ".venv-vllm"

BENCHMARKS: tuple[str, ...] = ("arith", "gsm8k", "math500", "aime24", "aime25")
ENGINES: tuple[str, ...] = ("hf", "vllm", "lm_eval")
FINISH_REASONS: tuple[str, ...] = ("stop", "length")
# Reported next to their parts whenever all parts are evaluated (not selectable on their own): AIME 2024 and 2025
# pooled, 60 problems, as the paper's single AIME column.
POOLED_BENCHMARKS: dict[str, tuple[str, ...]] = {"aime": ("aime24", "aime25")}

# The defaults of the ``eval`` node, written once in :class:`harness.schema.EvalConfig` (conf/eval/default.yaml
# extends it): a partial node from the Python API is resolved against these; unknown keys are errors (a typo must
# not silently fall back to a default).
TOP_LEVEL_DEFAULTS: dict[str, Any] = asdict(EvalConfig())
BENCH_DEFAULTS: dict[str, dict[str, Any]] = TOP_LEVEL_DEFAULTS["bench"]
HF_DEFAULTS: dict[str, Any] = TOP_LEVEL_DEFAULTS["hf"]
VLLM_DEFAULTS: dict[str, Any] = TOP_LEVEL_DEFAULTS["vllm"]
LM_EVAL_DEFAULTS: dict[str, Any] = TOP_LEVEL_DEFAULTS["lm_eval"]


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark as it will be run."""

    name: str
    k: int
    max_new_tokens: int
    limit: int | None = None
    template: str | None = None  # None: the model's prompt template


@dataclass(frozen=True)
class EvalSettings:
    """The validated ``eval`` node."""

    engine: str
    benchmarks: tuple[BenchSpec, ...]
    temperature: float
    top_p: float
    fallbacks: tuple[str, ...]
    score_timeout_s: float
    score_workers: int | None
    bootstrap: int
    ci: float
    pass_k: tuple[int, ...] | None
    save_samples: bool
    context_len: int | None = None  # None: the model's own max_position_embeddings
    hf: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] = field(default_factory=dict)


def merge_known(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``given`` over ``defaults``; ``ValueError`` naming ``where`` and the unknown keys (a typo must not fall back
    to a default silently)."""
    given = dict(to_plain(given) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(defaults)}")
    return {**defaults, **given}


def _positive_int(value: Any, what: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def resolve_vllm_python(python: str | None) -> str:
    """``eval.vllm.python``, or ``.venv-vllm/bin/python`` when it exists, else this interpreter."""
    if python:
        return str(python)
    venv_python = DEFAULT_VLLM_VENV / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def check_vllm_python(python: str | None) -> str:
    """The Python executable of the vllm engine, checked to exist and to find the ``vllm`` package.

    Uses ``importlib.util.find_spec`` in that interpreter (~50 ms) instead of importing vLLM (~15 s).
    """
    exe = resolve_vllm_python(python)
    if not Path(exe).exists() and shutil.which(exe) is None:
        raise ValueError(f"eval.vllm.python={exe!r} does not exist (run scripts/install_vllm_cpu.sh on CPU)")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    rc = subprocess.run([exe, "-c", probe], capture_output=True, timeout=60).returncode
    if rc != 0:
        raise ValueError(
            f"eval.engine=vllm: {exe} cannot import vllm; install it there (GPU: pip install vllm; "
            "CPU: scripts/install_vllm_cpu.sh creates .venv-vllm) or set eval.vllm.python"
        )
    return exe


def validate_eval_config(eval_cfg: Any, *, data_dir: str | Path | None = None) -> EvalSettings:
    """Resolve and check the ``eval`` node; raises ``ValueError`` naming the bad setting.

    Cheap (no model, no data loading), so ``harness run`` calls it before training.
    """
    cfg = merge_known(TOP_LEVEL_DEFAULTS, eval_cfg, "eval")
    engine = cfg["engine"]
    if engine not in ENGINES:
        raise ValueError(f"eval.engine={engine!r} is unknown; known engines: {', '.join(ENGINES)}")
    names = cfg["benchmarks"]
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError(f"eval.benchmarks is empty; known benchmarks: {', '.join(BENCHMARKS)}")
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown} in eval.benchmarks; known: {', '.join(BENCHMARKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"eval.benchmarks lists a benchmark twice: {list(names)}")
    temperature = float(cfg["temperature"])
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"eval.temperature must be >= 0 (0 = greedy), got {cfg['temperature']!r}")
    top_p = float(cfg["top_p"])
    if not 0 < top_p <= 1:
        raise ValueError(f"eval.top_p must be in (0, 1], got {cfg['top_p']!r}")

    bench_cfg = dict(to_plain(cfg["bench"]) or {})
    stray = sorted(set(bench_cfg) - set(BENCHMARKS))
    if stray:
        raise ValueError(f"eval.bench has unknown benchmark(s) {stray}; known: {', '.join(BENCHMARKS)}")
    specs = []
    for name in names:
        b = merge_known(BENCH_DEFAULTS[name], bench_cfg.get(name), f"eval.bench.{name}")
        # Top-level k / max_new_tokens / limit override every benchmark's own value when set.
        for key in ("k", "max_new_tokens", "limit"):
            if cfg[key] is not None:
                b[key] = cfg[key]
        k = _positive_int(b["k"], f"k of benchmark {name!r} (eval.k / eval.bench.{name}.k)")
        max_new = _positive_int(b["max_new_tokens"], f"eval.bench.{name}.max_new_tokens")
        limit = _positive_int(b["limit"], f"eval.bench.{name}.limit", allow_none=True)
        template = b["template"]
        if template is not None:
            PromptConfig(template=template)  # raises when {problem} is missing
        specs.append(BenchSpec(name, k, max_new, limit, template))  # type: ignore[arg-type]

    scoring = merge_known(TOP_LEVEL_DEFAULTS["scoring"], cfg["scoring"], "eval.scoring")
    fallbacks = tuple(scoring["fallbacks"] or ())
    bad = [f for f in fallbacks if f not in FALLBACKS]
    if bad:
        raise ValueError(f"eval.scoring.fallbacks: unknown rule(s) {bad}; allowed: {', '.join(FALLBACKS)}")
    metrics = merge_known(TOP_LEVEL_DEFAULTS["metrics"], cfg["metrics"], "eval.metrics")
    ci = float(metrics["ci"])
    if not 0 < ci < 1:
        raise ValueError(f"eval.metrics.ci must be in (0, 1), got {ci}")
    pass_k = metrics["pass_k"]
    if pass_k is not None:
        pass_k = tuple(_positive_int(v, "eval.metrics.pass_k entries") for v in pass_k)  # type: ignore[misc]

    hf = merge_known(HF_DEFAULTS, cfg["hf"], "eval.hf")
    vllm = merge_known(VLLM_DEFAULTS, cfg["vllm"], "eval.vllm")
    lm_eval = merge_known(LM_EVAL_DEFAULTS, cfg["lm_eval"], "eval.lm_eval")
    _positive_int(hf["batch_size"], "eval.hf.batch_size")
    for key in ("tensor_parallel_size", "data_parallel_size"):
        _positive_int(vllm[key], f"eval.vllm.{key}")
    if engine == "vllm":
        vllm["python"] = check_vllm_python(vllm["python"])
    if engine == "lm_eval":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("eval.engine=lm_eval needs lm-eval: pip install 'lm-eval==0.4.*'")

    # Local data files: checked here so a missing file fails before training or generation.
    local = resolve_data_dir(data_dir)
    if local is not None:
        for spec in specs:
            path = local / spec.name / "test.jsonl"
            if spec.name != "arith" and not path.is_file():
                raise ValueError(f"benchmark {spec.name!r}: local file {path} not found (data_dir={local})")

    return EvalSettings(
        engine=engine,
        benchmarks=tuple(specs),
        temperature=temperature,
        top_p=top_p,
        fallbacks=fallbacks,
        score_timeout_s=float(scoring["timeout_s"]),
        score_workers=_positive_int(scoring["workers"], "eval.scoring.workers", allow_none=True),
        bootstrap=int(metrics["bootstrap"]),
        ci=ci,
        pass_k=pass_k,  # type: ignore[arg-type]
        save_samples=bool(cfg["save_samples"]),
        context_len=_positive_int(cfg["context_len"], "eval.context_len", allow_none=True),
        hf=hf,
        vllm=vllm,
        lm_eval=lm_eval,
    )


def describe_plan(settings: EvalSettings) -> str:
    """One line saying what will be evaluated: ``gsm8k (first 50 problems, k=1, <= 1024 new tokens), ... at T=0.7
    on hf``."""
    parts = []
    for b in settings.benchmarks:
        size = "all problems" if b.limit is None else f"first {b.limit} problems"
        parts.append(f"{b.name} ({size}, k={b.k}, <= {b.max_new_tokens} new tokens)")
    return f"{', '.join(parts)} at T={settings.temperature:g} on {settings.engine}"
