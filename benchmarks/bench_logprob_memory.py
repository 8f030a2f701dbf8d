"""Peak CPU memory of one forward + backward of the per-token log-probs on a Qwen2.5-0.5B-shaped model: the
full-logits path (``token_logprobs_reference``, "before") against the chunked output head (``token_logprobs``,
"after").

The model has Qwen2.5-0.5B's architecture (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocabulary
151,936, tied embeddings: 494M parameters) with random weights, built here in float32 (no download). The batch is
the trainer's default micro-batch: 8 left-padded prompts × 8 completions = 64 rows, completions ending at different
lengths, with the prompt's forward shared by its group (``group_size=8``, the trainer's ``share_prompt`` path),
at temperature 0.7; the loss is the masked mean log-prob. Each variant runs in a fresh subprocess, and its memory is
``ru_maxrss`` (the process's peak resident set, MiB): reported as the peak above the RSS once the model is built (the
log-prob path's own memory: decoder activations, the logits and their gradients, and the parameters' gradients,
~2 GiB) and as the absolute peak. The last column is the largest |log-prob difference| from "before".

Defaults keep "before" near 9 GiB, within ~12 GB on a 24 GB machine. The completion logits are
[64, T, 151936] float32, 64·T·151936·4 bytes per copy (594 MiB at T = 16; the full path holds a few copies at once);
besides them, the 0.5B model keeps ~2.5 MiB of decoder activations per position for backward (no activation
checkpointing), and its parameter gradients take 2 GiB. Prompt 64 / completion 64 would need ~4x the positions
(~30 GB for "before"): too much for 24 GB. Both the logits and the activations grow linearly with T, so the ratio
below changes little with T; what the chunked head saves is the logits' share, ~1.7 copies of [64, T, V] here. Run:

    python benchmarks/bench_logprob_memory.py [--prompt-len 32] [--completion-len 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=32768, rms_norm_eps=1e-6)
PROMPTS, G, TEMPERATURE, SEED = 8, 8, 0.7, 0
# "no-grad": the same call without autograd, as the trainer's behaviour and reference log-prob passes run it; there no
# decoder activations are kept, so the logits are most of the memory.
VARIANTS = {"before": "token_logprobs_reference", "after": "token_logprobs",
            "before/no-grad": "token_logprobs_reference", "after/no-grad": "token_logprobs"}


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch(prompt_len: int, completion_len: int, vocab: int):
    """Ids, attention mask and completion mask of PROMPTS × G rows: prompts left-padded by up to a quarter of their
    length, completions ending anywhere in their second half."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(1, vocab, (PROMPTS, prompt_len), generator=gen)
    pad = torch.randint(0, prompt_len // 4 + 1, (PROMPTS,), generator=gen)
    prompt_mask = (torch.arange(prompt_len) >= pad[:, None]).long()
    rows = PROMPTS * G
    lengths = torch.randint((completion_len + 1) // 2, completion_len + 1, (rows,), generator=gen)
    lengths[0] = completion_len
    comp_mask = (torch.arange(completion_len) < lengths[:, None]).long()
    completions = torch.randint(1, vocab, (rows, completion_len), generator=gen) * comp_mask
    ids = torch.cat([(prompts * prompt_mask).repeat_interleave(G, 0), completions], dim=1)
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), comp_mask], dim=1)
    return ids, attn, comp_mask.bool()


def run_variant(variant: str, prompt_len: int, completion_len: int, threads: int, out: Path) -> None:
    """One forward + backward of ``variant`` in this process; writes its memory, time and log-probs to ``out``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from harness.backends import sampling

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).float().train()
    ids, attn, mask = batch(prompt_len, completion_len, QWEN25_05B["vocab_size"])
    fn = getattr(sampling, VARIANTS[variant])
    if variant.startswith("after"):  # its one-time head check (two positions, no grad), outside the measured window
        sampling._chunkable_head(model, ids)
    gc.collect()
    loaded, loaded_peak = rss_mb(), peak_rss_mb()
    start = time.perf_counter()
    with torch.set_grad_enabled(not variant.endswith("no-grad")):
        logp, _ = fn(model, ids, attn, completion_len, TEMPERATURE, group_size=G)
        loss = (logp * mask).sum() / mask.sum()
    if loss.requires_grad:
        loss.backward()
    seconds = time.perf_counter() - start
    torch.save(logp.detach(), out.with_suffix(".pt"))
    out.write_text(json.dumps({"loaded_mb": loaded, "loaded_peak_mb": loaded_peak, "peak_mb": peak_rss_mb(),
                               "seconds": seconds, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt positions per row, padding included")
    parser.add_argument("--completion-len", type=int, default=16, help="completion positions per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each variant's process")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run only this variant, in this process "
                        "(what each subprocess does; needs --out)")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.prompt_len, args.completion_len, args.threads, args.out)
        return

    import torch

    rows, vocab = PROMPTS * G, QWEN25_05B["vocab_size"]
    print(f"Qwen2.5-0.5B shape, random float32 weights, CPU, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{rows} rows = {PROMPTS} prompts × {G} completions (group_size={G}), prompt {args.prompt_len} + "
          f"completion {args.completion_len} positions, T = {TEMPERATURE}")
    print(f"one copy of the micro-batch's float32 completion logits [{rows}, {args.completion_len}, {vocab}]: "
          f"{rows * args.completion_len * vocab * 4 / 2**20:,.0f} MiB; head chunk of the chunked path: "
          f"{_chunk_positions(vocab)} positions ({_chunk_positions(vocab) * vocab * 4 / 2**20:,.0f} MiB)\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / variant.replace("/", "-")
            cmd = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--threads", str(args.threads),
                   "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            results[variant] = json.loads(out.read_text()) | {"logp": torch.load(out.with_suffix(".pt"))}

    header = f"{'variant':<14} {'peak above load MiB':>20} {'absolute peak MiB':>18} {'seconds':>8} " \
             f"{'max |Δ log-prob| vs before':>27}"
    print(header)
    print("-" * len(header))
    for variant, r in results.items():
        diff = (r["logp"] - results["before"]["logp"]).abs().max().item()
        print(f"{variant:<14} {r['peak_mb'] - r['loaded_mb']:>20,.0f} {r['peak_mb']:>18,.0f} {r['seconds']:>8.1f} "
              f"{diff:>27.2e}")
    print()
    for suffix, what in (("", "forward + backward"), ("/no-grad", "forward without autograd")):
        b, a = results["before" + suffix], results["after" + suffix]
        print(f"{what}: before / after {(b['peak_mb'] - b['loaded_mb']) / (a['peak_mb'] - a['loaded_mb']):.2f}x "
              f"above load, {b['peak_mb'] / a['peak_mb']:.2f}x absolute (model loaded: {a['loaded_mb']:,.0f} MiB RSS)")


def _chunk_positions(vocab: int) -> int:
    from harness.backends.sampling import LOGIT_CHUNK_ELEMENTS

    return max(1, LOGIT_CHUNK_ELEMENTS // vocab)


if __name__ == "__main__":
    main()
