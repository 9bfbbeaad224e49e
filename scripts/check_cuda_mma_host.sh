#!/usr/bin/env bash
# Host-side execution check of the tensor-core LoR2C kernels (csrc/cuda/lor2c_mma.cuh), no GPU:
# builds scripts/cuda_host_check/mma_host_check.cpp with g++ (the kernels' own source, run by a
# CUDA-thread emulator with a scalar stand-in of nvcuda::wmma; see that file) and runs it against
# an fp64 reference. Needs nvcc's include directory (for cuda_fp16.h / cuda_bf16.h); exits 0 with a
# skip message when nvcc is not on PATH.
#
#   scripts/check_cuda_mma_host.sh            every case, threads in order, then in reverse order
#                                             (~1 min after a ~45 s build)
#   scripts/check_cuda_mma_host.sh --quick    4 shapes x 2 dtype pairs, both orders
#   scripts/cuda_host_check/mutations.sh      shows that the check catches deliberate bugs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_mma_host: nvcc not found on PATH, skipping"
  exit 0
fi
CUDA_INCLUDE="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
                sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/ *$//')"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"${CXX:-g++}" -std=c++20 -O1 -Wall -Wno-unknown-pragmas -I "$ROOT/csrc" -isystem "$CUDA_INCLUDE" \
  "$ROOT/scripts/cuda_host_check/mma_host_check.cpp" -o "$TMP/mma_host_check"
"$TMP/mma_host_check" "$@"
"$TMP/mma_host_check" --reverse "$@"
