#!/usr/bin/env bash
# Compile-checks the raw CUDA kernels (csrc/cuda/*.cu; not the ATen binding, which needs a CUDA
# build of torch) with nvcc for sm_80 and sm_90, twice: plain, and with the half-precision
# macros torch's CUDAExtension defines (__CUDA_NO_HALF_OPERATORS__ etc.). Warnings are shown,
# not fatal; objects go to a temporary directory. No GPU needed. Exits 0 with a skip message
# when nvcc is not on PATH.
#
#   scripts/check_cuda_compile.sh            # all csrc/cuda/*.cu
#   NVCC_EXTRA="-Xptxas -v" scripts/check_cuda_compile.sh   # also print registers / spills
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found on PATH, skipping"
  exit 0
fi

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files, nothing to do"
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90)
BASE=(-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xcompiler -Wall -I "$ROOT/csrc")
TORCH_MACROS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
read -r -a EXTRA <<< "${NVCC_EXTRA:-}"

echo "check_cuda_compile: $(nvcc --version | tail -n 1)"
status=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  for variant in plain torch; do
    flags=("${BASE[@]}")
    [ "$variant" = torch ] && flags+=("${TORCH_MACROS[@]}")
    start=$SECONDS
    if nvcc -c "${flags[@]}" "${ARCHS[@]}" "${EXTRA[@]}" "$src" -o "$TMP/$name.$variant.o"; then
      echo "check_cuda_compile: OK   ${src#$ROOT/} ($variant, sm_80+sm_90, $((SECONDS - start)) s)"
    else
      echo "check_cuda_compile: FAIL ${src#$ROOT/} ($variant)"
      status=1
    fi
  done
done
exit $status
