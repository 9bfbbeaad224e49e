#!/usr/bin/env bash
# Cross-compiles the extension's C++ sources (csrc/*.cpp and csrc/cpu/*.cpp: the CPU kernels, the
# ops' registration and autograd) for aarch64 Linux, the host CPU of NVIDIA Grace (GH200) and AWS
# Graviton machines, so that x86-only code (vector intrinsics, inline assembly) that is not
# behind LOR2C_X86 (csrc/cpu/isa.h) fails here instead of at a user's `pip install`. There the
# CPU kernels run their baseline path (portable vector code) and the scalar dropout mask.
#
# Two passes:
#   1. object files (-O0: inline assembly and intrinsics are checked at every level; -O3 takes
#      minutes longer), against the headers of the torch that scripts/setup.sh set up;
#   2. syntax only, against the headers of the oldest torch pyproject.toml admits
#      ("torch>=X.Y": X.Y.0), taken from its aarch64 wheel (about 90 MB, downloaded once into
#      build/, git-ignored); skipped with a message when the wheel cannot be downloaded.
# Needs aarch64-linux-gnu-g++ (Debian: g++-aarch64-linux-gnu), installed with apt-get when it is
# missing and this runs as root; exits 0 with a skip message when it cannot be had. No aarch64
# machine is needed: nothing is linked or run (the tests under emulation: docs/verified.md).
#
#   scripts/check_aarch64_compile.sh                        # every source
#   scripts/check_aarch64_compile.sh csrc/cpu/lor2c.cpp     # these only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CXX=aarch64-linux-gnu-g++

if ! command -v "$CXX" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check_aarch64_compile: installing g++-aarch64-linux-gnu"
    apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1; } ||
      true
  fi
fi
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "check_aarch64_compile: SKIPPED: $CXX not found (Debian: apt-get install g++-aarch64-linux-gnu)"
  exit 0
fi

PY="$(bash scripts/setup.sh)"
# Python's headers are the host's: the sources use only its C API, whose layout is the same on
# both 64-bit Linux ABIs.
PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# A Debian python's pyconfig.h only includes <$MULTIARCH/pythonX.Y/pyconfig.h>, which for
# aarch64 would need its aarch64 dev package: the host's arch-specific one stands in for it.
SHIM="$TMP/pyconfig-shim"
read -r MULTIARCH PYVER < <("$PY" -c 'import sys, sysconfig
print(sysconfig.get_config_var("MULTIARCH") or "-", "python%d.%d" % sys.version_info[:2])')
HOST_CONFIG="$(dirname "$PY_INC")/$MULTIARCH/$PYVER/pyconfig.h"
mkdir -p "$SHIM/aarch64-linux-gnu/$PYVER"
if [ -f "$HOST_CONFIG" ]; then cp "$HOST_CONFIG" "$SHIM/aarch64-linux-gnu/$PYVER/pyconfig.h"; fi
FLAGS=(-std=c++17 -fno-math-errno -ffp-contract=fast -Wno-psabi -fopenmp -fPIC
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -w)
if [ "$#" -gt 0 ]; then
  SOURCES=("$@")
else
  mapfile -t SOURCES < <(git ls-files 'csrc/*.cpp' | grep -v '^csrc/cuda/')
fi
# shellcheck source=lib_jobs.sh
source "$ROOT/scripts/lib_jobs.sh"
JOBS_TAG=check_aarch64_compile
JOBS_DIR="$TMP"
# compile <label> <mode flags> <torch include dir>: every source, two at a time (lib_jobs.sh).
compile() {
  local label="$1" mode="$2" inc="$3" src i=0
  local incs=(-I "$inc" -I "$inc/torch/csrc/api/include" -I "$PY_INC" -I "$SHIM")
  for src in "${SOURCES[@]}"; do
    # shellcheck disable=SC2086  # mode: one or two flags
    jobs_run "[$label] $src" "$CXX" "${FLAGS[@]}" "${incs[@]}" $mode "$src" -o "$TMP/$i.o"
    i=$((i + 1))
  done
  jobs_wait_all
}

echo "check_aarch64_compile: $("$CXX" --version | head -n 1)"
status_all=0
TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__)')"
compile "torch $TORCH_VER" "-c -O0" "$TORCH_INC" || status_all=1

OLD="$(sed -n 's/.*"torch>=\([0-9]*\.[0-9]*\)".*/\1.0/p' pyproject.toml)"
if [ -z "$OLD" ]; then
  echo "check_aarch64_compile: FAIL pyproject.toml names no \"torch>=X.Y\" dependency"
  exit 1
fi
OLD_DIR="build/aarch64-torch-$OLD"
if [ ! -d "$OLD_DIR/torch/include" ]; then
  mkdir -p "$OLD_DIR"
  if "$PY" -m pip download -q --retries 1 --timeout 30 --no-deps --only-binary=:all: \
      --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 "torch==$OLD" -d "$TMP/wheel" \
      >/dev/null 2>&1; then
    "$PY" - "$TMP/wheel" "$OLD_DIR" <<'EOF'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/torch-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])
EOF
  fi
fi
if [ -d "$OLD_DIR/torch/include" ]; then
  compile "torch $OLD" -fsyntax-only "$OLD_DIR/torch/include" || status_all=1
else
  echo "check_aarch64_compile: SKIPPED [torch $OLD]: its aarch64 wheel could not be downloaded"
fi

if [ "$status_all" != 0 ]; then
  echo "check_aarch64_compile: FAILED"
  exit 1
fi
echo "check_aarch64_compile: all sources compile for aarch64"
