#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the benchmark suite (benchmarks/run.py) on the default
# device (CUDA when present, else the CPU): a progress bar, each benchmark's table, a summary
# table, and JSON / CSV / Markdown results and PNG plots under benchmarks/results/local/
# (git-ignored; --publish writes them to benchmarks/results/ and updates the README's plots).
# Extra arguments go to benchmarks/run.py (e.g. --quick, --only lor2c e2e, --publish).
# The full suite takes about 4 min on a quiet 2-core Intel Sapphire Rapids (AVX-512) and about
# 14 min on a 2-core AMD EPYC with AVX2 only; --quick 1-2 min (plus setup, under a second
# when nothing changed, a few minutes when the extension has to be built).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup.sh)"
exec "$PY" benchmarks/run.py "$@"
