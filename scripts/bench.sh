#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the benchmark suite (benchmarks/run.py) on the default
# device (CUDA when present, else the CPU): a progress bar, each benchmark's table, a summary
# table, and JSON / CSV / Markdown results and PNG plots under benchmarks/results/.
# Extra arguments go to benchmarks/run.py (e.g. --quick, --only lor2c e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh)"
exec "$PY" benchmarks/run.py "$@"
