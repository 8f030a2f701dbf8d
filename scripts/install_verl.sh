#!/usr/bin/env bash
# Create ./.venv-verl with verl for the `verl` backend (harness/backends/verl.py) and its tests.
#
# Why a separate virtualenv: verl 0.9.1 pins transformers>=5.5.3,<5.11 (the main environment has a newer one)
# and brings Ray; the harness only starts `.venv-verl/bin/python -m verl.trainer.main_ppo` and never imports
# verl itself. The harness is installed here too (editable, without its dependencies), which is what gives
# verl its `verl.plugins` entry point; its own runtime needs (math-verify for the reward) are added explicitly.
#
# Modes (VERL_INSTALL):
#   full (default)  `pip install verl==$VERL_VERSION` with its declared dependencies: enough to import verl, run
#                   its losses, compose its Hydra config and start `main_ppo` (which then needs GPUs + vLLM/SGLang;
#                   on a GPU machine add the engine: `.venv-verl/bin/pip install 'verl[vllm]==0.9.1'`).
#   light           verl --no-deps plus exactly what `import verl.trainer.ppo.core_algos` needs on CPU (the
#                   tests' loss parity and plugin checks) and transformers<5.11.
#
# Idempotent: a no-op once `import verl` registers the harness losses through the entry point; otherwise only
# the missing parts are installed (re-run it after pyproject.toml changes: it re-installs the harness).
# Usage: scripts/install_verl.sh [VENV_DIR]   (default: <repo>/.venv-verl)
# Env:   VERL_VERSION (default 0.9.1), TORCH_VERSION (default 2.13.0), PYTHON (default python3), VERL_INSTALL,
#        TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu where PyPI would give the CUDA torch build and
#        no local CPU wheel is on pip's find-links)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-verl}"
VERL_VERSION="${VERL_VERSION:-0.9.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
MODE="${VERL_INSTALL:-full}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

PROBE='
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
names = sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("harness_"))
assert "harness_sigmoid" in names and "harness_clip" in names, names
print("verl", verl.__version__, "harness losses:", ", ".join(names))
'
# What every verl process does when it starts (import verl -> plugin), then the registry. With no argument the
# plugin must come from the `verl.plugins` entry point; `check env` uses the VERL_USE_EXTERNAL_MODULES fallback.
# Probed from / : in the repository root the checkout's own harness.egg-info would supply the entry point and
# hide a stale install in the virtualenv.
case "$VENV" in /*) PY="$VENV/bin/python" ;; *) PY="$(pwd)/$VENV/bin/python" ;; esac
check() {
  if [ "${1:-}" = env ]; then
    (cd / && VERL_USE_EXTERNAL_MODULES=harness.backends.verl_plugin "$PY" -c "$PROBE" 2>/dev/null)
  else
    (cd / && env -u VERL_USE_EXTERNAL_MODULES -u PYTHONPATH "$PY" -c "$PROBE" 2>/dev/null)
  fi
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "install_verl: $VENV already has verl with the harness plugin; nothing to do"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
NEED="import verl.trainer.ppo.core_algos, math_verify"
[ "$MODE" = full ] && NEED="$NEED, transfer_queue, datasets, peft"
if ! "$VENV/bin/python" -c "$NEED" 2>/dev/null; then
  "${PIP[@]}" --upgrade pip
  TORCH_INDEX=()
  [ -n "${TORCH_INDEX_URL:-}" ] && TORCH_INDEX=(--extra-index-url "$TORCH_INDEX_URL")
  # torch first, so verl's unpinned `torch` requirement is met by the CPU wheel instead of the CUDA build.
  "${PIP[@]}" "torch==${TORCH_VERSION}" "${TORCH_INDEX[@]}"
  case "$MODE" in
    full)
      # + the TransferQueue part of verl's verl-core extra: main_ppo's (v1) TaskRunner imports transfer_queue
      # (the rest of verl-core adds video/vision/profiling packages the harness never uses).
      "${PIP[@]}" "verl==${VERL_VERSION}" "TransferQueue>=0.1.10" pyzmq msgspec cachetools fastapi uvicorn \
        "${TORCH_INDEX[@]}"
      ;;
    light)
      "${PIP[@]}" --no-deps "verl==${VERL_VERSION}"
      # core_algos imports ray, tensordict (0.10 needs orjson, pyvers, cloudpickle), codetiming, hydra/omegaconf and
      # transformers (through verl.workers.config); verl's pin: transformers>=5.5.3,<5.11,!=5.6.0.
      "${PIP[@]}" ray "tensordict==0.10.0" orjson pyvers cloudpickle codetiming hydra-core packaging \
        "transformers>=5.5.3,<5.11,!=5.6.0" pyarrow pandas "${TORCH_INDEX[@]}"
      ;;
    *)
      echo "install_verl: VERL_INSTALL must be full or light, got '$MODE'" >&2
      exit 2
      ;;
  esac
  # The reward needs math-verify (pinned without the antlr extra: hydra pins antlr 4.9, and the extra makes pip fall back to math-verify 0.3).
  "${PIP[@]}" "math-verify==0.9.*"
fi
# The harness itself: editable (the verl.plugins entry point comes from its metadata), without dependency
# resolution (that would pull the main environment's transformers).
"${PIP[@]}" --no-deps -e .

if check; then
  :
elif check env; then
  echo "install_verl: WARNING: no verl.plugins entry point (pyproject.toml needs [project.entry-points.\"verl.plugins\"]" \
       "harness = \"harness.backends.verl_plugin\"); the backend still works through VERL_USE_EXTERNAL_MODULES" >&2
else
  echo "install_verl: verl or the harness plugin does not load in $VENV:" >&2
  VERL_USE_EXTERNAL_MODULES=harness.backends.verl_plugin "$VENV/bin/python" -c "$PROBE" >&2 || true
  exit 1
fi
echo "install_verl: done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
