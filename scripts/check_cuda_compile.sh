#!/usr/bin/env bash
# Compile-checks the raw CUDA kernels (csrc/cuda/*.cu; not the ATen bindings, which need a CUDA
# build of torch: scripts/check_cuda_bindings.sh type-checks those) with nvcc for sm_80 and sm_90,
# twice: plain, and with the half-precision macros torch's CUDAExtension defines
# (__CUDA_NO_HALF_OPERATORS__ etc.). Before that, three quick checks of the layout
# (csrc/cuda/README.md):
#   - no kernel source or kernel header includes torch, ATen or c10 (only *_binding.cpp and
#     binding_common.h may);
#   - every header compiles on its own: the launcher headers (common.h, *_kernels.h) with the
#     host compiler alone, as the bindings include them, and the device headers (*.cuh) with nvcc;
#   - the sources are csrc/cuda/{lor2c_fwd,lor2c_bwd,lor2c_multi_plan,dcft}.cu (the file list of
#     the README; a missing or unlisted .cu fails).
# Warnings are shown, not fatal; objects go to a temporary directory. No GPU needed. Exits 0 with
# a skip message when nvcc is not on PATH.
#
#   scripts/check_cuda_compile.sh                      # the layout checks, then every .cu
#   scripts/check_cuda_compile.sh csrc/cuda/dcft.cu    # the layout checks, then these only
#   NVCC_EXTRA="-Xptxas -v" scripts/check_cuda_compile.sh   # also print registers / spills
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/csrc/cuda"
EXPECTED=(dcft.cu lor2c_bwd.cu lor2c_fwd.cu lor2c_multi_plan.cu)  # sorted

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found on PATH, skipping"
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

# ---- layout ----------------------------------------------------------------------------------
shopt -s nullglob
found=()
for src in "$CUDA_DIR"/*.cu; do found+=("$(basename "$src")"); done
if [ "${found[*]}" != "${EXPECTED[*]}" ]; then
  echo "check_cuda_compile: FAIL csrc/cuda/*.cu is '${found[*]}', expected '${EXPECTED[*]}'" \
       "(update EXPECTED here and the layout in csrc/cuda/README.md together)"
  status=1
fi

for f in "$CUDA_DIR"/*.cu "$CUDA_DIR"/*.cuh "$CUDA_DIR"/common.h "$CUDA_DIR"/*_kernels.h; do
  if grep -nE '^\s*#\s*include\s*[<"](torch|ATen|c10)/' "$f"; then
    echo "check_cuda_compile: FAIL ${f#$ROOT/} includes torch: kernels and their headers stay" \
         "torch-free (ATen belongs in *_binding.cpp / binding_common.h)"
    status=1
  fi
done

# The toolkit's include directory, as nvcc reports it (nvcc may be a wrapper script)
CUDA_INCLUDE="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
                sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/ *$//')"
for h in "$CUDA_DIR"/common.h "$CUDA_DIR"/*_kernels.h; do  # host compiler, as in the bindings
  if printf '#include "%s"\n' "$h" | "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra \
       -I "$ROOT/csrc" -isystem "$CUDA_INCLUDE" -x c++ -; then
    echo "check_cuda_compile: OK   ${h#$ROOT/} (on its own, host compiler)"
  else
    echo "check_cuda_compile: FAIL ${h#$ROOT/} (on its own, host compiler)"
    status=1
  fi
done
for h in "$CUDA_DIR"/*.cuh; do  # nvcc, one architecture: nothing is instantiated here
  printf '#include "%s"\n' "$h" > "$TMP/header.cu"
  if nvcc -c "${BASE[@]}" "${TORCH_MACROS[@]}" -gencode=arch=compute_90,code=sm_90 \
       "$TMP/header.cu" -o "$TMP/header.o"; then
    echo "check_cuda_compile: OK   ${h#$ROOT/} (on its own, nvcc)"
  else
    echo "check_cuda_compile: FAIL ${h#$ROOT/} (on its own, nvcc)"
    status=1
  fi
done

# ---- the kernels -----------------------------------------------------------------------------
if [ $# -gt 0 ]; then
  SOURCES=()
  for f in "$@"; do SOURCES+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"); done
else
  SOURCES=("$CUDA_DIR"/*.cu)
fi
# The two variants of every source compile two at a time (nvcc is single-threaded; CI has 2
# cores): on a 2-core AMD EPYC Zen 3 the serial loop took 15 min of a 32-min CI run.
# shellcheck source=lib_jobs.sh
source "$ROOT/scripts/lib_jobs.sh"
JOBS_TAG=check_cuda_compile
JOBS_DIR="$TMP"
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  for variant in plain torch; do
    flags=("${BASE[@]}")
    [ "$variant" = torch ] && flags+=("${TORCH_MACROS[@]}")
    jobs_run "${src#$ROOT/} ($variant, sm_80+sm_90)" \
      nvcc -c "${flags[@]}" "${ARCHS[@]}" "${EXTRA[@]}" "$src" -o "$TMP/$name.$variant.o"
  done
done
jobs_wait_all || status=1
exit $status
