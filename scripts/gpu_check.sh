#!/usr/bin/env bash
# One-command check of kvbm's GPU data path, for a GPU machine (H100/H200, CUDA 13, CuPy):
# runs the GPU tests (every stored and loaded byte compared, all layouts, TP 1 and 2, every
# copy strategy), then the copy benchmark, whose table is printed last.
#
# Usage, from anywhere:  scripts/gpu_check.sh [--quick] [--dry-run]
#   --dry-run  check the plumbing on a machine without a GPU (imports, plans, test collection)
#   --quick    fewer benchmark repetitions
#   PYTHON     the interpreter to use (default python3: the machine's, with CuPy and numpy;
#              torch is optional). Nothing is installed: the tested modules need only
#              numpy and CuPy (+ pytest for the tests), not kvbm's leader dependencies.
#   OUT        if set, the test report (gpu_tests.xml) and the figures (gpu_copy.json) go there.
# Exit status: 0 all passed; 1 tests or benchmark failed; 2 no usable GPU (or no numpy/CuPy).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DRY=0
QUICK=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --quick) QUICK=(--quick) ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 64 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
die() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "no $PY on PATH (set PYTHON=...)"
"$PY" -c "import numpy" 2>/dev/null || die "numpy is not importable by $PY"
"$PY" -c "import kvbm.worker.cuda_copy, kvbm.bench.gpu_copy" || die "the kvbm GPU modules do not import (see above)"

if [ "$DRY" = 1 ]; then
    set -e
    bash -n "$0"
    "$PY" -m py_compile kvbm/worker/cuda_copy.py kvbm/bench/gpu_copy.py tests/test_cuda_copy.py
    "$PY" -m kvbm.bench.gpu_copy --dry-run
    if "$PY" -c "import pytest" 2>/dev/null; then
        "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda_copy.py | tail -n 1
    else
        echo "gpu_check: pytest is not installed for $PY: the GPU tests could not run here"
    fi
    echo "gpu_check: dry run OK (no GPU used)"
    exit 0
fi

"$PY" - <<'EOF' || exit 2
import sys
try:
    import cupy
except ImportError as e:
    sys.exit(f"gpu_check: no CUDA GPU usable: CuPy is not installed for {sys.executable} ({e})")
if not cupy.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU: cupy.cuda.is_available() is False (no device, or no driver); "
             "this check needs a GPU machine (use --dry-run elsewhere)")
p = cupy.cuda.runtime.getDeviceProperties(0)
name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
print(f"gpu_check: {name}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver "
      f"{cupy.cuda.runtime.driverGetVersion()}, CuPy {cupy.__version__}, Python {sys.version.split()[0]}")
try:
    import torch
    print(f"gpu_check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
except ImportError:
    print("gpu_check: torch not installed: the torch-tensor tests will be skipped")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    echo "gpu_check: GPU tests"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_copy.py \
        ${OUT:+--junitxml="$OUT/gpu_tests.xml"} || status=1
else
    echo "gpu_check: pytest is not installed for $PY: cannot run the GPU tests" >&2
    status=1
fi
[ "$status" = 0 ] || echo "gpu_check: GPU TESTS FAILED (see above); running the benchmark anyway" >&2

echo "gpu_check: benchmark"
timeout 120 "$PY" -m kvbm.bench.gpu_copy "${QUICK[@]}" ${OUT:+--json "$OUT/gpu_copy.json"} || status=1
exit "$status"
