"""The memory plan (harness/memory_plan.py) against a measured peak on this CPU: one native training micro-batch.

For each model shape, a fresh subprocess builds the model with random weights (float32, no download), then runs what
the native trainer does for one micro-batch: the per-token log-probs through the chunked output head with the
prompt shared by its group of G completions, a loss over them, backward, and one AdamW step (which allocates the
optimizer state). Its peak resident set (VmHWM, reset once the model is built) above the resident set at that
point is compared with the plan's terms less the weights, which are resident before the step (and less the CUDA
allowance, as this is a CPU):

    python benchmarks/bench_memory_plan.py [--shapes tiny qwen2.5-0.5b] [--threads 2]

``tiny`` is the embedded default's model at its default micro-batch (64 completions of 24 tokens, 8 per prompt);
``qwen2.5-0.5b`` is Qwen2.5-0.5B's architecture at micro-batch 8 (one prompt of 32 tokens, 8 completions of 16). The
plan is a lower bound by construction (module docstring): the ratio measured / planned says by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# shape -> (architecture key, micro-batch, group, prompt tokens, completion tokens)
SHAPES = {"tiny": ("tiny", 64, 8, 16, 24), "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", 8, 8, 32, 16)}


def _architecture(key: str):
    from harness.memory_plan import KNOWN, architecture_of

    return architecture_of({"name": "tiny"}) if key == "tiny" else KNOWN[key]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the process's peak resident set (Linux: ``echo 5 > /proc/self/clear_refs`` resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    """VmHWM, the peak resident set since the last reset (``ru_maxrss`` cannot be reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(shape: str) -> dict:
    """One micro-batch step in this process; returns the measured and planned MiB."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from harness.backends.sampling import LOGIT_CHUNK_ELEMENTS, token_logprobs
    from harness.memory_plan import plan_memory

    key, b, g, p, c = SHAPES[shape]
    arch = _architecture(key)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                                         num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                                         intermediate_size=arch.intermediate, tie_word_embeddings=arch.tied,
                                         max_position_embeddings=max(256, p + c)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompts = torch.randint(0, arch.vocab, (b // g, p)).repeat_interleave(g, dim=0)
    ids = torch.cat([prompts, torch.randint(0, arch.vocab, (b, c))], dim=1)
    mask = torch.ones_like(ids)
    base = _rss_mib()
    _reset_peak()  # what imports and the model build peaked at is not the step's
    logp, _ = token_logprobs(model, ids, mask, c, 0.7, group_size=g)
    (-logp.mean()).backward()
    optimizer.step()
    peak = _peak_mib()
    plan = plan_memory(arch, micro_batch=b, prompt_tokens=p, completion_tokens=c, prompt_group=g, activation_bytes=4,
                       logit_chunk_elements=LOGIT_CHUNK_ELEMENTS, cuda=False)
    terms = {k: v / 2**20 for k, v in plan.terms.items() if k != "weights"}
    return {"shape": shape, "params": arch.params, "measured_mib": peak - base, "planned_mib": sum(terms.values()),
            "terms_mib": terms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT" + json.dumps(child(args.child)))
        return 0
    print(f"{'shape':<14} {'params':>12} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17}  "
          "terms (MiB)")
    for shape in args.shapes:
        out = subprocess.run([sys.executable, __file__, "--child", shape, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.split("RESULT", 1)[1])
        terms = ", ".join(f"{k} {v:.0f}" for k, v in r["terms_mib"].items())
        print(f"{shape:<14} {r['params']:>12,} {r['planned_mib']:>12.0f} {r['measured_mib']:>13.0f} "
              f"{r['measured_mib'] / r['planned_mib']:>16.2f}x  {terms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
