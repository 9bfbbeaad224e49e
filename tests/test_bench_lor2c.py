"""benchmarks/bench_lor2c.py's limits and target lines, from rows written by hand (no timing):
the flop count of the products, the roofline (the larger of the memory-bound and compute
limits) and what a speedup target asks of the machine's matmul rate."""

import os
import sys

import pytest
import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import bench_lor2c  # noqa: E402
import common  # noqa: E402


def test_flops_count_the_six_products():
    n, d_in, d_out, r = 5, 7, 3, 2
    # forward: xd A^T (n d_in r) and t B^T (n r d_out); backward: u = g B, dB, dA, dx
    macs_fwd = n * d_in * r + n * r * d_out
    macs_bwd = n * d_out * r + d_out * r * n + r * d_in * n + n * r * d_in
    flops = common.lor2c_flops(n, d_in, d_out, r)
    assert flops == {"fwd": 2 * macs_fwd, "bwd": 2 * macs_bwd, "fwd+bwd": 2 * (macs_fwd + macs_bwd)}


def test_gemm_cases_time_fp32_beside_a_narrower_cpu_dtype():
    cases, flops = common.gemm_cases(torch.device("cpu"), torch.bfloat16)
    assert set(cases) == {("gemm", "bfloat16"), ("gemm", "float32")}
    assert flops == 2 * common.GEMM_SIZE["cpu"] ** 3
    cases, _ = common.gemm_cases(torch.device("cpu"), torch.float32)
    assert set(cases) == {("gemm", "float32")}
    # the faster case sets the rate
    times = {
        ("gemm", "bfloat16"): (2.0, 0.1),
        ("gemm", "float32"): (4.0, 0.1),
        ("add", "x"): (1, 0),
    }
    assert common.gemm_rate(times, 10**9) == pytest.approx(10**9 / 2e-3)


def _row(ms, vs_eager, limit_ms, compute_ms, provider="cpu", p=0.0):
    return {
        "mode": "fwd+bwd",
        "provider": provider,
        "p": p,
        "ms": ms,
        "vs_eager": vs_eager,
        "vs_compiled": vs_eager,
        "of_limit": limit_ms / ms,
        "compute_ms": compute_ms,
        "of_compute": compute_ms / ms,
        "of_roofline": max(limit_ms, compute_ms) / ms,
        "bound": "compute" if compute_ms > limit_ms else "memory",
        "gemm_gflops": 180.0,
    }


def _lines(row, r):
    return bench_lor2c.check_targets([row], "cpu", (8192, 768, r, torch.float32))


def test_compute_bound_rows_are_judged_against_the_roofline():
    # 12% of the memory-bound limit, but at 90% of the compute limit: within 2x of the roofline
    lines = _lines(_row(ms=20.0, vs_eager=1.6, limit_ms=2.4, compute_ms=18.0), r=64)
    roof = [line for line in lines if "roofline (" in line]
    assert len(roof) == 1 and roof[0].startswith("PASS") and "compute-bound" in roof[0]
    assert "90% of roofline" in roof[0]
    # memory-bound: the roofline is the memory-bound limit
    lines = _lines(_row(ms=20.0, vs_eager=3.0, limit_ms=8.0, compute_ms=1.0), r=8)
    roof = [line for line in lines if "roofline (" in line]
    assert roof[0].startswith("MISS") and "memory-bound" in roof[0]


def test_target_line_says_what_it_asks_of_the_matmul_rate():
    # eager 40 ms, products 30 ms at the matmul rate: 1.5x (26.7 ms) needs 112% of the rate
    row = _row(ms=32.0, vs_eager=1.25, limit_ms=3.0, compute_ms=30.0)
    (target,) = [line for line in _lines(row, r=64) if "issue 15" in line]
    assert target.startswith("MISS")
    assert "products at 94% of the matmul rate" in target
    assert "the target needs 112% (more than the matmul rate)" in target
    # a reachable one says so without the remark
    row = _row(ms=10.0, vs_eager=4.0, limit_ms=3.0, compute_ms=6.0)
    (target,) = [line for line in _lines(row, r=16) if "issue 15" in line]
    assert target.startswith("PASS") and "needs 38%)" in target


def test_mask_share_compares_with_p0_timed_in_the_same_rounds():
    """The mask's share (issue 15 item 4) uses the p = 0 time taken beside the p > 0 one when the
    row has it, else the p = 0 row of the run; over 35% is a MISS."""
    plain = _row(10.0, 2.0, 1.0, 1.0)
    dropped = dict(_row(16.0, 2.0, 1.0, 1.0, p=0.1), p0_ms=12.0)  # 25% beside, 37.5% apart
    (line,) = bench_lor2c.mask_share_lines([plain, dropped])
    assert line.startswith("PASS") and "25%" in line and "same rounds" in line, line
    (line,) = bench_lor2c.mask_share_lines([plain, dict(dropped, p0_ms=None)])
    assert line.startswith("MISS") and "38%" in line and "same rounds" not in line, line
    assert bench_lor2c.mask_share_lines([dict(dropped, p0_ms=None)]) == []
