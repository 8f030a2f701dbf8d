#!/usr/bin/env bash
# The prepared GPU check (docs/paper.md, "The GPU check"): one invocation measures everything and writes
# $OUT/gpu_check.json (after every step), $OUT/gpu_check.log and $OUT/gpu_check.md.
#
#   bash scripts/gpu_check.sh          on the GPU machine, from the repository root, with gpu_wheels/ carried
#                                      (made here by scripts/gpu_wheels.sh); $OUT defaults to ./gpu_check_out
#   bash scripts/gpu_check.sh --dry    on any CPU machine: the same steps at tiny shapes (tests/test_gpu_check.py)
#
# Other arguments go to benchmarks/gpu_check.py (--budget-s SECONDS, --only STEP ...). The GPU machine has torch,
# transformers, accelerate, pandas and matplotlib but no hydra, trl, datasets or math-verify, and no package index:
# those come as wheels from gpu_wheels/wheels, installed --no-deps into a scratch folder on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=()
ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--dry" ]; then DRY=(--dry); else ARGS+=("$arg"); fi
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
echo "[gpu_check] $(date -u +%FT%TZ) python $($PY -c 'import sys; print(sys.version.split()[0])') at $PY" | tee -a "$LOG"

WHEELS=gpu_wheels/wheels
if [ ${#DRY[@]} -eq 0 ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    rm -rf "$SITE"
    t0=$(date +%s)
    # --no-deps: the machine's own torch/transformers/pyarrow stay; only the missing packages are added.
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        echo "[gpu_check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s" \
            | tee -a "$LOG"
    else
        echo "[gpu_check] wheel install FAILED (see $LOG); the steps that need them will fail" | tee -a "$LOG"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [ ${#DRY[@]} -eq 0 ]; then
    echo "[gpu_check] no $WHEELS/*.whl: using the packages already installed" | tee -a "$LOG"
fi

# The tiny model built on the CPU machine (carried in gpu_wheels/cache; its build_info.json says which weights): the
# GPU runs start from CPU-built weights, and the ~1 min build is skipped.
export HARNESS_CACHE_DIR="${HARNESS_CACHE_DIR:-$REPO/.cache/gpu_check}"
mkdir -p "$HARNESS_CACHE_DIR"
if [ ${#DRY[@]} -eq 0 ] && [ -d gpu_wheels/cache ]; then
    cp -rn gpu_wheels/cache/. "$HARNESS_CACHE_DIR/"
fi

# The orchestrator keeps its own time budget; this outer limit only catches a hung orchestrator.
BUDGET=440
[ ${#DRY[@]} -gt 0 ] && BUDGET=900
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    [ "${ARGS[$i]}" = "--budget-s" ] && BUDGET=${ARGS[$((i + 1))]%.*}
done
timeout --kill-after=10 $((BUDGET + 60)) "$PY" benchmarks/gpu_check.py ${DRY[@]+"${DRY[@]}"} --out "$OUT" \
    --cache-dir "$HARNESS_CACHE_DIR" ${ARGS[@]+"${ARGS[@]}"}
rc=$?
echo "[gpu_check] exit $rc; results in $OUT" | tee -a "$LOG"
exit $rc
