#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU: build the package in place, run the GPU tests, run the GPU benchmarks,
# and put every log and CSV under one folder, within a fixed wall-clock budget (default 570 s, under 10 minutes).
#
#   bash benchmarks/gpu/run.sh                 # from the repository root; output in $OUT, else ./gpu-out
#   PYTHON=/path/to/python BUDGET_S=400 bash benchmarks/gpu/run.sh
#
# Expects torch with CUDA, triton and nvcc already installed (no internet): nothing is downloaded. Each step runs
# under `timeout` with what is left of the budget, so a hung build or kernel cannot eat the rest; a failed step
# is recorded in status.tsv and the script goes on. Exit status: 0 if every step that ran passed, else 1.
set -u

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${BUDGET_S:-570}
DEADLINE=$((SECONDS + BUDGET_S))
STATUS="$OUT/status.tsv"
printf 'step\trc\tseconds\tlog\n' >"$STATUS"
FAILED=0

left() { echo $((DEADLINE - SECONDS)); }

# step NAME MAX_SECONDS CMD...: runs CMD with min(MAX_SECONDS, budget left - 15 s), logging to $OUT/NAME.log.
step() {
    local name=$1 max=$2
    shift 2
    local limit=$(($(left) - 15))
    ((limit > max)) && limit=$max
    if ((limit < 20)); then
        printf '%s\tskipped(no time left)\t0\t-\n' "$name" >>"$STATUS"
        echo "[gpu/run.sh] $name: skipped, budget spent" >&2
        return 0
    fi
    echo "[gpu/run.sh] $name (limit ${limit}s): $*" >&2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$name.log" >>"$STATUS"
    if ((rc != 0)); then
        FAILED=1
        echo "[gpu/run.sh] $name: rc=$rc (124 = timed out), last lines:" >&2
        tail -n 15 "$OUT/$name.log" >&2
    fi
    return $rc
}

# ---- environment ------------------------------------------------------------------------------------------------
{
    date -u
    git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "git revision unknown"
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    nvcc --version 2>&1 || echo "nvcc not found"
    "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for dist in ("triton", "pytest", "numpy", "transformers", "scipy", "tqdm", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} >"$OUT/env.txt"
cat "$OUT/env.txt" >&2

# ---- build ------------------------------------------------------------------------------------------------------
# In place (no pip, no network): the extension lands in sparse/, with the CUDA sources when torch has CUDA.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! step build 330 "$PY" setup.py build_ext --inplace; then
    echo "[gpu/run.sh] build failed: tests and benchmarks of the compiled ops will fail too; going on for Triton" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
step import 60 "$PY" -c "import sparse, sparse._ext as e; print(sparse.__file__, 'extension loaded:', e.available()); \
print(e._C.has_cuda() if e.available() else e._IMPORT_ERROR)"

# ---- GPU tests --------------------------------------------------------------------------------------------------
shopt -s nullglob
GPU_TESTS=(tests/test_gpu_*.py)
if ((${#GPU_TESTS[@]} == 0)); then
    printf 'tests\tskipped(no tests/test_gpu_*.py)\t0\t-\n' >>"$STATUS"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
    printf 'tests\tskipped(pytest not installed)\t0\t-\n' >>"$STATUS"
    FAILED=1
else
    step tests 200 "$PY" -m pytest -q -x --junitxml="$OUT/tests.xml" "${GPU_TESTS[@]}"
fi

# ---- GPU benchmarks ---------------------------------------------------------------------------------------------
# Whichever of them exist run, each with an equal share of the time left, writing its CSV under $OUT: a benchmark
# whose --help offers --out gets the folder, one that offers --csv gets a file path.
BENCHES=()
for b in gpu_triton gpu_cuda; do
    [[ -f benchmarks/$b.py ]] && BENCHES+=("$b")
done
if ((${#BENCHES[@]} == 0)); then
    printf 'benchmarks\tskipped(no benchmarks/gpu_*.py)\t0\t-\n' >>"$STATUS"
fi
for i in "${!BENCHES[@]}"; do
    b=${BENCHES[$i]}
    share=$((($(left) - 30) / (${#BENCHES[@]} - i)))
    help=$("$PY" -m "benchmarks.$b" --help 2>/dev/null)
    if grep -q -- "--out" <<<"$help"; then
        args=(--out "$OUT")
    elif grep -q -- "--csv" <<<"$help"; then
        args=(--csv "$OUT/$b.csv")
    else
        args=()
    fi
    step "$b" "$share" "$PY" -m "benchmarks.$b" "${args[@]}"
done

# ---- summary ----------------------------------------------------------------------------------------------------
# One summary.md over the CSVs in the harness schema (others are listed as left out in report.log).
CSVS=("$OUT"/*.csv)
if ((${#CSVS[@]} > 0)); then
    step report 60 "$PY" -m benchmarks --report "${CSVS[@]}" --out "$OUT"
fi
echo "[gpu/run.sh] done in ${SECONDS}s; status:" >&2
column -t -s $'\t' "$STATUS" >&2 2>/dev/null || cat "$STATUS" >&2
exit $FAILED
