"""The evaluator: a checkpoint's accuracy on math benchmarks, with k samples per problem.

:mod:`~harness.evaluation.settings` checks the ``eval`` node, :mod:`~harness.evaluation.engines` generates
(``hf``, ``vllm``, ``lm_eval``: one module each, :mod:`~harness.evaluation.generation` their shared interface),
:mod:`~harness.evaluation.pipeline` renders prompts, scores and summarises (``evaluate``). The names below are the
public API.
"""

from harness.evaluation.engines import make_engine
from harness.evaluation.generation import Completion, Engine, GenJob, Sampling, eos_token_ids
from harness.evaluation.hf_engine import HFEngine
from harness.evaluation.lm_eval_engine import LmEvalEngine, write_lm_eval_task
from harness.evaluation.pipeline import (
    benchmark_metrics,
    context_overrides,
    eval_task,
    evaluate,
    format_summary,
    model_context_len,
    pooled_benchmarks,
    prepare_benchmarks,
    score_benchmark,
    write_jsonl,
)
from harness.evaluation.settings import (
    BENCHMARKS,
    ENGINES,
    FINISH_REASONS,
    POOLED_BENCHMARKS,
    BenchSpec,
    EvalSettings,
    check_vllm_python,
    describe_plan,
    validate_eval_config,
)
from harness.evaluation.vllm_engine import VllmEngine, kill_process_group

__all__ = [
    "BENCHMARKS",
    "ENGINES",
    "FINISH_REASONS",
    "POOLED_BENCHMARKS",
    "BenchSpec",
    "Completion",
    "Engine",
    "EvalSettings",
    "GenJob",
    "HFEngine",
    "LmEvalEngine",
    "Sampling",
    "VllmEngine",
    "benchmark_metrics",
    "check_vllm_python",
    "context_overrides",
    "describe_plan",
    "eos_token_ids",
    "eval_task",
    "evaluate",
    "format_summary",
    "kill_process_group",
    "make_engine",
    "model_context_len",
    "pooled_benchmarks",
    "prepare_benchmarks",
    "score_benchmark",
    "validate_eval_config",
    "write_jsonl",
    "write_lm_eval_task",
]
