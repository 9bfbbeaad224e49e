#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite; extra arguments go to pytest.
# Triton kernels run on CPU tensors through the Triton interpreter when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh)"
exec "$PY" -m pytest tests -q "$@"
