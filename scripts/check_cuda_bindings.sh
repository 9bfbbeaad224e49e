#!/usr/bin/env bash
# Type-checks the ATen glue of the CUDA kernels (csrc/cuda/*_binding.cpp) against the installed
# torch's headers and the CUDA toolkit's runtime headers, with stand-ins for the CUDA math
# libraries' headers (scripts/cuda_stubs). No GPU and no CUDA build of torch needed: this is
# what keeps the bindings compiling on machines that cannot build them. Exits 0 with a skip
# message when nvcc or a python with torch is missing.
#
#   scripts/check_cuda_bindings.sh    # torch from: $PYTHON, else ./.venv, else python3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_bindings: nvcc not found on PATH, skipping"
  exit 0
fi
TORCH_INCLUDES=""
for PY in ${PYTHON:-} "$ROOT/.venv/bin/python" python3; do  # the first with torch
  if TORCH_INCLUDES="$("$PY" -c 'import torch.utils.cpp_extension as c
print(" ".join(c.include_paths()))' 2>/dev/null)"; then
    break
  fi
done
if [ -z "$TORCH_INCLUDES" ]; then
  echo "check_cuda_bindings: no python with torch (\$PYTHON, ./.venv, python3), skipping"
  exit 0
fi
# The toolkit's own include directory, as nvcc reports it (nvcc may be a wrapper script)
CUDA_INCLUDE="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
                sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/ *$//')"
if [ ! -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]; then
  echo "check_cuda_bindings: cannot find the CUDA runtime headers (nvcc said '$CUDA_INCLUDE')"
  exit 1
fi

flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -I "$ROOT/csrc")
for dir in $TORCH_INCLUDES "$ROOT/scripts/cuda_stubs" "$CUDA_INCLUDE"; do
  flags+=(-isystem "$dir")  # their own warnings are not ours
done
status=0
for src in "$ROOT"/csrc/cuda/*_binding.cpp; do
  if "${CXX:-g++}" "${flags[@]}" "$src"; then
    echo "check_cuda_bindings: OK   ${src#$ROOT/}"
  else
    echo "check_cuda_bindings: FAIL ${src#$ROOT/}"
    status=1
  fi
done
exit $status
