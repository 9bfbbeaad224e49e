#!/usr/bin/env bash
# The whole GPU picture in one run, on a machine with a GPU, its own CUDA build of torch and
# possibly no package registry: builds the extension for the local GPU only, runs the GPU tests,
# CUDA-graph capture tests, the Triton tile sweep, the host-time job and the GPU benchmarks,
# each stage under a time limit, logs in $1 (default: $OUT, else benchmarks/results/gpu-check).
#
#   bash scripts/gpu_check.sh [log dir] [stages...]
#   stages: build tests sweep host bench (the default), and mma (only when named)
#
# About 8 minutes on an H100/H200 with 16 cores; `mma` takes up to ~7 more. A stage that fails or
# runs out of time is reported and the next one runs; the exit status is that of the first failed
# stage. `mma` is the first GPU check of the tensor-core kernels (LOR2C_CUDA_MMA=1,
# csrc/cuda/lor2c_mma.cuh; never run on a GPU before), in four parts that MMA_PARTS selects
# (default: all): `sanitize` (compute-sanitizer memcheck and racecheck of
# scripts/cuda_mma_smoke.py), `tests` (the cuda tests with the path on), `times` (GPU time per
# kernel, scripts/cuda_kernel_times.py, both paths) and `bench` (bench_lor2c.py, r = 16 and 64).
#   bash scripts/gpu_check.sh "$OUT" build mma                          # ~6-8 minutes, or in two:
#   MMA_PARTS="sanitize tests" bash scripts/gpu_check.sh "$OUT" build mma
#   MMA_PARTS="times bench" bash scripts/gpu_check.sh "$OUT" mma    # same machine, still built
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${1:-${OUT:-benchmarks/results/gpu-check}}"
shift || true
STAGES="${*:-build tests sweep host bench}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
export TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import lor2c_ops from here
STATUS=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - start)) s (log: $LOG/$name.log)"
  grep -E "PASS|MISS|passed|failed|error|best " "$LOG/$name.log" | tail -n 40
  [ $rc -ne 0 ] && [ $STATUS -eq 0 ] && STATUS=$rc
  return 0
}

has() { [[ " $STAGES " == *" $1 "* ]]; }

"$PY" - > "$LOG/device.txt" 2>&1 <<'PYEOF'
import torch, triton
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda)
PYEOF
cat "$LOG/device.txt"
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"

if has build; then  # in the background: the sweep needs only Triton
  ( TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" timeout 300 "$PY" setup.py build_ext \
      --inplace > "$LOG/build.log" 2>&1; echo $? > "$LOG/build.rc" ) &
  BUILD_PID=$!
fi
has tests && stage tests-triton "${TESTS_LIMIT:-150}" "$PY" -m pytest -q -n 8 -p no:cacheprovider \
  tests/test_lor2c.py tests/test_share.py tests/test_dcft.py tests/test_cuda_graphs.py \
  tests/test_op_layer.py -k "${TESTS_K:-triton or reference}"
has sweep && stage sweep "${SWEEP_LIMIT:-260}" "$PY" benchmarks/sweep_triton.py \
  --out "$LOG/sweep.json" ${SWEEP_SHAPES:+--shapes "$SWEEP_SHAPES"}
if has build; then
  wait "$BUILD_PID"
  echo "== build: exit $(cat "$LOG/build.rc") (log: $LOG/build.log)"
  tail -n 3 "$LOG/build.log"
fi
has tests && has build && stage tests-cuda 150 "$PY" -m pytest -q -n 8 -p no:cacheprovider \
  tests/test_lor2c.py tests/test_share.py tests/test_dcft.py tests/test_cuda_graphs.py -k cuda
has host && stage host "${HOST_LIMIT:-120}" "$PY" benchmarks/bench_host.py --device cuda --no-save \
  ${HOST_ARGS:-}
has bench && stage bench-lor2c 200 "$PY" benchmarks/bench_lor2c.py --device cuda --no-save
if has mma; then  # the tensor-core kernels (LOR2C_CUDA_MMA=1); MMA_PARTS picks the parts
  part() { [[ " ${MMA_PARTS:-sanitize tests times bench} " == *" $1 "* ]]; }
  if ! has build && ! "$PY" -c "import lor2c_ops._C" 2>/dev/null; then
    echo "== mma: the extension is not built (add the build stage)"
  fi
  if part sanitize && command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      LOR2C_CUDA_MMA=1 stage "mma-$tool" 100 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$PY" scripts/cuda_mma_smoke.py
    done
  fi
  part tests && LOR2C_CUDA_MMA=1 stage tests-cuda-mma 200 "$PY" -m pytest -q -n 8 \
    -p no:cacheprovider tests/test_lor2c.py tests/test_share.py tests/test_dcft.py \
    tests/test_cuda_graphs.py -k "cuda or across_backends"
  if part times; then  # GPU time per kernel (torch profiler): both paths, r = 16 and 64
    stage kernel-times 45 "$PY" scripts/cuda_kernel_times.py
    LOR2C_CUDA_MMA=1 stage kernel-times-mma 45 "$PY" scripts/cuda_kernel_times.py
    LOR2C_CUDA_MMA=1 stage kernel-times-mma-r64 45 "$PY" scripts/cuda_kernel_times.py --r 64
    cat "$LOG"/kernel-times*.log
  fi
  if part bench; then
    LOR2C_CUDA_MMA=1 stage bench-lor2c-mma 150 "$PY" benchmarks/bench_lor2c.py --device cuda \
      --no-save
    LOR2C_CUDA_MMA=1 stage bench-lor2c-mma-r64 150 "$PY" benchmarks/bench_lor2c.py \
      --device cuda --r 64 --p 0 --no-save
  fi
fi
exit $STATUS
