"""One small forward + backward of the CUDA backend per kernel variant, for compute-sanitizer.

    LOR2C_CUDA_MMA=1 compute-sanitizer --tool memcheck python scripts/cuda_mma_smoke.py

Covers what the tensor-core kernels (csrc/cuda/lor2c_mma.cuh) branch on: fp16 and bf16
activations, 16-bit and fp32 weights, odd d (zero padding in shared memory, scalar tails), a
row stride, r = 7 / 40 / 70 (rank tiles 16, 64, and two chunks), dropout on and off, a
multi-adapter batch, and a backward without dx. Compares with an fp64 expression loosely (the
tests do the precise comparison) and prints one line per case; exits 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import lor2c_ops as lo


def _case(dtype, wdtype, n, d_in, d_out, r, p, G=0, stride_pad=0, need_x=True):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(n * 7 + r)
    xs = torch.randn(n, d_in + stride_pad, generator=gen).to(dev, dtype)
    x = xs[:, :d_in]
    layer_out = torch.randn(n, d_out, generator=gen).to(dev, dtype)
    shape_a = (G, r, d_in) if G else (r, d_in)
    shape_b = (G, d_out, r) if G else (d_out, r)
    A = (torch.randn(*shape_a, generator=gen) / d_in**0.5).to(dev, wdtype).requires_grad_()
    B = (torch.randn(*shape_b, generator=gen) / r**0.5).to(dev, wdtype).requires_grad_()
    x = x.detach().requires_grad_(need_x)
    ids = None
    if G:
        ids = torch.randint(-1, G, (n,), generator=gen).to(dev)
    out = lo.lor2c_residual(
        x, layer_out, A, B, scale=0.5, dropout_p=p, backend="cuda", adapter_ids=ids
    )
    out.float().sum().backward()
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(out.float()).all()) and bool(torch.isfinite(A.grad.float()).all())
    if p == 0 and not G:  # loose fp64 comparison of the output
        ref = layer_out.double() + 0.5 * x.double() @ A.double().T @ B.double().T
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        ok = ok and err < 2e-2
    print(
        f"{'OK  ' if ok else 'FAIL'} {dtype} w={wdtype} n={n} d_in={d_in} d_out={d_out} r={r} "
        f"p={p} G={G} pad={stride_pad} dx={need_x}"
    )
    return ok


def main() -> int:
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        (bf, bf, 130, 256, 264, 16, 0.0),
        (fp, f32, 77, 300, 200, 7, 0.1),
        (bf, f32, 65, 129, 131, 40, 0.2, 0, 3),
        (fp, fp, 50, 140, 70, 70, 0.0),
        (bf, bf, 90, 136, 144, 12, 0.1, 3),
    ]
    ok = all(_case(*c) for c in cases)
    ok = _case(bf, bf, 64, 128, 128, 16, 0.0, need_x=False) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
