"""The benchmarks' regression check: a saved run, then `--benchmark-compare` fails on a case whose
median got more than 10% slower and passes one that changed by less.

Each run is pytest-benchmark in a subprocess with benchmarks/conftest.py (copied as is) on two
time.sleep benchmarks, so the outcome does not depend on the machine's load: the slowdowns are
+2% (50 -> 51 ms) and +50% (50 -> 75 ms), far from the 10% threshold on either side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark")

CONFTEST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "conftest.py"
)

BENCHMARKS = """
import os
import time


def test_steady(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["STEADY_MS"]) / 1e3,), rounds=5)


def test_slow(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["SLOW_MS"]) / 1e3,), rounds=5)
"""


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_compare")
    (root / "pytest.ini").write_text("[pytest]\n")  # no configuration from directories above
    (root / "test_sleeps.py").write_text(BENCHMARKS)
    shutil.copy(CONFTEST, root / "conftest.py")
    return root


def run(root, steady_ms: float, slow_ms: float, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # only pytest-benchmark: other installed plugins would add a second to every start
    env.update(STEADY_MS=str(steady_ms), SLOW_MS=str(slow_ms), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "pytest_benchmark.plugin",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            f"--benchmark-storage={root / 'storage'}",
            "--benchmark-columns=median",
            *args,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def regressed(result: subprocess.CompletedProcess) -> list[str]:
    """The benchmarks pytest-benchmark reports as regressed."""
    text = result.stdout + result.stderr
    if "Performance has regressed" not in text:
        return []
    return sorted(
        name
        for name in ("test_steady", "test_slow")
        if any(line.startswith("\t" + name) for line in text.splitlines())
    )


@pytest.fixture(scope="module")
def saved(bench_dir):
    result = run(bench_dir, 50, 50, "--benchmark-save=base")
    assert result.returncode == 0, result.stdout + result.stderr
    assert list((bench_dir / "storage").glob("*/0001_base.json")), result.stdout
    return bench_dir


def test_compare_fails_a_regression_over_10_percent_by_default(saved):
    # no --benchmark-compare-fail: benchmarks/conftest.py makes it median:10%
    result = run(saved, 51, 75, "--benchmark-compare=0001")
    assert result.returncode != 0, result.stdout + result.stderr
    assert regressed(result) == ["test_slow"], result.stdout + result.stderr


def test_compare_passes_a_change_under_10_percent(saved):
    result = run(saved, 51, 51, "--benchmark-compare=0001")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Comparing against benchmarks from" in result.stdout + result.stderr
    assert regressed(result) == []


def test_explicit_compare_fail(saved):
    strict = run(saved, 51, 75, "--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")
    assert strict.returncode != 0, strict.stdout + strict.stderr
    assert regressed(strict) == ["test_slow"], strict.stdout + strict.stderr
    # an explicit threshold replaces the default one: +50% is within median:100%
    loose = run(saved, 51, 75, "--benchmark-compare=0001", "--benchmark-compare-fail=median:100%")
    assert loose.returncode == 0, loose.stdout + loose.stderr
