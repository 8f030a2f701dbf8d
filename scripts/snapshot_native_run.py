"""Record a short native run (history and a digest of the final weights) as tests/snapshots/native_sync_run.json.

The snapshot pins the synchronous trainer: tests/test_offpolicy.py checks that ``train.staleness=0`` reproduces it, so
a change to the rollout path that alters a synchronous run shows up as a failing test. Regenerate it only for a change
that is meant to alter synchronous runs, and say so in the commit::

    HARNESS_DATA_DIR=../shared/data python scripts/snapshot_native_run.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "tests" / "snapshots" / "native_sync_run.json"
# Two mini-batches per pass and two passes: the behaviour pass, the first mini-batch's shortcut and the measured
# zero-variance rows all run.
OVERRIDES = ["train.steps=3", "train.rollout_batch_size=32", "train.mini_batch_size=16", "train.micro_batch_size=8",
             "train.lr=1e-3", "train.save_every=3", "backend.progress=false", "backend.threads=1",
             "eval.enabled=false"]


def weights_digest(checkpoint: Path) -> dict:
    """Per-tensor float64 sums and sums of squares of a checkpoint's weights, and the SHA-256 of their bytes."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    sha = hashlib.sha256()
    sums = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        sha.update(name.encode() + t.numpy().tobytes())
        sums[name] = [float(t.double().sum()), float(t.double().square().sum())]
    return {"sha256": sha.hexdigest(), "sums": sums}


def machine() -> dict:
    """What the recorded numbers depend on beyond the code: torch's build and the CPU's vector instructions (another
    CPU rounds the same float sums differently, and a sampled token can flip)."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu}


def run(overrides: list[str], cache_dir: str) -> dict:
    sys.path.insert(0, str(REPO))
    from harness.backends.native import train
    from tests.conftest import compose_at

    with tempfile.TemporaryDirectory() as out:
        result = train(compose_at(out, [*overrides, f"cache_dir={cache_dir}"]))
        history = [{k: v for k, v in h.items() if k != "step_time_s"} for h in result.history]
        return {"overrides": overrides, "history": history, "weights": weights_digest(result.final_checkpoint)}


if __name__ == "__main__":
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    snap = run(OVERRIDES, str(REPO / ".cache" / "test"))
    SNAPSHOT.write_text(json.dumps({"commit": commit, "machine": machine(), **snap}, indent=1) + "\n")
    sha = snap["weights"]["sha256"][:12]
    print(f"wrote {SNAPSHOT.relative_to(REPO)} ({len(snap['history'])} steps, weights {sha})")
