"""Tile sweep of the Triton LoR2C kernels on a GPU: GPU time of each kernel (CUDA-graph replay,
so host overhead is out) for candidate configurations, against the memory-bound limit measured
in the same run (out-of-place bf16 adds moving the same bytes).

    python benchmarks/sweep_triton.py [--quick] [--out results.json]

Prints one table per (shape, kernel) and the best configuration of each; lor2c_ops/triton/lor2c.py
TABLE holds what a sweep chose, with the figures written next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import common  # noqa: F401  (first: puts this checkout's lor2c_ops on the path)
from lor2c_ops.ref.philox import dropout_threshold  # noqa: F401  (kept importable)
from lor2c_ops.triton import lor2c as tk


def graph_time(fn, iters: int = 20, reps: int = 5) -> float:
    """Median ms per call of fn, replayed from a CUDA graph of `iters` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2]


def add_bandwidth(n: int, d: int, dtype) -> float:
    """GB/s of an out-of-place add (reads 2, writes 1 n x d tensors)."""
    a = torch.randn(n, d, device="cuda", dtype=dtype)
    b = torch.randn(n, d, device="cuda", dtype=dtype)
    out = torch.empty_like(a)
    ms = graph_time(lambda: torch.add(a, b, out=out))
    return 3 * a.numel() * a.element_size() / ms / 1e6


# The first entry of each list is the launchers' default (config_for), so the table shows
# where the default stands; all of these compile without spills for sm_90 at r = 16
# (scripts/check_triton_compile.py).
FWD = [
    dict(fwd_m=m, fwd_k=k, fwd_n=nn, fwd_warps=w, fwd_stages=s)
    for m, k, nn, w, s in [
        (32, 128, 128, 4, 4),
        (32, 128, 128, 4, 5),
        (32, 64, 128, 4, 6),
        (16, 128, 128, 4, 4),
        (32, 128, 256, 8, 4),
    ]
]
GRAD = [
    dict(grad_m=m, grad_n=nn, grad_warps=w, grad_stages=s, waves=v)
    for m, nn, w, s, v in [
        (32, 512, 8, 3, 2),
        (64, 512, 8, 3, 2),
        (32, 512, 8, 4, 2),
        (64, 256, 8, 4, 2),
        (32, 512, 8, 3, 4),
    ]
]
INP = [
    dict(in_m=m, in_k=k, in_warps=w, in_stages=s, waves=v)
    for m, k, w, s, v in [
        (32, 256, 8, 3, 2),
        (32, 256, 8, 4, 2),
        (16, 256, 4, 4, 2),
        (32, 512, 8, 3, 2),
        (32, 128, 8, 4, 2),
    ]
]


def sweep(n, d, r, p, dtype, wdtype, quick, rows):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(n, d, device=dev, dtype=dtype)
    layer_out = torch.randn(n, d, device=dev, dtype=dtype)
    A = (torch.randn(1, r, d, device=dev) / d**0.5).to(wdtype)
    B = torch.randn(1, d, r, device=dev).to(wdtype)
    g = torch.randn(n, d, device=dev, dtype=dtype)
    seed = torch.tensor([1234, 5], device=dev, dtype=torch.int64)
    bw = add_bandwidth(n, d, dtype)
    limit = 3 * n * d * x.element_size() / bw / 1e6  # ms, one direction
    base = tk.config_for(dev, d, tk.rank_pad(r), dtype == torch.float32)
    _, t = tk._forward_impl(x, layer_out, A, B, None, None, 0.5, p, seed, cfg=base)
    best = {}
    for kernel, cands in (("fwd", FWD), ("grad", GRAD), ("input", INP)):
        if quick:
            cands = cands[:2]
        results = []
        for cand in cands:
            cfg = dataclasses.replace(base, **cand)
            if kernel == "fwd":
                fn = lambda cfg=cfg: tk._forward_impl(
                    x, layer_out, A, B, None, None, 0.5, p, seed, cfg=cfg
                )
            elif kernel == "grad":  # the grad pass and dB reduction alone (no dx/dA)
                fn = lambda cfg=cfg: tk._backward_impl(
                    g, x, t, A, B, None, None, 0.5, p, seed, False, False, True, cfg=cfg
                )
            else:  # the whole backward with this input-pass config (grad pass at base)
                fn = lambda cfg=cfg: tk._backward_impl(
                    g, x, t, A, B, None, None, 0.5, p, seed, True, True, True, cfg=cfg
                )
            try:
                t0 = time.perf_counter()
                ms = graph_time(fn)
                compile_s = time.perf_counter() - t0
            except Exception as exc:  # a config that does not fit (shared memory, registers)
                print(f"  {kernel} {cand}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            lim = limit if kernel != "grad" else limit / 3  # the grad pass alone reads g only
            results.append((ms, cand))
            row = dict(
                n=n,
                d=d,
                r=r,
                p=p,
                dtype=str(dtype)[6:],
                kernel=kernel,
                ms=ms,
                limit_ms=lim,
                frac=lim / ms,
                cfg=cand,
                first_call_s=compile_s,
            )
            rows.append(row)
            print(f"  {kernel:5s} {ms * 1e3:8.1f} us  {100 * lim / ms:5.1f}% of limit  {cand}")
        if results:
            best[kernel] = min(results, key=lambda v: v[0])[1]
    cfg = base
    for cand in best.values():
        cfg = dataclasses.replace(cfg, **cand)
    fwd_ms = graph_time(
        lambda: tk._forward_impl(x, layer_out, A, B, None, None, 0.5, p, seed, cfg=cfg)
    )
    bwd_ms = graph_time(
        lambda: tk._backward_impl(
            g, x, t, A, B, None, None, 0.5, p, seed, True, True, True, cfg=cfg
        )
    )
    print(
        f"best n={n} d={d} r={r} p={p} {str(dtype)[6:]}: fwd {fwd_ms * 1e3:.1f} us "
        f"({100 * limit / fwd_ms:.0f}%), bwd {bwd_ms * 1e3:.1f} us ({100 * limit / bwd_ms:.0f}%), "
        f"both {100 * 2 * limit / (fwd_ms + bwd_ms):.0f}% of the limit at {bw:.0f} GB/s; {cfg}"
    )
    rows.append(
        dict(
            n=n,
            d=d,
            r=r,
            p=p,
            dtype=str(dtype)[6:],
            kernel="best",
            fwd_ms=fwd_ms,
            bwd_ms=bwd_ms,
            limit_ms=limit,
            bandwidth_gbs=bw,
            frac_both=2 * limit / (fwd_ms + bwd_ms),
            cfg=dataclasses.asdict(cfg),
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--shapes",
        default="16384x4096x16,16384x4096x64,16384x1024x16",
        help="n x d x r, comma separated; the first gets the full candidate lists",
    )
    args = ap.parse_args()
    rows = []
    for i, spec in enumerate(args.shapes.split(",")):
        n, d, r = (int(v) for v in spec.split("x"))
        for p in (0.0, 0.1):
            print(f"== n={n} d={d} r={r} p={p} bf16", flush=True)
            # the first shape gets the whole candidate list, the others the first two
            sweep(n, d, r, p, torch.bfloat16, torch.bfloat16, args.quick or i > 0, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
