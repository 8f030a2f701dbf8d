"""Evaluate a checkpoint on math benchmarks: ``evaluate(...)`` and the ``harness eval`` task.

Pipeline (everything that can fail on bad input fails before the first token is generated):

1. :func:`validate_eval_config` resolves the ``eval`` node into :class:`EvalSettings` (per-benchmark ``k``, max new
   tokens, limit, prompt template) and checks benchmark names, ``k >= 1``, ``temperature >= 0``, the engine, the
   local data files and, for ``vllm``, that its Python executable can import vLLM.
2. :func:`evaluate` checks the model path, loads every benchmark (``harness.data.load_task``), renders every prompt
   with the ONE prompt builder (``harness.prompts.render_prompt`` with the model's ``prompt`` node, optionally a
   per-benchmark template) and checks the prompts fit the model's context.
3. One engine (:mod:`harness.evaluation.engines`: ``hf``, ``vllm``, ``lm_eval``) generates ``k`` completions per
   prompt for all benchmarks at once.
4. ``harness.scoring.score_batch`` judges every sample (default fallbacks); per-benchmark metrics: mean accuracy
   over the k samples (the pass@1 estimate), strict accuracy (``<answer>`` tag only), unbiased pass@k (Chen et al.
   2021), format compliance, truncation rate, mean response tokens, and seeded 95% bootstrap CIs over problems.
5. Files in ``out_dir``: ``samples/<benchmark>.jsonl`` (one record per sample) and ``summary.json``.

``summary["benchmarks"][name]`` holds flat numbers only (:mod:`harness.tracking` logs every number as
``eval/<benchmark>/<metric>``, :func:`harness.keys.eval_key`; MLflow metric names cannot contain ``@``, hence
``pass_at_16``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import keys as K
from harness.data import load_task
from harness.evaluation.engines import make_engine
from harness.evaluation.generation import Completion, GenJob, Sampling
from harness.evaluation.lm_eval_engine import LmEvalEngine
from harness.evaluation.settings import POOLED_BENCHMARKS, BenchSpec, EvalSettings, validate_eval_config
from harness.evaluation.vllm_engine import VllmEngine
from harness.prompts import PromptConfig, prompt_config, render_prompt
from harness.scoring import has_format, score_batch
from harness.stats import bootstrap_ci, in_selection_half, pass_at_k

logger = logging.getLogger(__name__)


def benchmark_metrics(
    records: Sequence[Mapping[str, Any]],
    k: int,
    *,
    pass_k: Sequence[int] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of one benchmark from its per-sample records (``problem_id``, ``correct``, ``strict_correct``,
    ``format_ok``, ``num_tokens``, ``finish_reason``); every problem has ``k`` records."""
    by_problem: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
    n_problems = len(by_problem)
    groups = list(by_problem.values())
    acc_p = [sum(r["correct"] for r in g) / len(g) for g in groups]
    strict_p = [sum(r["strict_correct"] for r in g) / len(g) for g in groups]
    ks = sorted({1, k, *(pass_k or ())} & set(range(1, k + 1)))
    n_samples = len(records)
    out: dict[str, Any] = {
        "n_problems": n_problems,
        "k": k,
        "n_samples": n_samples,
        "acc": _mean(acc_p),
        "strict_acc": _mean(strict_p),
        "format_rate": _mean([float(r["format_ok"]) for r in records]),
        "truncation_rate": _mean([float(r["finish_reason"] == "length") for r in records]),
        "mean_tokens": _mean([float(r["num_tokens"]) for r in records]),
    }
    for name, per in (("acc", acc_p), ("strict_acc", strict_p)):
        lo, hi = bootstrap_ci(per, n_boot=n_boot, level=level, seed=seed)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    # What a tuner or a τ choice may look at: the selection half only (the report tests on the other half).
    out[K.SELECTION_STRICT_ACC] = _mean([a for pid, a in zip(by_problem, strict_p, strict=True)
                                         if in_selection_half(pid)])
    for kk in ks:
        per = [pass_at_k(len(g), sum(bool(r["correct"]) for r in g), kk) for g in groups]
        out[f"pass_at_{kk}"] = _mean(per)
        if kk > 1:
            lo, hi = bootstrap_ci(per, n_boot=n_boot, level=level, seed=seed)
            out[f"pass_at_{kk}_ci_low"], out[f"pass_at_{kk}_ci_high"] = lo, hi
    for rule in ("answer", "boxed", "last_number", "none"):
        out[f"fallback_{rule}_rate"] = _mean([float(r["fallback"] == rule) for r in records])
    return out


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")




def check_model_path(model_path: str) -> str:
    """``model_path`` if it is an existing model directory or a hub id; ``ValueError`` otherwise."""
    from harness.models import resolve_model_path

    if not model_path:
        raise ValueError("model path is empty")
    return resolve_model_path({"name": "hf", "path": str(model_path)})


# RoPE variants whose cos/sin do not read max_position_embeddings: for these a different value at load time changes
# no number the model computes at any position. dynamic NTK, YaRN, longrope and llama3 derive their scaling from it.
CONTEXT_SAFE_ROPE_TYPES: tuple[str, ...] = ("default", "linear")


def _text_config(model_path: str) -> tuple[Any, Any]:
    """``(config, text config)`` of a checkpoint (the same object for a plain language model)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return cfg, (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg)


def context_overrides(model_path: str, context_len: int | None) -> dict[str, int]:
    """The config override that gives the model ``context_len`` positions at load time (``eval.context_len``):
    ``{"max_position_embeddings": context_len}``, or ``{}`` when there is nothing to change.

    Every engine applies the same dict (hf: ``from_pretrained(**overrides)``, vllm: ``hf_overrides``, lm_eval: its
    ``model_args``), so all three see one context. It changes no weight and no computed number: a rotary model has
    no learned position table, its positions enter only as cos/sin of ``position * inv_freq`` computed on the fly
    from ``rope_theta``, and ``max_position_embeddings`` only bounds how far the engines go. Refused (``ValueError``
    naming ``eval.context_len``) for models without rotary positions (a learned table cannot grow at load time), for
    RoPE scalings that derive their frequencies from ``max_position_embeddings`` and for composite (multimodal)
    configs.
    """
    if context_len is None:
        return {}
    cfg, text = _text_config(model_path)
    native = getattr(text, "max_position_embeddings", None)
    if native is None:
        raise ValueError(f"eval.context_len={context_len}: {model_path} has no max_position_embeddings to change; "
                         "allowed: null (the model's own context)")
    if int(native) == int(context_len):
        return {}
    where = f"eval.context_len={context_len} (model {model_path}, model_type={getattr(text, 'model_type', '?')}, "
    where += f"max_position_embeddings={native})"
    if text is not cfg:
        raise ValueError(f"{where}: a composite (multimodal) config; allowed: null or {native}")
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if rope.get("rope_theta", getattr(text, "rope_theta", None)) is None:
        raise ValueError(f"{where}: no rotary position embeddings, so its position table cannot be extended at load "
                         f"time; allowed: null or {native}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in CONTEXT_SAFE_ROPE_TYPES:
        raise ValueError(f"{where}: rope_type={rope_type!r} derives its frequencies from max_position_embeddings; "
                         f"the context can be changed for rope types {', '.join(CONTEXT_SAFE_ROPE_TYPES)} only; "
                         f"allowed: null or {native}")
    return {"max_position_embeddings": int(context_len)}


def model_context_len(model_path: str, context_len: int | None = None) -> int | None:
    """The context the engines give the model: ``context_len`` (``eval.context_len``, checked by
    :func:`context_overrides`) when set, else ``max_position_embeddings`` of its text config, else None."""
    if context_len is not None:
        context_overrides(model_path, context_len)
        return int(context_len)
    _, text = _text_config(model_path)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


@dataclass
class PreparedBenchmark:
    """One benchmark ready to generate: its problems, rendered prompts and generation job."""

    spec: BenchSpec
    problems: list[dict[str, str]]
    prompts: list[str]
    prompt_tokens: list[int]
    job: GenJob
    note: str | None = None
    n_total: int = 0  # problems in the benchmark's test split; len(problems) < n_total when a limit cut it


def prepare_benchmarks(
    settings: EvalSettings,
    tokenizer: Any,
    *,
    prompt_cfg: PromptConfig,
    data_dir: str | Path | None = None,
    seed: int = 0,
    context_len: int | None = None,
) -> list[PreparedBenchmark]:
    """Load every benchmark and render its prompts; ``ValueError`` on missing data or prompts that do not fit.

    A ``limit`` keeps the first ``limit`` problems (file order) and says so in the benchmark's note (``n_total`` is
    the split's size). When the longest prompt plus ``max_new_tokens`` exceeds ``context_len``, max new tokens is
    capped (with a note in the summary): past the context vLLM stops while HF would extrapolate, so the engines
    would disagree.
    """

    prepared = []
    for spec in settings.benchmarks:
        # seed=0 for the data: arith problems must not change with the run seed (every cell sees the same test set).
        # The whole split is loaded (the test sets are small) so the summary can say how much a limit left out.
        available = load_task(spec.name, "test", data_dir=data_dir, seed=0)
        problems = available if spec.limit is None else available[: spec.limit]
        if not problems:
            raise ValueError(f"benchmark {spec.name!r} has no problems (limit={spec.limit})")
        notes = []
        if len(problems) < len(available):
            notes.append(f"first {len(problems)} of {len(available)} problems (limit {spec.limit})")
        pcfg = prompt_cfg if spec.template is None else replace(prompt_cfg, template=spec.template)
        prompts = [render_prompt(tokenizer, p["problem"], pcfg) for p in problems]
        lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        max_new = spec.max_new_tokens
        if context_len is not None:
            too_long = sum(n >= context_len for n in lengths)
            if too_long:
                raise ValueError(
                    f"benchmark {spec.name!r}: {too_long} prompt(s) do not fit the model's context "
                    f"({max(lengths)} >= {context_len} tokens); raise it with eval.context_len=N (models with rotary "
                    "positions, e.g. Qwen2 and the tiny model: model.context_len) or use a model with a longer context"
                )
            if max(lengths) + max_new > context_len:
                max_new = context_len - max(lengths)
                notes.append(f"max_new_tokens capped {spec.max_new_tokens} -> {max_new} by the context ({context_len})")
                logger.warning("benchmark %s: %s", spec.name, notes[-1])
        sampling = Sampling(settings.temperature, settings.top_p, max_new, seed)
        job = GenJob(prompts, spec.k, sampling, name=spec.name, docs=problems, max_prompt_tokens=max(lengths))
        prepared.append(PreparedBenchmark(spec, problems, prompts, lengths, job, "; ".join(notes) or None,
                                          n_total=len(available)))
    return prepared


def score_benchmark(
    prep: PreparedBenchmark,
    completions: Sequence[Sequence[Completion]],
    settings: EvalSettings,
    *,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge every sample of one benchmark; returns ``(metrics, per-sample records)``."""

    flat = [
        (p, prompt, j, c)
        for p, prompt, cs in zip(prep.problems, prep.prompts, completions, strict=True)
        for j, c in enumerate(cs)
    ]
    t0 = time.perf_counter()
    scores = score_batch(
        [c.text for *_, c in flat],
        [p["answer"] for p, *_ in flat],
        fallbacks=settings.fallbacks,
        timeout_s=settings.score_timeout_s,
        workers=settings.score_workers,
    )
    score_seconds = time.perf_counter() - t0
    records = []
    for (p, prompt, j, c), s in zip(flat, scores, strict=True):
        records.append({
            "benchmark": prep.spec.name,
            "problem_id": p["id"],
            "sample_index": j,
            "prompt": prompt,
            "response": c.text,
            "gold": p["answer"],
            "extracted": s.extracted,
            "correct": bool(s.correct),
            # The "answer" rule always wins when an <answer> span exists (harness.scoring.extract_answer), so the
            # strict verdict (fallbacks=()) is the default verdict restricted to that rule: no second scoring pass.
            "strict_correct": bool(s.correct and s.fallback == "answer"),
            "fallback": s.fallback,
            "format_ok": has_format(c.text),
            "num_tokens": c.num_tokens,
            "finish_reason": c.finish_reason,
        })
    metrics = benchmark_metrics(
        records, prep.spec.k, pass_k=settings.pass_k, n_boot=settings.bootstrap, level=settings.ci, seed=seed
    )
    metrics.update({
        "n_total": prep.n_total or len(prep.problems),  # above n_problems only when a limit cut the benchmark
        "max_new_tokens": prep.job.sampling.max_new_tokens,
        "generated_tokens": sum(r["num_tokens"] for r in records),
        "score_seconds": score_seconds,
        "verdicts_per_s": len(records) / max(score_seconds, 1e-9),
    })
    return metrics, records


def evaluate(
    model_path: str,
    eval_cfg: Any,
    *,
    prompt_cfg: PromptConfig | Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    out_dir: str | Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate ``model_path`` on the benchmarks of ``eval_cfg``; writes samples and ``summary.json`` to
    ``out_dir`` and returns the summary (``{"benchmarks": {name: {metric: number}}, "mean_accuracy", ...}``).

    ``eval_cfg``: the ``eval`` node (mapping / DictConfig, merged over the defaults of
    :class:`harness.schema.EvalConfig`) or :class:`EvalSettings`. ``prompt_cfg``: the model's prompt node
    (``PromptConfig`` or mapping; None = defaults). ``seed`` seeds sampling and the bootstrap. All validation
    happens before any generation.
    """
    t_start = time.perf_counter()
    settings = eval_cfg if isinstance(eval_cfg, EvalSettings) else validate_eval_config(eval_cfg, data_dir=data_dir)
    model_path = check_model_path(model_path)
    from transformers import AutoTokenizer  # after the cheap checks: importing torch takes seconds
    base_prompt = prompt_cfg if isinstance(prompt_cfg, PromptConfig) else prompt_config(prompt_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    overrides = context_overrides(model_path, settings.context_len)
    context = model_context_len(model_path, settings.context_len)
    if settings.engine == "vllm" and settings.vllm["max_model_len"]:
        context = min(context or 10**9, int(settings.vllm["max_model_len"]))
    prepared = prepare_benchmarks(
        settings, tokenizer, prompt_cfg=base_prompt, data_dir=data_dir, seed=seed, context_len=context
    )

    engine = make_engine(settings, model_path, tokenizer=tokenizer, work_dir=out, context_len=context,
                         config_overrides=overrides)
    t_gen = time.perf_counter()
    try:
        completions = engine.generate_many([p.job for p in prepared])
    finally:
        engine.close()
    gen_seconds = time.perf_counter() - t_gen

    summary: dict[str, Any] = {
        "model_path": model_path,
        "engine": settings.engine,
        "seed": seed,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "fallbacks": list(settings.fallbacks),
        "out_dir": str(out),
        "context_len": context,
        "config_overrides": overrides,
        # eval.limit / eval.bench.<name>.limit as applied (null: every problem); n_problems and n_total per benchmark
        "limits": {p.spec.name: p.spec.limit for p in prepared},
        "benchmarks": {},
        "notes": {p.spec.name: p.note for p in prepared if p.note},
        "generate_seconds": gen_seconds,
    }
    if isinstance(engine, VllmEngine):
        summary["vllm"] = engine.last_run
    scored: dict[str, tuple[int, list[dict[str, Any]]]] = {}
    for prep, comps in zip(prepared, completions, strict=True):
        metrics, records = score_benchmark(prep, comps, settings, seed=seed)
        if isinstance(engine, LmEvalEngine):
            metrics.update(_lm_eval_crosscheck(engine, prep.spec.name, records))
        summary["benchmarks"][prep.spec.name] = metrics
        scored[prep.spec.name] = (prep.spec.k, records)
        if settings.save_samples:
            write_jsonl(out / "samples" / f"{prep.spec.name}.jsonl", records)
    # The mean over the benchmarks asked for, before pooled ones are added (they would count problems twice).
    summary["mean_accuracy"] = _mean([m["acc"] for m in summary["benchmarks"].values()])
    summary[K.MEAN_SELECTION_ACCURACY] = _mean([m[K.SELECTION_STRICT_ACC] for m in summary["benchmarks"].values()])
    for name, (metrics, records) in pooled_benchmarks(scored, settings, seed=seed).items():
        parts = POOLED_BENCHMARKS[name]
        metrics["n_total"] = sum(summary["benchmarks"][p]["n_total"] for p in parts)
        if metrics["n_problems"] < metrics["n_total"]:
            summary["notes"][name] = (f"{' + '.join(parts)} pooled: {metrics['n_problems']} of {metrics['n_total']} "
                                      "problems (limit)")
        summary["benchmarks"][name] = metrics
        summary.setdefault("pooled", {})[name] = list(POOLED_BENCHMARKS[name])
        if settings.save_samples:
            write_jsonl(out / "samples" / f"{name}.jsonl", records)
    summary["generated_tokens"] = sum(summary["benchmarks"][p.spec.name]["generated_tokens"] for p in prepared)
    summary["tokens_per_s"] = summary["generated_tokens"] / max(gen_seconds, 1e-9)
    summary["total_seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def pooled_benchmarks(scored: Mapping[str, tuple[int, list[dict[str, Any]]]], settings: EvalSettings, *,
                      seed: int = 0) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Metrics and records of each :data:`POOLED_BENCHMARKS` entry whose parts were all evaluated (``scored``:
    benchmark -> (k, per-sample records)): the parts' records as one benchmark (AIME24 + AIME25: 60 problems),
    pass@k at the smallest k of the parts."""
    out = {}
    for name, parts in POOLED_BENCHMARKS.items():
        if all(p in scored for p in parts):
            records = [r for p in parts for r in scored[p][1]]
            metrics = benchmark_metrics(records, min(scored[p][0] for p in parts), pass_k=settings.pass_k,
                                        n_boot=settings.bootstrap, level=settings.ci, seed=seed)
            out[name] = (metrics, records)
    return out


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _lm_eval_crosscheck(engine: LmEvalEngine, name: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's own metrics for the task, and the fraction of problems where lm-eval's per-doc accuracy (its
    ``process_results`` on its responses) equals ours on the same responses: the two must judge alike."""
    task = f"harness_{name}"
    out = {f"lm_eval_{k}": v for k, v in engine.last_metrics.get(task, {}).items()
           if k in ("acc", "strict_acc", "format_rate", "pass_at_k")}
    per_doc = engine.last_per_doc.get(task, [])
    ours = _per_problem(records, "correct")
    if per_doc and len(per_doc) == len(ours):
        out["lm_eval_agreement"] = _mean([float(abs(d.get("acc", -1.0) - a) < 1e-9)
                                          for d, a in zip(per_doc, ours, strict=True)])
    return out


def _per_problem(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    by: dict[str, list[float]] = {}
    for r in records:
        by.setdefault(r["problem_id"], []).append(float(r[key]))
    return [sum(v) / len(v) for v in by.values()]


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small text table of the headline numbers; ``n`` is the number of problems evaluated, ``of`` the
    benchmark's size, and every note (a limit that cut a benchmark, capped max new tokens) follows the table."""
    lines = [f"{'benchmark':10s} {'n':>5s} {'of':>5s} {'k':>3s} {'acc':>7s} {'95% CI':>17s} {'strict':>7s} "
             f"{'pass@k':>7s} {'format':>7s} {'trunc':>6s} {'tokens':>7s}"]
    for name, m in summary["benchmarks"].items():
        pass_k = m[f"pass_at_{m['k']}"]
        lines.append(
            f"{name:10s} {m['n_problems']:5d} {m.get('n_total', m['n_problems']):5d} {m['k']:3d} {m['acc']:7.4f} "
            f"[{m['acc_ci_low']:.4f}, {m['acc_ci_high']:.4f}] {m['strict_acc']:7.4f} {pass_k:7.4f} "
            f"{m['format_rate']:7.4f} {m['truncation_rate']:6.3f} {m['mean_tokens']:7.1f}"
        )
    lines += [f"note: {name}: {note}" for name, note in (summary.get("notes") or {}).items()]
    return "\n".join(lines)


def eval_task(cfg: Any) -> None:
    """``harness eval``: evaluate the configured model (``conf/evaluate.yaml``) and print the headline table."""
    from harness.models import model_prompt_config, resolve_model_path

    out_dir = Path(cfg.output_dir)
    settings = validate_eval_config(cfg.eval, data_dir=cfg.get("data_dir"))
    model_path = resolve_model_path(cfg.model, cache_dir=cfg.get("cache_dir"))
    summary = evaluate(model_path, settings, prompt_cfg=model_prompt_config(cfg.model), data_dir=cfg.get("data_dir"),
                       out_dir=out_dir, seed=int(cfg.seed))
    print(format_summary(summary))
    print(f"results: {out_dir / 'summary.json'}")
