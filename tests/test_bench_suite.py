"""benchmarks/run.py (the suite behind `scripts/bench.sh`) runs, in a subprocess as a user runs
it, and leaves complete results: the JSON keyed by device, versions and commit, the CSV, the
Markdown log and the two PNG plots; a failing benchmark script fails the run. No timings are
checked (this machine is shared): only that the suite runs and what it writes."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "run.py")

pytest.importorskip("matplotlib")


def run_suite(tmp_path, *flags, env_extra=None):
    env = dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        **(env_extra or {}),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return subprocess.run(
        [sys.executable, SUITE, "--quick", "--device", "cpu", "--out", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_quick_suite_writes_results_and_plots(tmp_path):
    proc = run_suite(tmp_path, "--only", "lor2c", "share", "sfs")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "| op | shape |" in proc.stdout
    # not a terminal: the progress bar prints one line per finished job
    assert "3/3" in proc.stderr
    files = sorted(os.listdir(tmp_path))
    stem = next(f[: -len(".json")] for f in files if f.endswith(".json"))
    for suffix in (".json", ".csv", ".md", "-speedup.png", "-memory.png"):
        path = tmp_path / (stem + suffix)
        assert path.exists() and path.stat().st_size > 0, (suffix, files)
    with open(tmp_path / (stem + "-speedup.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / (stem + ".json")).read_text())
    for key in ("device", "torch", "triton", "commit"):
        assert key in data["meta"]
    assert [job["name"] for job in data["jobs"]] == ["lor2c", "share", "sfs"]
    ops = {entry["op"] for entry in data["summary"]}
    assert {"LoR2C residual", "ShareLoR2C stack", "multi-adapter batch", "SFS"} <= ops
    for entry in data["summary"]:
        assert entry["ms"] > 0 and entry["baseline_ms"] > 0 and entry["speedup"] > 0
    with open(tmp_path / (stem + ".csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and {"job", "bench", "provider", "ms"} <= set(rows[0])
    # --quick results do not replace the README's latest plots
    assert not any(f.startswith("latest-") for f in files)


def test_a_failing_script_fails_the_suite(tmp_path):
    # an argument the script refuses (argparse exits): the suite reports the job as failed
    # and exits non-zero, after running the others
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy; sys.path.insert(0, 'benchmarks'); import run; "
            "run.suite_jobs = lambda t, q: [run.common.Job('lor2c', ['--quick', '--dtype', 'fp64'],"
            " 'bad', 1), run.common.Job('sfs', ['--quick'], 'good', 1)]; "
            "sys.exit(run.main(['--quick', '--device', 'cpu', '--no-plots', "
            f"'--out', {str(tmp_path)!r}]))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert "FAILED bad" in proc.stdout and "FAILED jobs: bad" in proc.stdout
    assert "## good" in proc.stdout


def test_each_script_declares_its_suite_jobs_and_summary():
    """Adding a benchmark is adding its script: run.py finds it, its jobs and its summary rows."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import run

    names = [name for name, _ in run.benches()]
    assert names[0] == "lor2c" and names[-1] == "e2e"
    assert {"lor2c", "share", "dcft", "sfs", "host", "e2e"} <= set(names)
    for name, module in run.benches():
        assert callable(module.summarise), name
        for device_type in ("cpu", "cuda"):
            for quick in (False, True):
                jobs = module.suite_jobs(device_type, quick)
                assert jobs and all(job.bench == name and job.seconds > 0 for job in jobs), name


def test_readme_table_is_the_generated_one():
    """The README's suite table is written by summary.py from a results file, never by hand."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import summary

    with open(summary.README) as f:
        readme = f.read()
    between = readme.split(summary.BEGIN, 1)[1].split(summary.END, 1)[0]
    source = between.split("`", 2)[1]
    meta, rows = summary.from_file(os.path.join(ROOT, source))
    assert summary.table(rows) in between, (
        "regenerate: python benchmarks/summary.py " + source + " --readme"
    )
