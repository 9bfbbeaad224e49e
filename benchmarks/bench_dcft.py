"""Benchmark of one DCFT-adapted linear layer: a training step of the fused op against the published
approach and against the frozen linear alone.

    python benchmarks/bench_dcft.py                  # CPU: n=4096, d=1024, k=2, r=1, fp32
    python benchmarks/bench_dcft.py --device cuda    # GPU: n=8192, d=4096, k=2, r=1, bf16

Providers:
  `linear`     the frozen F.linear alone (no adapter): the floor an adapter adds cost to;
  `published`  the published code's approach: D = conv_transpose2d(A.T @ B.T, C, stride) every
               step, then F.linear(x, W, b) + s * dropout(x) @ D (eager);
  `compiled`   the same under torch.compile;
  and each fused backend that runs on the device (dcft_linear, which never forms D).
The base weight and bias are frozen; x requires grad (a layer inside a network), so every
provider's backward computes dx. For forward, backward and both: median time and spread (on a
CPU the providers are timed round-robin, so that load from other processes hits them alike),
speedups against published and compiled, the overhead against the frozen linear measured in the
same run, the bytes kept for backward, the peak memory of the step and the number of
allocations of D's size (d_in x d_out; the published approach makes D and dD every step).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import summary  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops import backends, info  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The op's shapes, once: "large" is this script's default (per device type), "small" the
# pytest-benchmark default (benchmarks/test_bench_ops.py reads both from here).
BENCH_OPS = {
    "dcft": dict(
        kernel_op="dcft",
        sizes={
            ("small", "cpu"): dict(n=1024, d=768, k=2, r=1),
            ("large", "cpu"): dict(n=4096, d=1024, k=2, r=1),
            ("small", "cuda"): dict(n=2048, d=1024, k=2, r=1),
            ("large", "cuda"): dict(n=8192, d=4096, k=2, r=1),
        },
    )
}


def frozen_linear(x, W, b, A, B, C, scale, stride, p):
    return F.linear(x, W, b)


def published(x, W, b, A, B, C, scale, stride, p):
    D = F.conv_transpose2d((A.T @ B.T)[None, None], C[None, None], stride=stride)[0, 0]
    return F.linear(x, W, b) + scale * (F.dropout(x, p, training=True) @ D)


def providers(device: torch.device, dtype: torch.dtype, include_reference: bool):
    """name -> f(x, W, b, A, B, C, scale, stride, p)."""
    result = {
        "linear": frozen_linear,
        "published": published,
        "compiled": torch.compile(published, dynamic=False),
    }
    for name in backends.NAMES:
        if name == "reference" and not include_reference:
            continue
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is for testing, not timing
        if backends.BACKENDS[name].refuses(device, dtype) is None:
            result[name] = (
                lambda be: (
                    lambda x, W, b, A, B, C, s, st, p: lo.dcft_linear(
                        x, W, b, A, B, C, scale=s, stride=st, dropout_p=p, backend=be
                    )
                )
            )(name)
    return result


def memory_of_step(step, device: torch.device, d_bytes: int) -> tuple[int, int]:
    """(peak bytes above the start, number of allocations of d_bytes) of one call of step()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    events = common.allocation_events(step, device)
    d_sized = sum(1 for _, size in events if size == d_bytes)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base, d_sized
    return common.peak_of(events), d_sized


def run(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    n, d, k, r = args.n, args.d, args.k, args.r
    stride = args.stride or k
    m = lo.ops.dcft.subspace_size(d, k, stride, "d")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(d, d, generator=gen) / d**0.5).to(device, dtype)  # frozen
    b = (torch.randn(d, generator=gen) * 0.1).to(device, dtype)  # frozen
    A = (torch.randn(r, m, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    B = (torch.randn(m, r, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    C = (torch.randn(k, k, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    g = torch.randn(n, d, generator=gen).to(device, dtype)
    scale = 1.0 / r
    d_bytes = d * d * x.element_size()  # D, d_in x d_out (also dD in the published backward)

    rows = []
    for p in args.p:
        cases, memory = {}, {}
        for name, f in providers(device, dtype, args.include_reference).items():
            inputs = [x] if name == "linear" else [x, A, B, C]

            def forward(f=f):
                return f(x, W, b, A, B, C, scale, stride, p)

            modes = common.mode_cases(forward, inputs, g)
            for mode, case in modes.items():
                cases[name, mode] = case
            memory[name] = (
                common.saved_bytes(forward, exclude=(x, W, b, A, B, C)),
                *memory_of_step(modes["fwd+bwd"][0], device, d_bytes),
            )
        times = common.timed(cases, device, args.repeat)
        results = {}
        for name, (saved, peak, d_allocs) in memory.items():
            results[name] = {mode: times[name, mode] for mode in ("fwd", "bwd", "fwd+bwd")}
            results[name].update(saved=saved, peak=peak, d_allocs=d_allocs)
            print(
                f"  p={p} {name:<10} fwd+bwd {results[name]['fwd+bwd'][0]:8.2f} ms", file=sys.stderr
            )

        for mode in ("fwd", "bwd", "fwd+bwd"):
            for name, entry in results.items():
                ms, spread = entry[mode]
                rows.append(
                    {
                        "p": p,
                        "mode": mode,
                        "provider": name,
                        "ms": ms,
                        "iqr_ms": spread,
                        "vs_published": results["published"][mode][0] / ms,
                        "vs_compiled": results["compiled"][mode][0] / ms,
                        "over_linear": ms / results["linear"][mode][0] - 1.0,
                        "saved_mb": entry["saved"] / 2**20,
                        "peak_mb": entry["peak"] / 2**20,
                        "d_allocs": entry["d_allocs"],
                    }
                )
    return rows


def check_targets(rows, ambiguous: bool) -> list[str]:
    lines = []
    fused = [
        r
        for r in rows
        if r["mode"] == "fwd+bwd"
        and r["provider"] not in ("linear", "published", "compiled", "reference")
    ]
    for r in fused:
        goals = [
            ("2x faster than the published approach", r["vs_published"] >= 2.0),
            (
                # issue 15 item 5: 10% at p=0, 15% with dropout; the CPU kernels' path named
                f"at most {10 if r['p'] == 0.0 else 15}% slower than the frozen linear alone"
                + (f" ({info.cpu_isa()[0]} path)" if r["provider"] == "cpu" else ""),
                r["over_linear"] <= (0.10 if r["p"] == 0.0 else 0.15),
            ),
            ("no allocation of a d_in x d_out tensor", r["d_allocs"] == 0),
        ]
        if ambiguous:  # n == d_in: an (n, d_out) activation has D's size too
            goals = goals[:2]
        for goal, ok in goals:
            lines.append(
                f"{'PASS' if ok else 'MISS'}  {r['provider']} p={r['p']}: {goal} "
                f"(x{r['vs_published']:.2f} published, x{r['vs_compiled']:.2f} compiled, "
                f"{100 * r['over_linear']:+.1f}% vs linear, {r['d_allocs']} D-sized "
                f"allocations, peak {r['peak_mb']:.1f} MB)"
            )
    return lines


# --- in the suite (benchmarks/run.py collects suite_jobs; summary.py calls summarise) ----------
# seconds: each job's run time on a quiet 2-core Sapphire Rapids (CPU) or an H200 (GPU): the
# progress bar's weights, not limits.
SUITE_ORDER = 30


def suite_jobs(device_type: str, quick: bool) -> list:
    if quick:
        return [common.Job("dcft", ["--quick"], "dcft (quick)", 15)]
    if device_type == "cuda":
        return [common.Job("dcft", [], "DCFT linear LLaMA-2-7B n=8192 k=2 r=1", 60)]
    return [
        common.Job(
            "dcft", ["--n", "4096", "--d", "1024"], "DCFT linear BERT-large n=4096 k=2 r=1", 35
        ),
        common.Job(
            "dcft",
            ["--n", "4096", "--d", "768", "--p", "0.1"],
            "DCFT linear BERT-base n=4096 k=2 r=1",
            12,
        ),
    ]


def summarise(job: dict) -> list[dict]:
    """This script's rows of the suite summary (benchmarks/summary.py)."""
    m = job["meta"]
    return summary.per_p(
        job,
        "DCFT linear",
        f"n={m['n']} d={m['d']} k={m['k']} r={m['r']} {m['dtype']}",
        "published",
        over_linear=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--k", type=int, default=2, help="kernel size")
    parser.add_argument("--stride", type=int, default=None, help="default: the kernel size")
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--include-reference",
        action="store_true",
        help="also time the pure-PyTorch fallback backend",
    )
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # n = 8192 on the GPU keeps n != d, so that an allocation of D's size can only be D
    large = BENCH_OPS["dcft"]["sizes"]["large", "cuda" if gpu else "cpu"]
    defaults = (large["n"], large["d"], "bf16" if gpu else "fp32")
    if args.quick:
        defaults = (256, 128, defaults[2])
        args.repeat = min(args.repeat, 5)
    for key, value in zip(("n", "d", "dtype"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device(args.device)
    rows = run(args)
    stride = args.stride or args.k
    meta = {
        "bench": "dcft",
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "stride": stride,
        "r": args.r,
        "dtype": args.dtype,
    }
    table = common.format_table(
        rows,
        [
            ("p", "p", ""),
            ("mode", "mode", ""),
            ("provider", "provider", ""),
            ("ms", "median ms", ".2f"),
            ("iqr_ms", "IQR ms", ".2f"),
            ("vs_published", "vs published", ".2f"),
            ("vs_compiled", "vs compiled", ".2f"),
            ("over_linear", "vs frozen linear", "+.1%"),
            ("saved_mb", "saved MB", ".2f"),
            ("peak_mb", "peak MB", ".1f"),
            ("d_allocs", "D-sized allocs", "d"),
        ],
    )
    print(
        f"DCFT linear layer, n={args.n} d_in=d_out={args.d} k={args.k} stride={stride} "
        f"r={args.r} {args.dtype} on {meta['device']}; commit {meta['commit']}"
    )
    print(
        "vs published / vs compiled: speedup against the published approach (eager / "
        "torch.compile); vs frozen linear: extra time over F.linear alone; memory of one "
        "forward + backward (peak above the inputs; D-sized allocs: allocations of "
        "d_in * d_out elements)\n"
    )
    print(table)
    print()
    if args.quick:
        print(
            "quick run: a smoke test at small sizes, where per-call overhead dominates; the "
            "targets apply to the full sizes"
        )
    for line in [] if args.quick else check_targets(rows, ambiguous=args.n == args.d):
        print(line)
    return common.finish("dcft", rows, meta, args)


if __name__ == "__main__":
    main()
