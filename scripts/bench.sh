#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the benchmarks on the default device (CUDA when present,
# else the CPU); extra arguments go to every benchmark script (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh)"
for bench in benchmarks/bench_*.py; do
  echo "== $bench"
  "$PY" "$bench" "$@"
done
