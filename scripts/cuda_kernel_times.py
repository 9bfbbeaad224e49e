"""GPU time per CUDA kernel of one LoR2C forward + backward on the cuda backend (torch profiler).

    python scripts/cuda_kernel_times.py                      # n=16384 d=4096 r=16 bf16, p=0
    LOR2C_CUDA_MMA=1 python scripts/cuda_kernel_times.py --r 64 --p 0.1

Prints, per kernel, the mean GPU time per forward + backward over the timed iterations, and each
kernel's share of the memory-bound limit of one direction (3 n*d elements at --bandwidth). The
launchers read LOR2C_CUDA_MMA once per process, so compare the two paths in two runs.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import lor2c_ops as lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.0)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the limit")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    x = torch.randn(args.n, args.d, device=dev, dtype=dtype, requires_grad=True)
    layer_out = torch.randn(args.n, args.d, device=dev, dtype=dtype)
    A = (torch.randn(args.r, args.d, device=dev) / args.d**0.5).to(dtype).requires_grad_()
    B = torch.randn(args.d, args.r, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(args.n, args.d, device=dev, dtype=dtype)

    def step():
        out = lo.lor2c_residual(x, layer_out, A, B, 2.0, args.p, backend="cuda")
        out.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    limit_us = 3 * args.n * args.d * x.element_size() / args.bandwidth * 1e6
    path = os.environ.get("LOR2C_CUDA_MMA", "") == "1"
    print(
        f"n={args.n} d={args.d} r={args.r} p={args.p} {args.dtype}, "
        f"{'tensor-core (LOR2C_CUDA_MMA=1)' if path else 'CUDA-core'} kernels; "
        f"one direction's limit {limit_us:.1f} us"
    )
    total = 0.0
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if ev.device_time_total <= 0:
            continue
        us = ev.device_time_total / args.iters
        total += us
        print(
            f"  {us:9.1f} us  {limit_us / us * 100:6.1f}% of one direction's limit  {ev.key[:90]}"
        )
    print(f"  {total:9.1f} us  in all per forward + backward ({2 * limit_us / total * 100:.1f}%)")


if __name__ == "__main__":
    main()
