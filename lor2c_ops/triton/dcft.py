"""The DCFT op (docs/math.md section 4.5) on the Triton LoR2C kernels.

D = Ae.T @ Ck @ Be, with the expanded factors
    Ae[(j, a), p * st + a] = A[j, p]  (r*k, d_in)    Be[(j, b), q * st + b] = B[q, j]  (r*k, d_out)
and the core Ck = kron(I_r, C) (r*k x r*k). So dropout(x) @ D = dropout(x) @ A'.T @ B'.T with
A' = Ae and B' = (Ck @ Be).T: a LoR2C residual of rank r*k, whose factors are weight-sized
(r*k*d, built per call from A, B, C by a few small torch ops); D (d_in x d_out) is never formed.

Forward: layer_out = bias + x @ W.T (one GEMM into the output buffer), then the LoR2C forward
kernel adds s * dropout(x) @ A'.T @ B'.T onto it in place, saving T = dropout(x) @ A'.T (n x r*k).
Backward: the LoR2C backward kernels give dx (adapter part), dA' and dB' (small); those go back
onto A, B, C through the adjoint of the expansion (autograd over the small expansion graph), and
the base layer's g @ W is accumulated onto dx with one GEMM. The traffic and precision are those
of the LoR2C kernels (lor2c_ops/triton/lor2c.py), plus the base layer's two GEMMs.
"""

from __future__ import annotations

import torch

from . import lor2c as kernels


def _window_index(m: int, k: int, stride: int, device) -> torch.Tensor:
    """(k, m) int64: [a, p] = p * stride + a, the column of window p's element a."""
    return (
        torch.arange(m, device=device)[None, :] * stride + torch.arange(k, device=device)[:, None]
    )


def expand(F: torch.Tensor, k: int, stride: int, d: int) -> torch.Tensor:
    """F (r, m) -> (r * k, d) float32 with [j * k + a, p * stride + a] = F[j, p], zero elsewhere."""
    r, m = F.shape
    idx = _window_index(m, k, stride, F.device).expand(r, k, m)
    out = torch.zeros((r, k, d), device=F.device, dtype=torch.float32)
    out.scatter_(2, idx, F.to(torch.float32)[:, None, :].expand(r, k, m))
    return out.view(r * k, d)


def fold(P: torch.Tensor, r: int, k: int, stride: int, m: int) -> torch.Tensor:
    """The adjoint of expand: (r * k, d) -> (r, m), [j, p] = sum_a P[j * k + a, p * stride + a]."""
    idx = _window_index(m, k, stride, P.device).expand(r, k, m)
    return P.reshape(r, k, -1).gather(2, idx).sum(1)


def _core(C: torch.Tensor, r: int) -> torch.Tensor:
    """kron(I_r, C) as float32: [(j, a), (j, b)] = C[a, b]."""
    return torch.kron(torch.eye(r, device=C.device, dtype=torch.float32), C.to(torch.float32))


def factors(A, B, C, stride: int, d_in: int, d_out: int):
    """(A', B', Be, Ck) of the rank-r*k LoR2C form: A' = Ae (r*k, d_in), B' = (Ck @ Be).T
    (d_out, r*k), all float32 and contiguous."""
    r, k = A.shape[0], C.shape[0]
    be = expand(B.t(), k, stride, d_out)
    ck = _core(C, r)
    return expand(A, k, stride, d_in), (ck @ be).t().contiguous(), be, ck


def forward(x, weight, bias, A, B, C, scale, stride, p, seed):
    d_out, d_in = weight.shape
    a_f, b_f, _, _ = factors(A, B, C, stride, d_in, d_out)
    if bias is not None:
        base = torch.addmm(bias, x, weight.t())
    else:
        base = torch.mm(x, weight.t())
    return kernels._forward_impl(
        x, base, a_f[None], b_f[None], None, None, scale, p, seed, out=base
    )


def backward(
    grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB, need_dC
):
    """dA = fold(dA'); with G = dB'.T = d(Ck @ Be): dBe = Ck.T @ G folds onto B, and
    dCk = G @ Be.T, whose diagonal blocks summed over the ranks give dC."""
    d_out, d_in = weight.shape
    r, k = A.shape[0], C.shape[0]
    a_f, b_f, be, ck = factors(A, B, C, stride, d_in, d_out)
    need_bf = need_dB or need_dC
    dx, da_f, db_f = kernels._backward_impl(
        grad, x, t, a_f[None], b_f[None], None, None, scale, p, seed, need_dx, need_dA, need_bf
    )
    if need_dx:
        dx.addmm_(grad, weight)  # + g @ W, accumulated onto the adapter's dx
    empty = [torch.empty((0,), device=x.device, dtype=w.dtype) for w in (A, B, C)]
    dA, dB, dC = empty
    if need_dA:
        dA = fold(da_f[0], r, k, stride, A.shape[1]).to(A.dtype)
    if need_bf:
        G = db_f[0].t()  # (r*k, d_out)
        if need_dB:
            dB = fold(ck.t() @ G, r, k, stride, B.shape[0]).t().contiguous().to(B.dtype)
        if need_dC:
            dck = (G @ be.t()).view(r, k, r, k)
            dC = torch.diagonal(dck, dim1=0, dim2=2).sum(-1).contiguous().to(C.dtype)
    return dx, dA, dB, dC
