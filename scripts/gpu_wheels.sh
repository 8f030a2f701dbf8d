#!/usr/bin/env bash
# Fill gpu_wheels/ (git-ignored) with what scripts/gpu_check.sh needs on the GPU machine, which reaches no package
# index: the wheels of the packages it lacks (Python 3.12, x86-64 Linux), at the versions installed in this
# checkout's .venv (the ones the tests pass with), and the tiny model built here. Run it here, then send gpu_wheels
# along with the working tree (docs/paper.md, "The GPU check"). Everything sent must stay under 64 MiB: the script
# prints the total and fails above it.
#
#   bash scripts/gpu_wheels.sh            (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=gpu_wheels
LIMIT_MIB=64

# What the GPU machine lacks (its image has torch, transformers, accelerate, pandas, pyarrow, scipy, sympy, xxhash,
# fsspec, psutil, ...): hydra and omegaconf (config composition), trl and datasets (+ dill, multiprocess), math-verify
# (+ latex2sympy2_extended; imported by the scorer). antlr4-python3-runtime 4.9.3 (hydra's and omegaconf's pin) is
# on PyPI as a source archive only, so its pure-Python wheel is built here.
PACKAGES=(hydra-core omegaconf trl datasets dill multiprocess math-verify latex2sympy2_extended)
SDIST_ONLY=(antlr4-python3-runtime)

pin() {  # NAME -> NAME==VERSION as installed in $PY's environment
    "$PY" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}

rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/cache"
PINS=()
for p in "${PACKAGES[@]}"; do PINS+=("$(pin "$p")"); done
echo "downloading: ${PINS[*]}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/wheels" "${PINS[@]}"
for p in "${SDIST_ONLY[@]}"; do
    pinned=$(pin "$p")
    echo "building the wheel of $pinned"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST/wheels" "$pinned"
done

# The tiny model: the one `harness run` uses here ($HARNESS_CACHE_DIR, else ~/.cache/harness), else the tests'
# (.cache/test), else built now (~1 min).
"$PY" - "$DEST/cache" <<'EOF'
import os
import shutil
import sys
from pathlib import Path

from harness.models import recipe_hash, resolve_model_path, tiny_recipe

name = f"tiny-{recipe_hash(tiny_recipe(None))}"
candidates = [Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "harness"), Path(".cache/test")]
found = next((c for c in candidates if (c / name / "build_info.json").exists()), None)
src = Path(resolve_model_path("tiny", cache_dir=found or candidates[0]))
shutil.copytree(src, Path(sys.argv[1]) / name)
print(f"tiny model: {src}")
EOF

ls -l "$DEST/wheels"
wheels=$(du -sb "$DEST" | cut -f1)
# What travels besides: tracked files and untracked ones git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
total=$((wheels + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_wheels: $(mib "$wheels") (wheels + tiny model); working tree: $(mib "$tree"); total sent: $(mib "$total")"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over the ${LIMIT_MIB} MiB that can be sent along" >&2
    exit 1
fi
