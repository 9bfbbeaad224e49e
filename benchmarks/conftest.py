"""pytest configuration of the op-level benchmarks (benchmarks/test_bench_ops.py).

    python -m pytest benchmarks/ --benchmark-only                     # time every case
    python -m pytest benchmarks/ --benchmark-only --bench-size=large  # the bench scripts' sizes
    python -m pytest benchmarks/ --benchmark-only --benchmark-save=base
                                      # saved as .benchmarks/<machine>/0001_base.json
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare=0001
                                      # fails when a case's median got more than 10% slower
    python -m pytest benchmarks/                                      # smoke run: each case once

Options added here: --bench-size (small, the default: 1-2 minutes on a 2-core CPU; large: the
sizes of the bench_*.py scripts) and --bench-device (auto: CUDA when available, else the CPU).

Two defaults differ from pytest-benchmark's own:
  * --benchmark-compare without --benchmark-compare-fail fails on a regression of the median of
    more than 10% (median:10%); an explicit --benchmark-compare-fail replaces that.
  * without any of --benchmark-only, --benchmark-enable, --benchmark-save, --benchmark-autosave,
    --benchmark-json or --benchmark-compare, the benchmarks run as a smoke test: each case once,
    untimed (pytest-benchmark's --benchmark-disable), so that `pytest benchmarks/` stays quick.

Compare runs of one machine taken under the same load: on a shared machine another process can
move a median by more than 10% (time.sleep-based self-test: tests/test_bench_compare.py).

This file imports neither torch nor lor2c_ops (tests/test_bench_compare.py runs it in
subprocesses on a trivial benchmark, which must start fast).
"""

from __future__ import annotations

import os

# As in tests/conftest.py: OpenMP threads that spin while waiting make parallel regions crawl
# when another process holds a core. OpenMP reads this when torch loads it, so it is set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_COMPARE_FAIL = "median:10%"
SIZES = ("small", "large")
DEVICES = ("auto", "cpu", "cuda")

# Options that ask for timings: with none of them, the run is a smoke test (see above).
_TIMING_OPTIONS = (
    "benchmark_only",
    "benchmark_enable",
    "benchmark_save",
    "benchmark_autosave",
    "benchmark_json",
    "benchmark_compare",
)


def pytest_addoption(parser):
    group = parser.getgroup("lor2c_ops benchmarks")
    group.addoption(
        "--bench-size",
        choices=SIZES,
        default="small",
        help="problem sizes of benchmarks/test_bench_ops.py: small (default, quick) "
        "or large (the sizes of the bench_*.py scripts)",
    )
    group.addoption(
        "--bench-device",
        choices=DEVICES,
        default="auto",
        help="device of the benchmarks: auto (default: CUDA when available), cpu or cuda",
    )


def pytest_configure(config):
    # pytest-benchmark builds its session in its own pytest_configure, marked trylast, so the
    # options set here are the ones it reads.
    option = config.option
    if not hasattr(option, "benchmark_compare"):
        return  # pytest-benchmark is not installed or was disabled with -p no:benchmark
    if option.benchmark_compare and not option.benchmark_compare_fail:
        from pytest_benchmark.utils import parse_compare_fail

        option.benchmark_compare_fail = [parse_compare_fail(DEFAULT_COMPARE_FAIL)]
    if not any(getattr(option, name, None) for name in _TIMING_OPTIONS):
        option.benchmark_disable = True


def pytest_report_header(config):
    option = config.option
    if not hasattr(option, "benchmark_compare"):
        return None
    lines = [
        f"lor2c_ops benchmarks: --bench-size={option.bench_size} "
        f"--bench-device={option.bench_device}"
    ]
    if option.benchmark_disable and not option.benchmark_enable:
        lines.append(
            "lor2c_ops benchmarks: smoke run, each case once and untimed "
            "(time them with --benchmark-only)"
        )
    if option.benchmark_compare_fail:
        from pytest_benchmark.utils import PercentageRegressionCheck

        checks = ", ".join(
            f"{c.field}:{c.threshold:g}{'%' if isinstance(c, PercentageRegressionCheck) else ' s'}"
            for c in option.benchmark_compare_fail
        )
        lines.append(
            f"lor2c_ops benchmarks: a regression beyond {checks} against the compared run fails"
        )
    return lines
