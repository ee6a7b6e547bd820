#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU: build the package in place, run the GPU tests, run the GPU benchmarks,
# and put the results under $OUT, within a fixed wall-clock budget (BUDGET_S, default 420 s).
#
# The device command (one line, from the repository root; benchmarks/gpu/README.md has the time plan and the
# second-run commands), with the device call's timeout_s at 450 (the script ends by itself by about BUDGET_S + 10 s):
#   PYTHON=python3 OUT=$OUT BUDGET_S=420 bash benchmarks/gpu/run.sh
# Without a GPU the same command checks the plumbing: the GPU tests skip, the benchmarks are recorded as skipped.
#
# Variables: PYTHON (default python3), OUT (default ./gpu-out), BUDGET_S, MAX_JOBS (default nproc),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own capability, else setup.py's "8.0;9.0"), STEPS (default "all"; or a
# subset of "build import tests bench_cuda bench_triton" for a second, shorter run on a machine that has the build).
#
# What $OUT holds at the end (at most 6 files, for a transfer limit of 8): status.tsv (one row per step: rc,
# seconds, log, and the pytest summary line), logs.tar.gz (every log, env.txt, the junit XMLs, report files;
# re-packed after every step, so a kill still leaves the logs of the finished steps), gpu_cuda.csv and
# gpu_triton.csv (written row by row as measured), summary.md. Nothing is downloaded. Each step runs under `timeout`
# with what is left of the budget, so a hung build or kernel cannot eat the rest; a failed step is recorded in
# status.tsv and the script goes on. Exit status: 0 if every step that ran passed, else 1.
set -u

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-all}
DEADLINE=$((SECONDS + BUDGET_S))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sparsekern-gpu.XXXXXX")
rm -f "$OUT"/status.tsv "$OUT"/logs.tar.gz "$OUT"/gpu_cuda.csv "$OUT"/gpu_triton.csv "$OUT"/summary.md
STATUS="$OUT/status.tsv"
printf 'step\trc\tseconds\tlog\tsummary\n' >"$STATUS"
export PYTHONUNBUFFERED=1

left() { echo $((DEADLINE - SECONDS)); }
want() { [[ " $STEPS " == *" all "* || " $STEPS " == *" $1 "* ]]; }
pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }
trap pack EXIT

# step NAME MAX_SECONDS CMD...: runs CMD with min(MAX_SECONDS, budget left - 15 s), logging to $WORK/NAME.log.
# Its status.tsv row carries the last pytest-style summary line of the log, if any.
step() {
    local name=$1 max=$2
    shift 2
    local limit=$(($(left) - 15))
    ((limit > max)) && limit=$max
    if ((limit < 20)); then
        printf '%s\tskipped(no time left)\t0\t-\t\n' "$name" >>"$STATUS"
        echo "[gpu/run.sh] $name: skipped, budget spent" >&2
        return 0
    fi
    echo "[gpu/run.sh] $name (limit ${limit}s): $*" >&2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    local summary
    summary=$(grep -E '^=*[ ]*[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$WORK/$name.log" |
        tail -n 1 | tr -d '=\t' | sed 's/^ *//; s/ *$//')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$name.log" "${summary# }" >>"$STATUS"
    if ((rc != 0)); then
        echo "[gpu/run.sh] $name: rc=$rc (124 = timed out), last lines:" >&2
        tail -n 15 "$WORK/$name.log" >&2
    else
        echo "[gpu/run.sh] $name: ok in $((SECONDS - t0))s ${summary}" >&2
    fi
    return $rc
}

# ---- environment ------------------------------------------------------------------------------------------------
{
    date -u
    echo "git revision: ${GIT_REV:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "nproc $(nproc); budget ${BUDGET_S}s; steps: $STEPS"
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi not found or failed"
    nvcc --version 2>&1 || echo "nvcc not found"
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for dist in ("triton", "pytest", "pytest-xdist", "pytest-timeout", "numpy", "scipy", "hypothesis", "transformers",
             "setuptools", "ninja", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} >"$WORK/env.txt"
cat "$WORK/env.txt" >&2
CAP=$(timeout 60 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')" 2>/dev/null)
HAVE_GPU=0
[[ -n $CAP ]] && HAVE_GPU=1
pack

# ---- build ------------------------------------------------------------------------------------------------------
# In place (no pip, no network): the extension lands in sparse/, with the CUDA sources when torch has CUDA. Only
# for this GPU's architecture (sm_80 and sm_90 are both compile-checked without a GPU by tests/test_cuda_build.py).
# Measured without a GPU (2 busy cores, nvcc 13.0): bsr.cu 16 s for sm_90 alone (43 s for sm_80+sm_90), the other
# .cu files 4-12 s, the largest C++ files about 30 s each; with one job per file on 16 cores the build should take
# about 40-90 s. The cap of 240 s only stops a hung compiler.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} && -n $CAP ]]; then
    export TORCH_CUDA_ARCH_LIST=$CAP
fi
if want build; then
    step build 240 "$PY" setup.py build_ext --inplace || echo "[gpu/run.sh] build failed: the CUDA tests skip" \
        "and benchmarks.gpu_cuda fails; going on for Triton" >&2
    pack
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if want import; then
    step import 60 "$PY" -c "import sparse, sparse._ext as e; print(sparse.__file__, 'extension loaded:', e.available()); \
print('has_cuda:', e._C.has_cuda() if e.available() else e._IMPORT_ERROR); import sparse.triton_backend; print('triton backend ok')"
    pack
fi

# ---- GPU tests --------------------------------------------------------------------------------------------------
# No -x: every failure of the run is wanted. The groups run side by side as separate processes (the GPU has room,
# the CPU cores compile), so a kernel that corrupts its CUDA context (an illegal address is sticky: every later
# call in that process fails) takes down only its own group. CUDA_LAUNCH_BLOCKING=1 makes a kernel's error surface
# in the test that launched it. Triton's 12 tests are dominated by JIT compiles (about 150 kernels, one core each;
# the two torch.compile tests also run Inductor), hence one pytest-xdist worker per test when xdist is installed
# (plain -n, no newer --dist mode). pytest-timeout, when installed, dumps the stacks of a test hung for 140 s (the
# thread method: a kernel that never returns cannot be interrupted by a signal) before the group's 150 s are up.
if want tests; then
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        printf 'tests\tmissing(pytest not installed)\t0\t-\t\n' >>"$STATUS"
    else
        common=(-v -p no:cacheprovider --durations=10)  # -v: each result is in the log as it comes, even if killed
        "$PY" -c "import pytest_timeout" 2>/dev/null && common+=(--timeout=140 --timeout-method=thread)
        xdist=()
        "$PY" -c "import xdist" 2>/dev/null && ((HAVE_GPU)) && xdist=(-n 12)
        cuda=tests/test_gpu_cuda.py
        triton=tests/test_gpu_triton.py
        export CUDA_LAUNCH_BLOCKING=1
        tmax=150
        step tests_cuda_bsr $tmax "$PY" -m pytest "${common[@]}" --junitxml="$WORK/tests_cuda_bsr.xml" $cuda \
            -k "test_bsr_" &
        step tests_cuda_balanced $tmax "$PY" -m pytest "${common[@]}" --junitxml="$WORK/tests_cuda_balanced.xml" $cuda \
            -k "test_balanced_ops" &
        step tests_cuda_nm24 $tmax "$PY" -m pytest "${common[@]}" --junitxml="$WORK/tests_cuda_nm24.xml" $cuda \
            -k "test_nm24 or test_two_four" &
        step tests_cuda_csr $tmax "$PY" -m pytest "${common[@]}" --junitxml="$WORK/tests_cuda_csr.xml" $cuda \
            -k "test_csr_" &
        step tests_cuda_other $tmax "$PY" -m pytest "${common[@]}" --junitxml="$WORK/tests_cuda_other.xml" $cuda \
            -k "not test_bsr_ and not test_balanced_ops and not test_nm24 and not test_two_four and not test_csr_" &
        step tests_triton $tmax "$PY" -m pytest "${common[@]}" "${xdist[@]}" --junitxml="$WORK/tests_triton.xml" $triton &
        wait
        unset CUDA_LAUNCH_BLOCKING
    fi
    pack
fi

# ---- GPU benchmarks ---------------------------------------------------------------------------------------------
# One at a time (timings). Each writes its CSV straight into $OUT row by row and stops by itself at --max-seconds
# (its cap less 10 s), so a slow run still leaves its first rows. gpu_cuda first: about 1.5 minutes. Without a GPU
# both are recorded as skipped (tests/test_benchmarks.py checks their plumbing on CPU tensors).
if ((!HAVE_GPU)); then
    for b in bench_cuda bench_triton; do
        want $b && printf '%s\tskipped(no GPU)\t0\t-\t\n' $b >>"$STATUS"
    done
elif want bench_cuda; then
    limit=$(($(left) - 15))
    ((limit > 120)) && limit=120
    step bench_cuda 120 "$PY" -m benchmarks.gpu_cuda --out "$OUT" --max-seconds $((limit - 10))
    pack
fi
if ((HAVE_GPU)) && want bench_triton; then
    limit=$(($(left) - 45))  # 30 s kept for the report and the packing
    ((limit > 300)) && limit=300
    step bench_triton $limit "$PY" -m benchmarks.gpu_triton --csv "$OUT/gpu_triton.csv" --max-seconds $((limit - 10))
    pack
fi

# ---- summary ----------------------------------------------------------------------------------------------------
# summary.md over the CSVs in the harness schema (gpu_cuda.csv; gpu_triton.csv has its own columns and is listed as
# left out in report.log). The plots go into the log archive.
CSVS=()
for c in "$OUT"/gpu_cuda.csv "$OUT"/gpu_triton.csv; do
    [[ -s $c ]] && CSVS+=("$c")
done
if ((${#CSVS[@]} > 0)); then
    mkdir -p "$WORK/report"
    step report 30 "$PY" -m benchmarks --report "${CSVS[@]}" --out "$WORK/report" &&
        [[ -f $WORK/report/summary.md ]] && cp "$WORK/report/summary.md" "$OUT/summary.md"
fi
pack
echo "[gpu/run.sh] done in ${SECONDS}s; status:" >&2
column -t -s $'\t' "$STATUS" >&2 2>/dev/null || cat "$STATUS" >&2
# Failed: any step whose rc is a number other than 0, or a required tool missing.
if awk -F'\t' 'NR > 1 && ($2 ~ /^missing/ || ($2 ~ /^[0-9]+$/ && $2 != 0)) { bad = 1 } END { exit bad ? 0 : 1 }' "$STATUS"; then
    exit 1
fi
exit 0
