#!/usr/bin/env bash
# One-call GPU check (`make gpu-check`): build, CUDA tests, compute-sanitizer memcheck and racecheck over
# every CUDA kernel, and the GPU benchmark report, each step logged to OUT_DIR/<step>.log, with
# OUT_DIR/summary.json (each step's status, exit status, seconds, test counts) written however the steps end.
#
#   tools/gpu_check.sh OUT_DIR              # the check (on a machine without a GPU: the CPU-side steps)
#   tools/gpu_check.sh --dry-run OUT_DIR    # no build, no GPU: each step's command resolves (pytest collects)
#
# Steps (a step that fails does not stop the others; the exit status is 1 if any failed or ran out of time):
#   environment  nvidia-smi, python, torch, the GPU torch sees, nvcc and compute-sanitizer versions
#   build        setup.py build_ext into build/gpu-check-ext/ (beside the package's own build, which is left
#                alone), for the visible GPU's architecture only; later steps load it (BAYESVLM_EXT_LIBRARY)
#   cuda-tests   pytest tests -k "cuda or gpu or tf32" (every CUDA case)            -> cuda-tests.xml
#   memcheck     compute-sanitizer memcheck over tests/test_kernel_variants.py -k cuda -> memcheck.xml
#   racecheck    compute-sanitizer racecheck over the same                          -> racecheck.xml
#   bench        BAYESVLM_BENCH_DEVICE=cuda python -m benchmarks.report; its JSON copied into OUT_DIR
# Without a visible GPU the last four are recorded as "skipped: no GPU" after checking that pytest collects
# what they would run. cuda-tests, memcheck and racecheck run side by side; the benchmark runs alone after.
#
# Environment (all optional):
#   PYTHON                  interpreter with torch (default .venv/bin/python if present, else python3)
#   MAX_JOBS                parallel compile jobs (default: the CPU count)
#   GPU_CHECK_ARCH          TORCH_CUDA_ARCH_LIST for the build (default: the visible GPU's, e.g. 9.0;
#                           without a GPU, $TORCH_CUDA_ARCH_LIST or 8.0;9.0)
#   GPU_CHECK_BUDGET        seconds for the whole check (default 530); each step also has its own limit
#                           (GPU_CHECK_<STEP>_S: ENVIRONMENT 60, BUILD 270, TESTS 200, SANITIZE 200, BENCH 300)
#   GPU_CHECK_BENCH_RESERVE seconds kept for the benchmark when the tests start (default 180)
#   GPU_CHECK_TESTS_K       -k of cuda-tests (default "cuda or gpu or tf32")
#   GPU_CHECK_SANITIZE_TESTS, GPU_CHECK_SANITIZE_K   what runs under the sanitizers
#                           (default tests/test_kernel_variants.py, -k cuda)
#   GPU_CHECK_BENCH_K       -k of the benchmarks (default "not per_sample": the per-sample KFAC reference,
#                           a CPU target, takes minutes at the GPU shapes); empty runs them all
#   GPU_CHECK_BENCH_MEMORY  0: the report skips its top-k memory measurements (default 1)
#   GPU_CHECK_SERIAL        1: run cuda-tests, memcheck and racecheck one after another
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -ne 1 ]]; then usage >&2; exit 2; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
if [[ $OUT_DIR == "$ROOT" ]]; then echo "gpu_check.sh: OUT_DIR must not be the repository root" >&2; exit 2; fi

# ---- settings -------------------------------------------------------------------------------------------
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ $PYTHON == */* ]]; then  # absolute, without resolving links (a virtualenv's python is one)
  PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
else
  PYTHON=$(command -v "$PYTHON" || echo "$PYTHON")
fi
export PATH="$(dirname "$PYTHON"):$PATH"  # the interpreter's own ninja and tools first
export PYTHON PYTHONUNBUFFERED=1 OUT_DIR ROOT DRY_RUN
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET=${GPU_CHECK_BUDGET:-530}
BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-180}
MIN_STEP_S=20  # a step with less time left than this is not started
export TESTS_K=${GPU_CHECK_TESTS_K-cuda or gpu or tf32}
export SANITIZE_TESTS=${GPU_CHECK_SANITIZE_TESTS:-tests/test_kernel_variants.py}
export SANITIZE_K=${GPU_CHECK_SANITIZE_K-cuda}
export BENCH_K=${GPU_CHECK_BENCH_K-not per_sample}
export BENCH_MEMORY=${GPU_CHECK_BENCH_MEMORY:-1}
export BUILD_DIR="$ROOT/build/gpu-check-ext"
export PYTEST_FLAGS="-p no:cacheprovider -rfEs"

START_S=$(date +%s)
DEADLINE_S=$((START_S + BUDGET))
TMP=$(mktemp -d)
mkdir -p "$TMP/steps"
export TMP

# Earlier results of this script in OUT_DIR would read as this run's.
for name in environment build cuda-tests memcheck racecheck bench; do
  rm -f "$OUT_DIR/$name.log" "$OUT_DIR/$name.xml"
done
rm -f "$OUT_DIR/summary.json" "$OUT_DIR"/cuda-*.json

finish() {
  local status=$?
  trap - EXIT INT TERM
  "$PYTHON" "$ROOT/tools/gpu_check_summary.py" "$TMP" "$OUT_DIR/summary.json" || status=1
  rm -rf "$TMP"
  exit "$status"
}
trap finish EXIT
trap 'exit 143' INT TERM

# ---- what this machine has ------------------------------------------------------------------------------
# "1 9.0 NVIDIA H200" with a GPU torch can use, "0" without (or without torch).
probe=$(timeout 120 "$PYTHON" -c '
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    major, minor = torch.cuda.get_device_capability(0)
    print(1, f"{major}.{minor}", torch.cuda.get_device_name(0))
else:
    print(0)' 2>/dev/null || echo 0)
read -r GPU GPU_ARCH GPU_NAME <<<"$probe" || true
GPU=${GPU:-0}
if [[ $GPU == 1 ]]; then
  ARCH=${GPU_CHECK_ARCH:-$GPU_ARCH}
else
  ARCH=${GPU_CHECK_ARCH:-${TORCH_CUDA_ARCH_LIST:-8.0;9.0}}
fi
export GPU GPU_NAME ARCH
{
  echo "$([[ $DRY_RUN == 1 ]] && echo dry-run || echo check)" >"$TMP/mode"
  echo "$START_S" >"$TMP/started"
  echo "$BUDGET" >"$TMP/budget_s"
  echo "$GPU" >"$TMP/gpu_visible"
  echo "${GPU_NAME:-}" >"$TMP/gpu"
  echo "$ARCH" >"$TMP/cuda_arch_list"
  echo "$PYTHON" >"$TMP/python"
}
echo "gpu-check: $([[ $GPU == 1 ]] && echo "GPU $GPU_NAME (sm ${GPU_ARCH})" || echo "no GPU visible")," \
  "python $PYTHON, arch list $ARCH, budget ${BUDGET}s, logs in $OUT_DIR$([[ $DRY_RUN == 1 ]] && echo ', dry run')"

# ---- the steps --------------------------------------------------------------------------------------------
# Each runs as `bash -c step_<name>` under `timeout`, output to OUT_DIR/<name>.log; a file KEY written into
# $STEP_DIR becomes the field KEY of that step in summary.json.

collected() {  # pytest --collect-only -q output on stdin -> the number of tests it selected
  sed -n 's/^\([0-9]*\)\(\/[0-9]*\)\{0,1\} tests\{0,1\} collected.*/\1/p' | tail -1
}

step_environment() {
  set -x
  uname -a
  nproc
  free -g || true
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  "$PYTHON" --version
  "$PYTHON" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")'
  "$PYTHON" -c '
import os, platform, sys, torch
for key, value in (("torch", torch.__version__), ("torch_cuda", torch.version.cuda or ""),
                   ("python_version", platform.python_version())):
    with open(os.path.join(sys.argv[1], key), "w") as f:
        print(value, file=f)' "$STEP_DIR"
  if command -v nvcc >/dev/null; then nvcc --version; nvcc --version | tail -1 >"$STEP_DIR/nvcc"; else
    echo "nvcc: not found"; fi
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --version; compute-sanitizer --version | tail -1 >"$STEP_DIR/compute_sanitizer"
  else echo "compute-sanitizer: not found"; fi
  command -v ninja && ninja --version || echo "ninja: not found (the build compiles one file at a time)"
}

EXT_SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null || true)
export EXT_LIBRARY="$BUILD_DIR/lib/bayesvlm_ext/_C${EXT_SUFFIX}"

step_build() {
  set -x
  BAYESVLM_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
    "$PYTHON" setup.py build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/temp"
  ls -l "$EXT_LIBRARY"
  echo "${EXT_LIBRARY#"$ROOT"/}" >"$STEP_DIR/library"
  # The build loads, has its CUDA kernels, and serves CUDA tensors where a GPU is visible.
  BAYESVLM_EXT_LIBRARY="$EXT_LIBRARY" "$PYTHON" -W error::RuntimeWarning -c '
import torch, bayesvlm_ext
info = bayesvlm_ext.build_info()
print("build_info:", info)
assert info["extension"] and info["cuda_kernels"], info
if torch.cuda.is_available():
    assert bayesvlm_ext.backend("cuda") == "cuda", bayesvlm_ext.backend("cuda")'
}

step_build_dry() {
  set -x
  "$PYTHON" -c 'import setuptools, torch.utils.cpp_extension; print("setuptools", setuptools.__version__)'
  "$PYTHON" tools/cuda_toolkit.py
  command -v ninja || echo "ninja: not found"
  test -f setup.py && ls csrc/cuda/*.cu
  set +x
  echo "would run: BAYESVLM_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=$MAX_JOBS $PYTHON setup.py" \
    "build_ext --build-lib $BUILD_DIR/lib --build-temp $BUILD_DIR/temp"
}

# collect_check NAME pytest-arguments...: the selection collects without errors and is not empty.
collect_check() {
  { set +x; } 2>/dev/null
  echo "+ $* --collect-only -q"
  local out n
  out=$("$@" --collect-only -q 2>&1) || { echo "$out"; echo "collection failed"; return 1; }
  echo "$out"
  n=$(echo "$out" | collected)
  echo "${n:-0}" >"$STEP_DIR/collected"
  if [[ ${n:-0} -eq 0 ]]; then echo "nothing collected"; return 1; fi
  echo "collected $n"
}

step_cuda_tests() {
  set -x
  # --continue-on-collection-errors: a test file that cannot import here is an error, not the end of the run
  "$PYTHON" -m pytest tests -k "$TESTS_K" $PYTEST_FLAGS -v --continue-on-collection-errors \
    --junitxml "$OUT_DIR/cuda-tests.xml"
}

step_cuda_tests_dry() {
  set -x
  # BAYESVLM_TEST_DEVICES names the CUDA device without one, so that the CUDA cases are collected.
  BAYESVLM_TEST_DEVICES=cpu,cuda collect_check "$PYTHON" -m pytest tests -k "$TESTS_K" $PYTEST_FLAGS
}

sanitize() {  # sanitize TOOL
  set -x
  command -v compute-sanitizer
  local flags=(--tool "$1" --error-exitcode 1) help
  # Failed CUDA API calls (torch's own probes) are not this step's concern: a launch of ours that fails raises
  # in its test anyway.
  help=$(compute-sanitizer --help 2>&1 || true)
  if [[ $help == *--report-api-errors* ]]; then flags+=(--report-api-errors no); fi
  # One cudaMalloc per tensor (no caching allocator), so that memcheck sees every buffer's own bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer "${flags[@]}" \
    "$PYTHON" -m pytest $SANITIZE_TESTS ${SANITIZE_K:+-k "$SANITIZE_K"} $PYTEST_FLAGS -v \
    --junitxml "$OUT_DIR/$1.xml"
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

step_sanitize_dry() {
  set -x
  command -v compute-sanitizer || echo "compute-sanitizer: not found here"
  BAYESVLM_TEST_DEVICES=cpu,cuda collect_check "$PYTHON" -m pytest $SANITIZE_TESTS ${SANITIZE_K:+-k "$SANITIZE_K"} \
    $PYTEST_FLAGS
}
step_memcheck_dry() { step_sanitize_dry; }
step_racecheck_dry() { step_sanitize_dry; }

step_bench() {
  set -x
  local args=()
  if [[ $BENCH_MEMORY == 0 ]]; then args+=(--no-memory); fi
  if [[ -n $BENCH_K ]]; then args+=(-k "$BENCH_K"); fi
  BAYESVLM_BENCH_DEVICE=cuda "$PYTHON" -m benchmarks.report "${args[@]}" | tee "$STEP_DIR/.report"
  # "wrote benchmarks/results/<device>.json": a copy into OUT_DIR, to commit from there
  local written
  written=$(sed -n 's/^wrote //p' "$STEP_DIR/.report" | tail -1)
  test -n "$written"
  cp "$ROOT/$written" "$OUT_DIR/"
  basename "$written" >"$STEP_DIR/json"
}

step_bench_dry() {
  set -x
  "$PYTHON" -m benchmarks.report --help >/dev/null
  BAYESVLM_BENCH_DEVICE=cuda collect_check "$PYTHON" -m pytest benchmarks --benchmark-only \
    ${BENCH_K:+-k "$BENCH_K"} $PYTEST_FLAGS
}

export -f collected collect_check step_environment step_build step_build_dry step_cuda_tests step_cuda_tests_dry \
  sanitize step_memcheck step_racecheck step_sanitize_dry step_memcheck_dry step_racecheck_dry step_bench \
  step_bench_dry

INDEX=0
BUILD_OK=0

# run_step NAME KIND LIMIT_S [JUNIT]: KIND cpu (runs anywhere) or gpu (needs a visible GPU and the build).
run_step() {
  local name=$1 kind=$2 limit=$3 junit=${4:-}
  INDEX=$((INDEX + 1))
  local dir
  dir="$TMP/steps/$(printf %02d "$INDEX")-$name"
  mkdir -p "$dir"
  local fn="step_${name//-/_}" status=""
  echo "$name" >"$dir/name"
  echo "$name.log" >"$dir/log"
  if [[ -n $junit ]]; then echo "$junit" >"$dir/junit"; fi
  if [[ $DRY_RUN == 1 || ($kind == gpu && $GPU != 1) ]]; then
    # Not run for real here: its dry form (the selection collects); on a full run, "skipped: no GPU".
    if [[ $(type -t "${fn}_dry") == function ]]; then fn="${fn}_dry"; fi
    [[ $DRY_RUN == 1 ]] || status="skipped: no GPU"
    rm -f "$dir/junit"
  elif [[ $kind == gpu && $BUILD_OK != 1 ]]; then
    echo "skipped: build failed" >"$dir/status"
    echo "gpu-check: $name skipped (the build failed)"
    return 0
  fi
  local left=$((DEADLINE_S - $(date +%s)))
  if ((left < limit)); then limit=$left; fi
  if ((limit < MIN_STEP_S)); then
    echo "skipped: out of time" >"$dir/status"
    echo "gpu-check: $name skipped: out of time (a limit of ${limit}s)"
    return 0
  fi
  echo "$limit" >"$dir/timeout_s"
  echo "$fn" >"$dir/function"
  echo "gpu-check: $name ... (limit ${limit}s, log $OUT_DIR/$name.log)"
  local t0 t1 rc=0
  t0=$(date +%s%N)
  STEP_DIR="$dir" timeout --kill-after=15 "$limit" bash -c "set -euo pipefail; $fn" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  t1=$(date +%s%N)
  echo "$rc" >"$dir/exit_status"
  echo "$(((t1 - t0) / 1000000))" >"$dir/ms"
  if [[ -z $status ]]; then
    if [[ $rc == 0 ]]; then status=passed; elif [[ $rc == 124 || $rc == 137 ]]; then status="timed out"; else
      status=failed; fi
  elif [[ $rc != 0 ]]; then
    status=failed  # its command does not even resolve here
  fi
  echo "$status" >"$dir/status"
  echo "gpu-check: $name $status (exit status $rc, $(((t1 - t0) / 1000000000))s)"
}

run_step environment cpu "${GPU_CHECK_ENVIRONMENT_S:-60}"
run_step build cpu "${GPU_CHECK_BUILD_S:-270}"
if [[ $DRY_RUN == 0 && $(cat "$TMP/steps/02-build/status") == passed ]]; then
  BUILD_OK=1
  export BAYESVLM_EXT_LIBRARY="$EXT_LIBRARY"  # every later step (and its subprocesses) loads this build
fi

# The tests and both sanitizers side by side (each mostly host-bound, the GPU shared), within the budget
# less what the benchmark keeps; a third of the CPUs each.
DEADLINE_ALL=$DEADLINE_S
DEADLINE_S=$((DEADLINE_S - BENCH_RESERVE))
threads=$(($(nproc) / 3))
export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
sanitize_s=${GPU_CHECK_SANITIZE_S:-200}
if [[ ${GPU_CHECK_SERIAL:-0} == 1 ]]; then
  run_step cuda-tests gpu "${GPU_CHECK_TESTS_S:-200}" cuda-tests.xml
  run_step memcheck gpu "$sanitize_s" memcheck.xml
  run_step racecheck gpu "$sanitize_s" racecheck.xml
else
  run_step cuda-tests gpu "${GPU_CHECK_TESTS_S:-200}" cuda-tests.xml &
  pids=($!)
  INDEX=$((INDEX + 1))
  run_step memcheck gpu "$sanitize_s" memcheck.xml &
  pids+=($!)
  INDEX=$((INDEX + 1))
  run_step racecheck gpu "$sanitize_s" racecheck.xml &
  pids+=($!)
  INDEX=$((INDEX + 1))
  for pid in "${pids[@]}"; do wait "$pid" || true; done
fi
unset OMP_NUM_THREADS
DEADLINE_S=$DEADLINE_ALL

run_step bench gpu "${GPU_CHECK_BENCH_S:-300}"

# Exit status: 1 if a step failed, timed out or was not reached in time.
if grep -qxE 'failed|timed out|skipped: out of time|skipped: build failed' "$TMP"/steps/*/status; then
  exit 1
fi
exit 0
