"""Triton kernels and launchers for the LoR2C residual op (DESIGN.md 2.1).

Forward: one program per block of rows reads x once (t = dropout(x) @ A.T over d_in), then
layer_out once while writing out = layer_out + s * t @ B.T over d_out.

Backward, deterministic and without n x d temporaries:
  1. `_grad_pass`, grid (d_out chunks, row splits): reads g once; writes the chunk's share of
     u = g @ B for its rows and accumulates dB = g.T @ t for the chunk over its rows;
  2. the u shares are summed (n x r, small);
  3. `_input_pass`, grid (d_in chunks, row splits): reads x once, regenerating the mask;
     writes dx = s * (u @ A) * mask and accumulates dA = u.T @ (x * mask) over its rows;
  4. the per-split dA and dB partials (splits x r x d, small) are summed and scaled.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ref.philox import dropout_threshold
from .philox import dropout_scale


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot wants every dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    # fp32 activations get exact fp32 products; half activations carry fewer mantissa bits than
    # tf32, so tf32 products cost them nothing.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _forward(x_ptr, lo_ptr, a_ptr, b_ptr, out_ptr, t_ptr, seed_ptr,
             n, d_in, d_out, r, stride_x, stride_lo, stride_a0, stride_a1, stride_b0, stride_b1,
             scale, threshold, inv_keep,
             HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r

    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < d_in
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            xt = xt * dropout_scale(seed_ptr, rows, k0, threshold, inv_keep, BLOCK_M, BLOCK_K)
        at = tl.load(a_ptr + rk[None, :] * stride_a0 + cols[:, None] * stride_a1,
                     mask=rk_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
        t += tl.dot(xt, at, input_precision=PRECISION)
    tl.store(t_ptr + rows64[:, None] * r + rk[None, :], t, mask=row_ok[:, None] & rk_ok[None, :])

    for n0 in range(0, d_out, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < d_out
        bt = tl.load(b_ptr + cols[None, :] * stride_b0 + rk[:, None] * stride_b1,
                     mask=col_ok[None, :] & rk_ok[:, None], other=0.0).to(tl.float32)
        ok = row_ok[:, None] & col_ok[None, :]
        lo = tl.load(lo_ptr + rows64[:, None] * stride_lo + cols[None, :], mask=ok, other=0.0)
        y = lo.to(tl.float32) + scale * tl.dot(t, bt, input_precision=PRECISION)
        tl.store(out_ptr + rows64[:, None] * d_out + cols[None, :], y.to(lo.dtype), mask=ok)


@triton.jit
def _grad_pass(g_ptr, t_ptr, b_ptr, u_parts_ptr, db_parts_ptr,
               n, d_out, r, stride_g, stride_b0, stride_b1, rows_per_split,
               NEED_DB: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    b = tl.load(b_ptr + cols[:, None] * stride_b0 + rk[None, :] * stride_b1,
                mask=col_ok[:, None] & rk_ok[None, :], other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        u = tl.dot(g, b, input_precision=PRECISION)
        u_ptrs = u_parts_ptr + (chunk * n + rows64[:, None]) * R_PAD + rk[None, :]
        tl.store(u_ptrs, u, mask=row_ok[:, None])
        if NEED_DB:
            t = tl.load(t_ptr + rows64[:, None] * r + rk[None, :],
                        mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
            db += tl.dot(tl.trans(g), t, input_precision=PRECISION)
    if NEED_DB:
        db_ptrs = db_parts_ptr + (split * d_out + cols[:, None].to(tl.int64)) * R_PAD + rk[None, :]
        tl.store(db_ptrs, db, mask=col_ok[:, None])


@triton.jit
def _input_pass(x_ptr, u_ptr, a_ptr, dx_ptr, da_parts_ptr, seed_ptr,
                n, d_in, r, stride_x, stride_a0, stride_a1, rows_per_split,
                scale, threshold, inv_keep,
                HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    col0 = chunk * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < d_in
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    a = tl.load(a_ptr + rk[:, None] * stride_a0 + cols[None, :] * stride_a1,
                mask=rk_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    da = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        u = tl.load(u_ptr + rows64[:, None] * R_PAD + rk[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_DROPOUT:
            mask = dropout_scale(seed_ptr, rows, col0, threshold, inv_keep, BLOCK_M, BLOCK_K)
        if NEED_DX:
            dx = scale * tl.dot(u, a, input_precision=PRECISION)
            if HAS_DROPOUT:
                dx = dx * mask
            tl.store(dx_ptr + rows64[:, None] * d_in + cols[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DA:
            xd = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok,
                         other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                xd = xd * mask
            da += tl.dot(tl.trans(u), xd, input_precision=PRECISION)
    if NEED_DA:
        da_ptrs = da_parts_ptr + (split * R_PAD + rk[:, None]) * d_in + cols[None, :].to(tl.int64)
        tl.store(da_ptrs, da, mask=col_ok[None, :])


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


def forward(x, layer_out, A, B, scale, p, seed):
    n, d_in = x.shape
    d_out, r = B.shape
    out = torch.empty((n, d_out), device=x.device, dtype=layer_out.dtype)
    t = torch.empty((n, r), device=x.device, dtype=torch.float32)
    if n == 0:
        return out, t
    _forward[(triton.cdiv(n, _BLOCK_M),)](
        x, layer_out, A, B, out, t, seed,
        n, d_in, d_out, r, x.stride(0), layer_out.stride(0), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, R_PAD=_rank_pad(r), BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K,
        BLOCK_N=_BLOCK_N, PRECISION=_precision(x.dtype))
    return out, t


def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
    n, d_in = x.shape
    d_out, r = B.shape
    r_pad = _rank_pad(r)
    dev = x.device
    dx = torch.empty((n, d_in) if need_dx else (0,), device=dev, dtype=x.dtype)
    empty_a = torch.empty((0,), device=dev, dtype=A.dtype)
    empty_b = torch.empty((0,), device=dev, dtype=B.dtype)
    if n == 0:
        return (dx, torch.zeros_like(A) if need_dA else empty_a,
                torch.zeros_like(B) if need_dB else empty_b)
    precision = _precision(x.dtype)

    chunks_out = triton.cdiv(d_out, _BLOCK_N)
    splits, rows_per_split = _splits(n, chunks_out, dev)
    u_parts = torch.empty((chunks_out, n, r_pad), device=dev, dtype=torch.float32)
    db_parts = torch.empty((splits, d_out, r_pad) if need_dB else (0,), device=dev,
                           dtype=torch.float32)
    _grad_pass[(chunks_out, splits)](
        grad, t, B, u_parts, db_parts, n, d_out, r, grad.stride(0), B.stride(0), B.stride(1),
        rows_per_split, NEED_DB=need_dB, R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        PRECISION=precision)
    u = u_parts.sum(0) if chunks_out > 1 else u_parts[0]

    dA = empty_a
    if need_dx or need_dA:
        chunks_in = triton.cdiv(d_in, _BLOCK_K)
        splits, rows_per_split = _splits(n, chunks_in, dev)
        da_parts = torch.empty((splits, r_pad, d_in) if need_dA else (0,), device=dev,
                               dtype=torch.float32)
        _input_pass[(chunks_in, splits)](
            x, u, A, dx, da_parts, seed, n, d_in, r, x.stride(0), A.stride(0), A.stride(1),
            rows_per_split, float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
            HAS_DROPOUT=p > 0.0, NEED_DX=need_dx, NEED_DA=need_dA, R_PAD=r_pad,
            BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, PRECISION=precision)
        if need_dA:
            dA = (da_parts.sum(0)[:r] * scale).to(A.dtype)
    dB = (db_parts.sum(0)[:, :r] * scale).to(B.dtype) if need_dB else empty_b
    return dx, dA, dB
