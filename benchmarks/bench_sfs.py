"""Benchmark of SFS from the factors against the dense SVD of the adapter's product.

    python benchmarks/bench_sfs.py                   # d=4096, r=8, fp32 (dense: ~20-30 s a call
                                                     # on 2 CPU cores)
    python benchmarks/bench_sfs.py --quick           # d=512: a smoke test
    python benchmarks/bench_sfs.py --device cuda

SFS (docs/math.md section 3.1) needs the singular values of B @ A (B: d x r, A: r x d). Providers:
`dense`, the published code's `torch.linalg.svdvals(B @ A)` (O(d^3), the product included), and
`factored`, lor2c_ops.adapters.sfs(A, B): thin QR of B and A.T, then the r x r SVD of
R_b @ R_a.T (O(d r^2)), the SFS value included. The issue's target: factored at least 100x
faster at d = 4096, r = 8. Also reported: how far the factored singular values are from the
dense ones (relative to the largest), and the two SFS values.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import summary  # noqa: E402

from lor2c_ops.adapters.sfs import factored_singular_values, sfs  # noqa: E402

TARGET = 100.0


def run(args) -> list[dict]:
    device = torch.device(args.device)
    d, r = args.d, args.r
    gen = torch.Generator().manual_seed(0)
    # a trained-looking adapter: A at its Kaiming scale, B small and non-zero
    A = (torch.randn(r, d, generator=gen) / d**0.5).to(device)
    B = (torch.randn(d, r, generator=gen) * 0.01).to(device)

    def dense():
        return torch.linalg.svdvals(B @ A)

    def factored():
        return sfs(A, B)

    # The dense SVD is seconds per call on a CPU: a few repeats; the factored one many. Timed
    # separately (a round-robin would give the dense SVD far too many calls).
    times = {
        "dense": common.bench(dense, device, warmup=1, repeat=args.dense_repeat),
        "factored": common.bench(factored, device, warmup=5, repeat=args.repeat),
    }
    sigma_dense = dense().double().cpu()
    sigma_fact = factored_singular_values(A, B).double().cpu()
    sigma_err = float((sigma_dense[:r] - sigma_fact).abs().max() / sigma_dense[0])
    tail = float(sigma_dense[r:].abs().max() / sigma_dense[0])  # rank r: the rest is rounding
    sfs_dense = float(sigma_dense.mean())
    sfs_fact = sfs(A, B)
    rows = []
    for name, (ms, spread) in times.items():
        rows.append(
            {
                "provider": name,
                "d": d,
                "r": r,
                "ms": ms,
                "iqr_ms": spread,
                "speedup": times["dense"][0] / ms,
                "sfs": sfs_dense if name == "dense" else sfs_fact,
                "repeat": args.dense_repeat if name == "dense" else args.repeat,
            }
        )
    accuracy = {
        "sigma_max_rel_err": sigma_err,
        "dense_tail_rel": tail,
        "sfs_dense": sfs_dense,
        "sfs_factored": sfs_fact,
    }
    return rows, accuracy


def check_targets(rows, args) -> list[str]:
    ratio = {r["provider"]: r for r in rows}["factored"]["speedup"]
    ok = ratio >= TARGET
    shape = (
        f"d={args.d}, r={args.r}"
        if (args.d, args.r) == (4096, 8)
        else f"d={args.d}, r={args.r}; the target shape is d=4096, r=8"
    )
    return [
        f"{'PASS' if ok else 'MISS'}  factored SFS at least {TARGET:.0f}x faster than "
        f"svdvals(B @ A): x{ratio:,.0f} ({shape})"
    ]


# --- in the suite (benchmarks/run.py collects suite_jobs; summary.py calls summarise) ----------
# seconds: each job's run time on a quiet 2-core Sapphire Rapids (CPU) or an H200 (GPU): the
# progress bar's weights, not limits.
SUITE_ORDER = 40


def suite_jobs(device_type: str, quick: bool) -> list:
    if quick:
        return [common.Job("sfs", ["--quick"], "sfs (quick)", 5)]
    repeat = "3" if device_type == "cuda" else "2"
    return [
        common.Job(
            "sfs", ["--dense-repeat", repeat], "SFS d=4096 r=8", 30 if device_type == "cuda" else 6
        )
    ]


def summarise(job: dict) -> list[dict]:
    """This script's rows of the suite summary (benchmarks/summary.py)."""
    meta, rows = job["meta"], job["rows"]
    return [
        summary.entry(
            "SFS",
            f"d={meta['d']} r={meta['r']} fp32",
            "",
            summary.pick(rows, provider="factored"),
            summary.pick(rows, provider="dense"),
        )
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50, help="repeats of the factored SFS")
    parser.add_argument(
        "--dense-repeat",
        type=int,
        default=3,
        help="repeats of the dense SVD (seconds each on a CPU)",
    )
    common.add_output_arguments(parser, quick_help="d=512: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.repeat, args.dense_repeat = 512, 10, 3
    if args.dense_repeat < 2 or args.repeat < 2:
        parser.error("--repeat and --dense-repeat must be at least 2 (median and spread)")

    device = torch.device(args.device)
    rows, accuracy = run(args)
    meta = {
        "bench": "sfs",
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "d": args.d,
        "r": args.r,
        "dtype": "fp32",
        **accuracy,
    }
    print(f"SFS of B @ A, d={args.d} r={args.r} fp32 on {meta['device']}; commit {meta['commit']}")
    print(
        "dense: torch.linalg.svdvals(B @ A), product included; factored: lor2c_ops sfs(A, B), "
        "thin QR + r x r SVD\n"
    )
    print(
        common.format_table(
            rows,
            [
                ("provider", "provider", ""),
                ("ms", "median ms", ".4g"),
                ("iqr_ms", "IQR ms", ".3g"),
                ("repeat", "runs", ""),
                ("speedup", "vs dense", ",.0f"),
                ("sfs", "SFS", ".6g"),
            ],
        )
    )
    print(
        f"\nfactored singular values vs dense: max error {accuracy['sigma_max_rel_err']:.1e} of "
        f"the largest; dense values past r: {accuracy['dense_tail_rel']:.1e} of the largest"
    )
    for line in check_targets(rows, args):
        print(line)
    return common.finish("sfs", rows, meta, args)


if __name__ == "__main__":
    main()
