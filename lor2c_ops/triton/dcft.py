"""Triton kernels and launchers for the DCFT op (DESIGN.md 2.4).

Decomposition: D = Ae.T @ Ck @ Be, with the expanded factors
    Ae[(j, a), p * st + a] = A[j, p]     (r*k, d_in)      Be[(j, b), q * st + b] = B[q, j]  (r*k, d_out)
and the core Ck = kron(I_r, C) (r*k x r*k): a low-rank product of rank r*k with a small mixing
matrix in the middle, which tl.dot takes in tiles (r*k is padded to 16 anyway). The expanded
factors are weight-sized (r*k*d), built once per call by the launcher; D (d_in x d_out) is never
formed. Per row, T = dropout(x) @ Ae.T is A applied to the k-wide windows of x, U = T @ Ck is
T @ C per rank, and U @ Be is the overlap-add of B @ U.

Forward (`_forward`, one program per block of rows): reads x once for T (saved, fp32), then
writes out = bias + s * U @ Be; the launcher then accumulates the base linear onto it with
out.addmm_(x, W.T) (beta = 1), so no separate n x d_out delta exists.

Backward, deterministic, as ops/lor2c's Triton backward:
  1. `_grad_pass`, grid (d_out chunks, row splits): reads g once; writes its chunk's share of
     V = g @ Be.T and accumulates dBe = U.T @ g for its rows;
  2. the V shares are summed (n x r*k, small); dC = s * sum_rows T.T V per rank (small);
  3. `_input_pass`, grid (d_in chunks, row splits): dT = s * V @ Ck.T; reads x once (regenerating
     the mask) for dAe = dT.T @ dropout(x), writes dx = (dT @ Ae) * mask;
  4. partials are summed over splits and folded back onto A and B (the adjoint of the
     expansion); the launcher adds g @ W onto dx with dx.addmm_(g, W).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ref.philox import dropout_threshold
from .philox import dropout_scale


def _rank_pad(rk: int) -> int:
    return max(16, triton.next_power_of_2(rk))  # tl.dot wants every dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _window_index(m: int, k: int, stride: int, device) -> torch.Tensor:
    """(k, m) int64: [a, p] = p * stride + a, the column of window p's element a."""
    return (torch.arange(m, device=device)[None, :] * stride
            + torch.arange(k, device=device)[:, None])


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
    return P.view(r, k, -1).gather(2, idx).sum(1)


def _core(C: torch.Tensor, r: int) -> torch.Tensor:
    """kron(I_r, C) as float32: [(j, a), (j, b)] = C[a, b]."""
    return torch.kron(torch.eye(r, device=C.device, dtype=torch.float32),
                      C.to(torch.float32)).contiguous()


@triton.jit
def _forward(x_ptr, bias_ptr, ae_ptr, ck_ptr, be_ptr, out_ptr, t_ptr, seed_ptr,
             n, d_in, d_out, rk, stride_x, scale, threshold, inv_keep,
             HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, RK_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    q = tl.arange(0, RK_PAD)
    q_ok = q < rk

    t = tl.zeros((BLOCK_M, RK_PAD), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < d_in
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            xt = xt * dropout_scale(seed_ptr, rows, k0, threshold, inv_keep, BLOCK_M, BLOCK_K)
        ae = tl.load(ae_ptr + q[None, :] * d_in + cols[:, None],
                     mask=q_ok[None, :] & col_ok[:, None], other=0.0)
        t += tl.dot(xt, ae, input_precision=PRECISION)
    tl.store(t_ptr + rows64[:, None] * rk + q[None, :], t, mask=row_ok[:, None] & q_ok[None, :])

    ck = tl.load(ck_ptr + q[:, None] * rk + q[None, :], mask=q_ok[:, None] & q_ok[None, :],
                 other=0.0)
    u = tl.dot(t, ck, input_precision=PRECISION) * scale
    for n0 in range(0, d_out, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < d_out
        be = tl.load(be_ptr + q[:, None] * d_out + cols[None, :],
                     mask=q_ok[:, None] & col_ok[None, :], other=0.0)
        y = tl.dot(u, be, input_precision=PRECISION)
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * d_out + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_pass(g_ptr, t_ptr, ck_ptr, be_ptr, v_parts_ptr, dbe_parts_ptr,
               n, d_out, rk, stride_g, rows_per_split,
               NEED_DB: tl.constexpr, RK_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    q = tl.arange(0, RK_PAD)
    q_ok = q < rk
    be_t = tl.load(be_ptr + q[None, :] * d_out + cols[:, None],
                   mask=q_ok[None, :] & col_ok[:, None], other=0.0)  # (BLOCK_N, RK_PAD)
    ck = tl.load(ck_ptr + q[:, None] * rk + q[None, :], mask=q_ok[:, None] & q_ok[None, :],
                 other=0.0)
    dbe = tl.zeros((RK_PAD, BLOCK_N), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v = tl.dot(g, be_t, input_precision=PRECISION)
        tl.store(v_parts_ptr + (chunk * n + rows64[:, None]) * RK_PAD + q[None, :], v,
                 mask=row_ok[:, None])
        if NEED_DB:
            t = tl.load(t_ptr + rows64[:, None] * rk + q[None, :],
                        mask=row_ok[:, None] & q_ok[None, :], other=0.0)
            u = tl.dot(t, ck, input_precision=PRECISION)
            dbe += tl.dot(tl.trans(u), g, input_precision=PRECISION)
    if NEED_DB:
        ptrs = dbe_parts_ptr + (split * RK_PAD + q[:, None]) * d_out + cols[None, :].to(tl.int64)
        tl.store(ptrs, dbe, mask=col_ok[None, :])


@triton.jit
def _input_pass(x_ptr, v_ptr, ck_ptr, ae_ptr, dx_ptr, dae_parts_ptr, seed_ptr,
                n, d_in, rk, stride_x, rows_per_split, scale, threshold, inv_keep,
                HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                RK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    col0 = chunk * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < d_in
    q = tl.arange(0, RK_PAD)
    q_ok = q < rk
    ae = tl.load(ae_ptr + q[:, None] * d_in + cols[None, :], mask=q_ok[:, None] & col_ok[None, :],
                 other=0.0)  # (RK_PAD, BLOCK_K)
    ck_t = tl.load(ck_ptr + q[None, :] * rk + q[:, None], mask=q_ok[:, None] & q_ok[None, :],
                   other=0.0)  # [i, j] = Ck[j, i]
    dae = tl.zeros((RK_PAD, BLOCK_K), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        v = tl.load(v_ptr + rows64[:, None] * RK_PAD + q[None, :], mask=row_ok[:, None], other=0.0)
        dt = tl.dot(v, ck_t, input_precision=PRECISION) * scale
        if HAS_DROPOUT:
            mask = dropout_scale(seed_ptr, rows, col0, threshold, inv_keep, BLOCK_M, BLOCK_K)
        if NEED_DX:
            dx = tl.dot(dt, ae, input_precision=PRECISION)
            if HAS_DROPOUT:
                dx = dx * mask
            tl.store(dx_ptr + rows64[:, None] * d_in + cols[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DA:
            xd = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok,
                         other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                xd = xd * mask
            dae += tl.dot(tl.trans(dt), xd, input_precision=PRECISION)
    if NEED_DA:
        ptrs = dae_parts_ptr + (split * RK_PAD + q[:, None]) * d_in + cols[None, :].to(tl.int64)
        tl.store(ptrs, dae, mask=col_ok[None, :])


_BLOCK_M, _BLOCK_K, _BLOCK_N = 64, 64, 64


def _splits(n: int, chunks: int, device: torch.device) -> tuple[int, int]:
    """(number of row splits, rows per split): enough programs to fill the device."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter runs programs one by one: fewer, longer programs are faster
    blocks = triton.cdiv(n, _BLOCK_M)
    splits = max(1, min(blocks, triton.cdiv(target, chunks)))
    rows_per_split = triton.cdiv(blocks, splits) * _BLOCK_M
    return triton.cdiv(n, rows_per_split), rows_per_split


def forward(x, weight, bias, A, B, C, scale, stride, p, seed):
    n, d_in = x.shape
    d_out = weight.shape[0]
    r, k = A.shape[0], C.shape[0]
    rk = r * k
    out = torch.empty((n, d_out), device=x.device, dtype=x.dtype)
    t = torch.empty((n, rk), device=x.device, dtype=torch.float32)
    if n == 0:
        return out, t
    ae = expand(A, k, stride, d_in)
    be = expand(B.t(), k, stride, d_out)
    ck = _core(C, r)
    _forward[(triton.cdiv(n, _BLOCK_M),)](
        x, bias if bias is not None else out, ae, ck, be, out, t, seed,
        n, d_in, d_out, rk, x.stride(0), float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, RK_PAD=_rank_pad(rk), BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, PRECISION=_precision(x.dtype))
    out.addmm_(x, weight.t())  # + x @ W.T, accumulated onto bias + s * dropout(x) @ D
    return out, t


def backward(grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB,
             need_dC):
    n, d_in = x.shape
    d_out = weight.shape[0]
    r, k = A.shape[0], C.shape[0]
    m_in, m_out = A.shape[1], B.shape[0]
    rk = r * k
    rk_pad = _rank_pad(rk)
    dev = x.device
    dx = torch.empty((n, d_in) if need_dx else (0,), device=dev, dtype=x.dtype)
    empty = [torch.empty((0,), device=dev, dtype=w.dtype) for w in (A, B, C)]
    if n == 0:
        return (dx, *(torch.zeros_like(w) if need else e
                      for w, need, e in zip((A, B, C), (need_dA, need_dB, need_dC), empty)))
    precision = _precision(x.dtype)
    ck = _core(C, r)

    be = expand(B.t(), k, stride, d_out)
    chunks_out = triton.cdiv(d_out, _BLOCK_N)
    splits, rows_per_split = _splits(n, chunks_out, dev)
    v_parts = torch.empty((chunks_out, n, rk_pad), device=dev, dtype=torch.float32)
    dbe_parts = torch.empty((splits, rk_pad, d_out) if need_dB else (0,), device=dev,
                            dtype=torch.float32)
    _grad_pass[(chunks_out, splits)](
        grad, t, ck, be, v_parts, dbe_parts, n, d_out, rk, grad.stride(0), rows_per_split,
        NEED_DB=need_dB, RK_PAD=rk_pad, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, PRECISION=precision)
    v = v_parts.sum(0) if chunks_out > 1 else v_parts[0]

    dA, dB, dC = empty
    if need_dB:
        dB = (fold(dbe_parts.sum(0)[:rk], r, k, stride, m_out) * scale).t().contiguous().to(B.dtype)
    if need_dC:
        dC = (scale * torch.einsum("nja,njb->ab", t.view(n, r, k),
                                   v[:, :rk].reshape(n, r, k))).contiguous().to(C.dtype)
    if need_dx or need_dA:
        ae = expand(A, k, stride, d_in)
        chunks_in = triton.cdiv(d_in, _BLOCK_K)
        splits, rows_per_split = _splits(n, chunks_in, dev)
        dae_parts = torch.empty((splits, rk_pad, d_in) if need_dA else (0,), device=dev,
                                dtype=torch.float32)
        _input_pass[(chunks_in, splits)](
            x, v, ck, ae, dx, dae_parts, seed, n, d_in, rk, x.stride(0), rows_per_split,
            float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
            HAS_DROPOUT=p > 0.0, NEED_DX=need_dx, NEED_DA=need_dA, RK_PAD=rk_pad,
            BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, PRECISION=precision)
        if need_dA:
            dA = fold(dae_parts.sum(0)[:rk], r, k, stride, m_in).contiguous().to(A.dtype)
        if need_dx:
            dx.addmm_(grad, weight)  # + g @ W, accumulated onto the adapter's dx
    return dx, dA, dB, dC
