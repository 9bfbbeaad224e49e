"""Where benchmarks/run.py writes (issue 13, item 16): a plain run leaves the working tree clean
(results in the git-ignored benchmarks/results/local/); only --publish writes to the tracked
benchmarks/results/ and replaces the README's latest-<device>-*.png."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("matplotlib")


@pytest.fixture
def suite(tmp_path, monkeypatch):
    import run

    monkeypatch.setattr(run, "HERE", str(tmp_path))  # results/ under tmp_path
    monkeypatch.setattr(
        run,
        "suite_jobs",
        lambda device_type, quick: [run.common.Job("sfs", ["--quick"], "SFS tiny", 1)],
    )
    return run


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_plain_run_writes_to_the_ignored_local_folder(suite, tmp_path):
    assert suite.main(["--device", "cpu"]) == 0
    local = _files(tmp_path / "results" / "local")
    assert any(f.endswith(".json") for f in local) and any(
        f.endswith("-speedup.png") for f in local
    )
    assert not any(f.startswith("latest-") for f in local)
    assert [f for f in _files(tmp_path / "results") if f != "local"] == []


def test_publish_writes_the_tracked_folder_and_latest_plots(suite, tmp_path):
    assert suite.main(["--device", "cpu", "--publish"]) == 0
    files = _files(tmp_path / "results")
    assert "latest-cpu-speedup.png" in files and "latest-cpu-memory.png" in files
    assert any(f.startswith("suite-cpu-") and f.endswith(".json") for f in files)
    assert "local" not in files


def test_publish_refuses_quick(suite):
    with pytest.raises(SystemExit) as exc:
        suite.main(["--device", "cpu", "--quick", "--publish"])
    assert exc.value.code == 2


def test_local_results_are_git_ignored():
    git = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/local/x.json"],
        cwd=ROOT,
        capture_output=True,
    )
    if git.returncode == 128:
        pytest.skip("not a git checkout")
    assert git.returncode == 0
