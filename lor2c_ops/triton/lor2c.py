"""Triton kernels and launchers for the LoR2C residual op (docs/math.md sections 1, 2).

Traffic (the op's minimum is 3 n*d elements each way):
  forward   `_fwd`, one program per block of rows: reads x once (t = dropout(x) @ A.T), then
            reads layer_out and writes out = layer_out + s * t @ B.T. Extra: t (n x r, fp32).
  backward  `_grad_pass`, grid (column chunks of g, row splits): reads g once; writes the chunk's
            share of u = g @ B (u_parts, chunks x n x r_pad fp32: the chunks are wide, 256-1024
            columns, so this stays a few MB) and a per-split partial of dB = g.T @ t;
            `_sum_chunks`: u = the sum of its shares (n x r_pad, small);
            `_input_pass`, grid (column chunks of x, row splits): reads u and x once for its
            rows (mask regenerated), writes dx = s * (u @ A) * mask and a per-split partial of
            dA = u.T @ dropout(x);
            `_reduce_parts`: dA and dB partials summed over splits, in a fixed order (per
            adapter for multi-adapter batches), scaled, written in the weights' dtype.
  Deterministic: no atomics; every sum runs in a fixed order for a given shape and device.

Precision: the rank-r products run on tensor cores with fp32 accumulation. Half-precision
activations are fed as they are (exact); an fp32 operand (t, u, or fp32 master weights) is split
into hi + lo halves so that its products keep about 16 mantissa bits (plain PyTorch rounds
those operands to the activation dtype, 8 or 11 bits). The dropout scale 1/(1-p) is applied in
fp32 after the products: x * keep is exact in any dtype. fp32 activations use fp32 products.

Multi-adapter batches (GROUPED): rows are visited in the order of a stable sort by adapter id.
Which rows a program takes is worked out inside the kernel from the per-adapter row counts
(`_locate`), so a launch needs no host-side plan and no device-to-host copy (capture-safe).
Grids are sized by the upper bound cdiv(n, rows) + G + 1; programs past the end exit at once.
Rows with id -1 get out = layer_out and dx = 0.
"""

# No `from __future__ import annotations` here: Triton 3.0 (torch 2.4's) does not see a
# `tl.constexpr` annotation read as a string, in its interpreter at least.
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ref.philox import dropout_threshold
from . import INTERPRET
from .philox import dropout_keep


def rank_pad(r: int) -> int:
    """r padded to a power of two >= 16 (tl.dot wants every dimension >= 16). Plain Python: the
    triton helpers called from the host go through the JIT's constexpr machinery (~2 us)."""
    return max(16, 1 << (max(r, 1) - 1).bit_length())


# --- device helpers --------------------------------------------------------------------------

# Triton's interpreter multiplies bfloat16 dot operands as raw bits: there every half-precision
# product is done in fp32 on the same (exactly representable) operand values.
_EMULATED = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b on tensor cores (fp32 accumulation), chained into acc: no second buffer."""
    if _EMULATED:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _cast(v, DT: tl.constexpr):
    """fp32 v to DT rounding to nearest even (the interpreter truncates to bfloat16)."""
    if _EMULATED and DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _split_hi_lo(v, DT: tl.constexpr):
    """fp32 v as hi + lo in dtype DT (hi + lo carries about twice DT's mantissa bits)."""
    hi = v.to(DT)
    lo = (v - hi.to(tl.float32)).to(DT)
    return hi, lo


@triton.jit
def _mm_act(act, w, acc, DT: tl.constexpr, W_EXACT: tl.constexpr, FP32: tl.constexpr):
    """acc + act @ w, act already in the compute dtype (exact activations); w fp32 or DT."""
    if FP32:
        return tl.dot(act, w.to(tl.float32), acc, input_precision="ieee")
    if W_EXACT:
        return _dot(act, w.to(DT), acc)
    w_hi, w_lo = _split_hi_lo(w.to(tl.float32), DT)
    return _dot(act, w_lo, _dot(act, w_hi, acc))


@triton.jit
def _mm_f32(a, w, acc, FP32: tl.constexpr):
    """acc + a @ w for an fp32 a (t or u) and a weight tile w: both split into bf16 hi + lo
    (bf16 has fp32's range, so no overflow or underflow), three chained products."""
    if FP32:
        return tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    a_hi, a_lo = _split_hi_lo(a, tl.bfloat16)
    w_hi, w_lo = _split_hi_lo(w.to(tl.float32), tl.bfloat16)
    return _dot(a_hi, w_lo, _dot(a_lo, w_hi, _dot(a_hi, w_hi, acc)))


@triton.jit
def _locate(unit, counts_ptr, G1, U: tl.constexpr, SCAN: tl.constexpr):
    """Multi-adapter batches: (first sorted position, rows, adapter) of work unit `unit`, where
    each adapter's rows (counts_ptr[a + 1]; counts_ptr[0] for id -1) are cut into units of U
    rows and the units of all adapters are numbered in order. rows == 0 past the last unit."""
    lanes = tl.arange(0, SCAN)
    units_before = unit * 0
    rows_before = unit * 0
    pos = unit * 0
    rows = unit * 0
    slot = unit * 0 - 1
    for s0 in range(0, G1, SCAN):
        c = tl.load(counts_ptr + s0 + lanes, mask=s0 + lanes < G1, other=0)
        nu = (c + U - 1) // U
        cu = tl.cumsum(nu, 0) + units_before
        cr = tl.cumsum(c, 0) + rows_before
        hit = (cu > unit) & (cu - nu <= unit)
        local = unit - (cu - nu)
        pos += tl.sum(tl.where(hit, cr - c + local * U, 0), 0)
        rows += tl.sum(tl.where(hit, tl.minimum(c - local * U, U), 0), 0)
        slot += tl.sum(tl.where(hit, s0 + lanes + 1, 0), 0)
        units_before += tl.sum(nu, 0)
        rows_before += tl.sum(c, 0)
    return pos, rows, slot - 1


@triton.jit
def _segment_units(adapter, counts_ptr, U: tl.constexpr, SCAN: tl.constexpr):
    """(first unit, number of units) of `adapter` (cut into units of U rows as in _locate)."""
    lanes = tl.arange(0, SCAN)
    first = adapter * 0
    for s0 in range(0, adapter + 1, SCAN):
        c = tl.load(counts_ptr + s0 + lanes, mask=s0 + lanes < adapter + 1, other=0)
        first += tl.sum((c + U - 1) // U, 0)
    own = tl.load(counts_ptr + adapter + 1)
    return first, (own + U - 1) // U


@triton.jit
def _split_of(split, n, rows_per_split, counts_ptr, G1, GROUPED: tl.constexpr, SCAN: tl.constexpr):
    """(first sorted position, rows, adapter) of backward row split `split`."""
    if GROUPED:
        return _locate(split, counts_ptr, G1, rows_per_split, SCAN)
    start = split * rows_per_split
    return start, tl.minimum(n - start, rows_per_split), split * 0


@triton.jit
def _rows_of(pos, ok, order_ptr, GROUPED: tl.constexpr):
    if GROUPED:
        return tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
    return pos.to(tl.int64)


# --- forward ---------------------------------------------------------------------------------


@triton.jit
def _fwd(
    x_ptr,
    lo_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    t_ptr,
    seed_ptr,
    order_ptr,
    counts_ptr,
    n,
    G1,
    d_in,
    d_out,
    r,
    stride_x,
    stride_lo,
    stride_ag,
    stride_a0,
    stride_a1,
    stride_bg,
    stride_b0,
    stride_b1,
    scale,
    threshold,
    inv_keep,
    GROUPED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DT: tl.constexpr,
    W_EXACT: tl.constexpr,
    FP32: tl.constexpr,
    R_PAD: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_M)
    if GROUPED:
        start, count, adapter = _locate(pid, counts_ptr, G1, BLOCK_M, SCAN)
    else:
        start, count, adapter = pid * BLOCK_M, tl.minimum(n - pid * BLOCK_M, BLOCK_M), pid * 0
    if count > 0:
        row_ok = lanes < count
        rows = _rows_of(start + lanes, row_ok, order_ptr, GROUPED)
        rk = tl.arange(0, R_PAD)
        rk_ok = rk < r
        a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ag
        b_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_bg
        t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if adapter >= 0:
            for k0 in range(0, d_in, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < d_in
                xt = tl.load(
                    x_ptr + rows[:, None] * stride_x + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if HAS_DROPOUT:  # keep in {0, 1}: x * keep is exact; 1/(1-p) comes after
                    keep = dropout_keep(seed_ptr, rows, k0, threshold, BLOCK_M, BLOCK_K)
                    xt = tl.where(keep, xt, 0.0)
                at = tl.load(
                    a_ptr + rk[None, :] * stride_a0 + cols[:, None] * stride_a1,
                    mask=rk_ok[None, :] & col_ok[:, None],
                    other=0.0,
                )
                t = _mm_act(xt.to(DT), at, t, DT, W_EXACT, FP32)
            if HAS_DROPOUT:
                t = t * inv_keep
            tl.store(
                t_ptr + rows[:, None] * r + rk[None, :], t, mask=row_ok[:, None] & rk_ok[None, :]
            )
        else:
            tl.store(
                t_ptr + rows[:, None] * r + rk[None, :], t, mask=row_ok[:, None] & rk_ok[None, :]
            )
        ts = t * scale  # scaled once: the products then accumulate straight onto layer_out
        for n0 in range(0, d_out, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < d_out
            ok = row_ok[:, None] & col_ok[None, :]
            lo = tl.load(lo_ptr + rows[:, None] * stride_lo + cols[None, :], mask=ok, other=0.0)
            y = lo.to(tl.float32)
            if adapter >= 0:
                bt = tl.load(
                    b_ptr + cols[None, :] * stride_b0 + rk[:, None] * stride_b1,
                    mask=col_ok[None, :] & rk_ok[:, None],
                    other=0.0,
                )
                y = _mm_f32(ts, bt, y, FP32)
            tl.store(out_ptr + rows[:, None] * d_out + cols[None, :], _cast(y, lo.dtype), mask=ok)


# --- backward --------------------------------------------------------------------------------


@triton.jit
def _grad_pass(
    g_ptr,
    t_ptr,
    b_ptr,
    u_parts_ptr,
    db_parts_ptr,
    order_ptr,
    counts_ptr,
    n,
    G1,
    d_out,
    r,
    stride_g,
    stride_bg,
    stride_b0,
    stride_b1,
    rows_per_split,
    scale,
    stride_o0,
    stride_o1,
    DT: tl.constexpr,
    W_EXACT: tl.constexpr,
    FP32: tl.constexpr,
    GROUPED: tl.constexpr,
    NEED_DB: tl.constexpr,
    DIRECT: tl.constexpr,
    R_PAD: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DIRECT (a single row split): db_parts_ptr is dB itself, (d_out, r) at strides
    (stride_o0, stride_o1), written scaled in its dtype; no reduction launch follows."""
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    start, count, adapter = _split_of(split, n, rows_per_split, counts_ptr, G1, GROUPED, SCAN)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    db = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    if (count > 0) & (adapter >= 0):
        b_ptr += adapter.to(tl.int64) * stride_bg
        b = tl.load(
            b_ptr + cols[:, None] * stride_b0 + rk[None, :] * stride_b1,
            mask=col_ok[:, None] & rk_ok[None, :],
            other=0.0,
        )
        if not W_EXACT:
            b_hi, b_lo = _split_hi_lo(b.to(tl.float32), DT)
        for m0 in range(0, count, BLOCK_M):
            lanes = m0 + tl.arange(0, BLOCK_M)
            row_ok = lanes < count
            rows = _rows_of(start + lanes, row_ok, order_ptr, GROUPED)
            g = tl.load(
                g_ptr + rows[:, None] * stride_g + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            if FP32:
                u = tl.dot(g, b.to(tl.float32), u, input_precision="ieee")
            elif W_EXACT:
                u = _dot(g.to(DT), b.to(DT), u)
            else:
                u = _dot(g.to(DT), b_lo, _dot(g.to(DT), b_hi, u))
            tl.store(
                u_parts_ptr + (chunk * n + rows[:, None]) * R_PAD + rk[None, :],
                u,
                mask=row_ok[:, None],
            )
            if NEED_DB:
                t = tl.load(
                    t_ptr + rows[:, None] * r + rk[None, :],
                    mask=row_ok[:, None] & rk_ok[None, :],
                    other=0.0,
                )
                if FP32:
                    db = tl.dot(tl.trans(g), t, db, input_precision="ieee")
                else:
                    t_hi, t_lo = _split_hi_lo(t, DT)
                    gt = tl.trans(g.to(DT))
                    db = _dot(gt, t_lo, _dot(gt, t_hi, db))
    if NEED_DB:
        if DIRECT:
            tl.store(
                db_parts_ptr + cols[:, None] * stride_o0 + rk[None, :] * stride_o1,
                _cast(db * scale, db_parts_ptr.dtype.element_ty),
                mask=col_ok[:, None] & rk_ok[None, :],
            )
        else:
            db_ptrs = (
                db_parts_ptr + (split * d_out + cols[:, None].to(tl.int64)) * R_PAD + rk[None, :]
            )
            tl.store(db_ptrs, db, mask=col_ok[:, None])


@triton.jit
def _input_pass(
    x_ptr,
    u_parts_ptr,
    a_ptr,
    dx_ptr,
    da_parts_ptr,
    seed_ptr,
    order_ptr,
    counts_ptr,
    n,
    G1,
    d_in,
    r,
    stride_x,
    stride_ag,
    stride_a0,
    stride_a1,
    rows_per_split,
    scale,
    threshold,
    inv_keep,
    U_CHUNKS,
    stride_o0,
    stride_o1,
    DT: tl.constexpr,
    FP32: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,
    DIRECT: tl.constexpr,
    R_PAD: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    start, count, adapter = _split_of(split, n, rows_per_split, counts_ptr, G1, GROUPED, SCAN)
    col0 = chunk * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < d_in
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ag
    a = tl.load(
        a_ptr + rk[:, None] * stride_a0 + cols[None, :] * stride_a1,
        mask=rk_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    da = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        lanes = m0 + tl.arange(0, BLOCK_M)
        row_ok = lanes < count
        rows = _rows_of(start + lanes, row_ok, order_ptr, GROUPED)
        ok = row_ok[:, None] & col_ok[None, :]
        if adapter < 0:  # rows without an adapter: no gradient reaches x
            if NEED_DX:
                tl.store(
                    dx_ptr + rows[:, None] * d_in + cols[None, :],
                    tl.zeros((BLOCK_M, BLOCK_K), dtype=dx_ptr.dtype.element_ty),
                    mask=ok,
                )
        else:
            u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for c in range(0, U_CHUNKS):
                u += tl.load(
                    u_parts_ptr + (c * n + rows[:, None]) * R_PAD + rk[None, :],
                    mask=row_ok[:, None],
                    other=0.0,
                )
            if HAS_DROPOUT:
                keep = dropout_keep(seed_ptr, rows, col0, threshold, BLOCK_M, BLOCK_K)
            if NEED_DX:
                dx = _mm_f32(
                    u * (scale * inv_keep), a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), FP32
                )
                # Dropped elements are zeroed by a second, predicated store of the same pointers
                # (the same thread writes an element both times, in order) rather than by
                # tl.where on dx: that put the mask into the MMA layout through shared memory,
                # with the Philox words' join/interleave conversions, where this keeps the mask
                # in the store's layout (the TTGIR has only dx's own MMA-to-store conversion).
                dx_ptrs = dx_ptr + rows[:, None] * d_in + cols[None, :]
                tl.store(dx_ptrs, _cast(dx, dx_ptr.dtype.element_ty), mask=ok)
                if HAS_DROPOUT:
                    zero = tl.zeros((BLOCK_M, BLOCK_K), dtype=dx_ptr.dtype.element_ty)
                    tl.store(dx_ptrs, zero, mask=ok & (keep == 0))
            if NEED_DA:
                xd = tl.load(
                    x_ptr + rows[:, None] * stride_x + cols[None, :],
                    mask=ok,
                    other=0.0,
                    eviction_policy="evict_first",
                )
                if HAS_DROPOUT:
                    xd = tl.where(keep, xd, 0.0)
                ut = tl.trans(u)
                if FP32:
                    da = tl.dot(ut, xd.to(tl.float32), da, input_precision="ieee")
                else:
                    u_hi, u_lo = _split_hi_lo(ut, DT)
                    da = _dot(u_lo, xd.to(DT), _dot(u_hi, xd.to(DT), da))
    if NEED_DA:
        if HAS_DROPOUT:
            da = da * inv_keep
        if DIRECT:  # a single row split: da_parts_ptr is dA (r, d_in) itself
            tl.store(
                da_parts_ptr + rk[:, None] * stride_o0 + cols[None, :] * stride_o1,
                _cast(da * scale, da_parts_ptr.dtype.element_ty),
                mask=rk_ok[:, None] & col_ok[None, :],
            )
        else:
            da_ptrs = (
                da_parts_ptr + (split * R_PAD + rk[:, None]) * d_in + cols[None, :].to(tl.int64)
            )
            tl.store(da_ptrs, da, mask=col_ok[None, :])


@triton.jit
def _sum_chunks(parts_ptr, out_ptr, n, chunks, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """out (n, R_PAD) = sum over the chunks of parts (chunks, n, R_PAD), in chunk order."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None].to(tl.int64) * R_PAD + tl.arange(0, R_PAD)[None, :]
    ok = rows[:, None] < n
    acc = tl.zeros((BLOCK, R_PAD), dtype=tl.float32)
    for c in range(0, chunks):
        acc += tl.load(parts_ptr + c * n.to(tl.int64) * R_PAD + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


@triton.jit
def _reduce_parts(
    parts_ptr,
    out_ptr,
    counts_ptr,
    splits,
    rows_per_split,
    width,
    r,
    scale,
    stride_og,
    stride_o0,
    stride_o1,
    part_stride,
    R_PAD: tl.constexpr,
    ROWS_ARE_RANK: tl.constexpr,
    GROUPED: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[adapter] = scale * (sum over the adapter's splits, in order, of parts[split]).

    parts: (splits, R_PAD, width) when ROWS_ARE_RANK (dA), else (splits, width, R_PAD) (dB);
    out[adapter]: (r, width) or (width, r) with the given strides."""
    chunk = tl.program_id(0)
    adapter = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < width
    rk = tl.arange(0, R_PAD)
    if GROUPED:
        first, count = _segment_units(adapter, counts_ptr, rows_per_split, SCAN)
    else:
        first, count = adapter * 0, splits + adapter * 0
    if ROWS_ARE_RANK:
        offs = rk[:, None] * width + cols[None, :]
        ok = (rk[:, None] < r) & col_ok[None, :]
        acc = tl.zeros((R_PAD, BLOCK), dtype=tl.float32)
    else:
        offs = cols[:, None] * R_PAD + rk[None, :]
        ok = col_ok[:, None] & (rk[None, :] < r)
        acc = tl.zeros((BLOCK, R_PAD), dtype=tl.float32)
    parts_ptr += first.to(tl.int64) * part_stride
    for _ in range(0, count):
        acc += tl.load(parts_ptr + offs, mask=ok, other=0.0)
        parts_ptr += part_stride
    acc = acc * scale
    out_ptr += adapter.to(tl.int64) * stride_og
    if ROWS_ARE_RANK:
        dst = out_ptr + rk[:, None] * stride_o0 + cols[None, :] * stride_o1
    else:
        dst = out_ptr + cols[:, None] * stride_o0 + rk[None, :] * stride_o1
    tl.store(dst, _cast(acc, out_ptr.dtype.element_ty), mask=ok)


# --- tile configurations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Tiles of the three kernels; `waves` sets the row splits: about waves x SMs programs."""

    fwd_m: int = 64
    fwd_k: int = 128
    fwd_n: int = 128
    fwd_warps: int = 4
    fwd_stages: int = 3
    grad_m: int = 32
    grad_n: int = 512
    grad_warps: int = 8
    grad_stages: int = 3
    in_m: int = 32
    in_k: int = 256
    in_warps: int = 8
    in_stages: int = 3
    waves: int = 2
    in_m_multi: int = 16  # gathered rows cost registers: smaller row blocks for multi-adapter


# The interpreter runs programs one by one over numpy arrays: small tiles waste less on masks.
_INTERPRETER = Config(16, 32, 32, 1, 1, 16, 64, 1, 1, 16, 32, 1, 1, 1, 16)

# Measured on an NVIDIA H200 (torch 2.11, triton 3.6), bf16, n=16384, d=4096, GPU time from
# CUDA-graph replay against the memory-bound limit (3 n*d elements each way at the 4.30 TB/s of
# an out-of-place add measured in the same run), by benchmarks/sweep_triton.py:
#   r=16, p=0:   forward 113.6 us (82%) with fwd_m=32, stages=4 (64/3: 120.8 us, 78%; 32/256/8
#                warps: 118.9 us); backward 155.5 us (60%): grad pass 65.4 us at 32x512, 8 warps
#                (256 columns: 77.8 us; 1 wave: 87.3 us), input pass at 32x256, 8 warps best
#                (in_k=128, 4 warps: +19 us; in_m=64: +125 us).
#   r=16, p=0.1: forward 132.8 us (70%), backward 267.8 us (35%): regenerating the mask costs the
#                input pass +112 us against +19 us in the forward (not understood yet).
#   r=64:        p=0 forward 136.9 us (68%) at 64/128/128, 4 warps; backward 452.8 us (input
#                pass at 32x128, 4 warps, 4 stages: it spills at p=0.1, so 8 warps here); p=0.1
#                backward 619 us.
# Keyed by (r_pad, fp32 activations); other ranks and fp32 use the defaults of config_for.
TABLE: dict = {
    (16, False): Config(fwd_m=32, fwd_stages=4),
    (64, False): Config(
        fwd_m=64,
        fwd_k=128,
        fwd_n=128,
        fwd_warps=4,
        fwd_stages=3,
        grad_m=16,
        grad_n=256,
        in_m=32,
        in_k=128,
        in_warps=8,
        in_stages=4,
    ),
}

_SMS: dict = {}


def config_for(device: torch.device, d: int, r_pad: int, fp32: bool) -> Config:
    """The tiles for (d, r_pad, fp32 activations): the measured TABLE entry if there is one,
    else a default sized so that no kernel spills registers at that rank (checked for sm_90 by
    scripts/check_triton_compile.py)."""
    if device.type != "cuda":
        return _INTERPRETER
    cfg = TABLE.get((r_pad, fp32))
    if cfg is not None:
        return cfg
    if r_pad <= 32:
        return Config() if not fp32 else Config(fwd_k=64, fwd_n=64, grad_n=256, in_k=64)
    # rank 64 and above: the rank-wide operands (t, u and the weight tiles, split hi + lo)
    # take the registers that wider column tiles would need
    return Config(
        fwd_m=32,
        fwd_k=64 if fp32 else 128,
        fwd_n=64,
        fwd_warps=8,
        grad_m=16,
        grad_n=128 if fp32 else 256,  # fp32 at 256 columns: 255 registers and a 4-byte spill
        in_m=32,
        in_k=64 if fp32 else 128,
    )


def _programs(device: torch.device, waves: int) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return waves * sms


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers (not triton.cdiv: see rank_pad; 11 calls a backward)."""
    return -(-a // b)


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_SCAN = 64


def _kinds(x_dtype, w_dtype):
    fp32 = x_dtype == torch.float32
    return _DT[x_dtype], w_dtype == x_dtype, fp32


# --- launchers -------------------------------------------------------------------------------


def _forward_impl(x, layer_out, A_bank, B_bank, order, counts, scale, p, seed, cfg=None, out=None):
    """(out, t); `out` may be layer_out itself (each element is read before it is written)."""
    n, d_in = x.shape
    G, d_out, r = B_bank.shape
    if out is None:
        out = torch.empty((n, d_out), device=x.device, dtype=layer_out.dtype)
    t = torch.empty((n, r), device=x.device, dtype=torch.float32)
    if n == 0:
        return out, t
    r_pad = rank_pad(r)
    dt, exact, fp32 = _kinds(x.dtype, A_bank.dtype)
    cfg = cfg or config_for(x.device, max(d_in, d_out), r_pad, fp32)
    grouped = order is not None
    grid = (_cdiv(n, cfg.fwd_m) + (G + 1 if grouped else 0),)
    _fwd[grid](
        x,
        layer_out,
        A_bank,
        B_bank,
        out,
        t,
        seed,
        order if grouped else x,
        counts if grouped else x,
        n,
        G + 1,
        d_in,
        d_out,
        r,
        x.stride(0),
        layer_out.stride(0),
        A_bank.stride(0),
        A_bank.stride(1),
        A_bank.stride(2),
        B_bank.stride(0),
        B_bank.stride(1),
        B_bank.stride(2),
        float(scale),
        dropout_threshold(p),
        1.0 / (1.0 - p),
        GROUPED=grouped,
        HAS_DROPOUT=p > 0.0,
        DT=dt,
        W_EXACT=exact,
        FP32=fp32,
        R_PAD=r_pad,
        SCAN=_SCAN,
        BLOCK_M=cfg.fwd_m,
        BLOCK_K=cfg.fwd_k,
        BLOCK_N=cfg.fwd_n,
        num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages,
    )
    return out, t


def _split_rows(n: int, block_m: int, target: int) -> int:
    """Rows per split: a multiple of block_m giving about `target` splits."""
    blocks = _cdiv(max(n, 1), block_m)
    return _cdiv(blocks, max(1, min(blocks, target))) * block_m


def _reduce(parts, out, counts, splits, rows_per_split, d, r, r_pad, scale, rank_rows, grouped):
    """out (G, ., .) = scale * the sum of each adapter's row-split partials, in a fixed order:
    dA from (splits, r_pad, d) partials (rank_rows), dB from (splits, d, r_pad) ones."""
    _reduce_parts[(_cdiv(d, 64), out.shape[0])](
        parts,
        out,
        counts,
        splits,
        rows_per_split,
        d,
        r,
        float(scale),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        d * r_pad,
        R_PAD=r_pad,
        ROWS_ARE_RANK=rank_rows,
        GROUPED=grouped,
        SCAN=_SCAN,
        BLOCK=64,
    )


def _backward_impl(
    grad, x, t, A_bank, B_bank, order, counts, scale, p, seed, need_dx, need_dA, need_dB, cfg=None
):
    n, d_in = x.shape
    G, d_out, r = B_bank.shape
    dev = x.device
    dx = torch.empty((n, d_in) if need_dx else (0,), device=dev, dtype=x.dtype)
    dA = torch.empty(A_bank.shape if need_dA else (0,), device=dev, dtype=A_bank.dtype)
    dB = torch.empty(B_bank.shape if need_dB else (0,), device=dev, dtype=B_bank.dtype)
    if n == 0:
        dA.zero_()
        dB.zero_()
        return dx, dA, dB
    r_pad = rank_pad(r)
    dt, exact, fp32 = _kinds(x.dtype, A_bank.dtype)
    cfg = cfg or config_for(dev, max(d_in, d_out), r_pad, fp32)
    grouped = order is not None
    order_arg = order if grouped else x
    counts_arg = counts if grouped else x
    programs = _programs(dev, cfg.waves)
    extra = G + 1 if grouped else 0

    chunks_out = _cdiv(d_out, cfg.grad_n)
    rps = _split_rows(n, cfg.grad_m, _cdiv(programs, chunks_out))
    splits = _cdiv(n, rps) + extra
    direct = not grouped and splits == 1  # one row split: the pass writes dB itself
    u_parts = torch.empty((chunks_out, n, r_pad), device=dev, dtype=torch.float32)
    if need_dB and not direct:
        db_parts = torch.empty((splits, d_out, r_pad), device=dev, dtype=torch.float32)
    else:
        db_parts = dB
    _grad_pass[(chunks_out, splits)](
        grad,
        t,
        B_bank,
        u_parts,
        db_parts,
        order_arg,
        counts_arg,
        n,
        G + 1,
        d_out,
        r,
        grad.stride(0),
        B_bank.stride(0),
        B_bank.stride(1),
        B_bank.stride(2),
        rps,
        float(scale),
        dB.stride(-2) if need_dB else 0,
        dB.stride(-1) if need_dB else 0,
        DT=dt,
        W_EXACT=exact,
        FP32=fp32,
        GROUPED=grouped,
        NEED_DB=need_dB,
        DIRECT=direct,
        R_PAD=r_pad,
        SCAN=_SCAN,
        BLOCK_M=cfg.grad_m,
        BLOCK_N=cfg.grad_n,
        num_warps=cfg.grad_warps,
        num_stages=cfg.grad_stages,
    )
    if need_dB and not direct:
        _reduce(db_parts, dB, counts_arg, splits, rps, d_out, r, r_pad, scale, False, grouped)

    if need_dx or need_dA:
        if chunks_out > 1:  # u summed once (n x r_pad), not once per input-pass column chunk
            u = torch.empty((n, r_pad), device=dev, dtype=torch.float32)
            _sum_chunks[(_cdiv(n, 128),)](u_parts, u, n, chunks_out, R_PAD=r_pad, BLOCK=128)
        else:
            u = u_parts
        chunks_in = _cdiv(d_in, cfg.in_k)
        in_m = cfg.in_m_multi if grouped else cfg.in_m
        rps = _split_rows(n, in_m, _cdiv(programs, chunks_in))
        splits = _cdiv(n, rps) + extra
        direct = not grouped and splits == 1  # one row split: the pass writes dA itself
        if need_dA and not direct:
            da_parts = torch.empty((splits, r_pad, d_in), device=dev, dtype=torch.float32)
        else:
            da_parts = dA
        _input_pass[(chunks_in, splits)](
            x,
            u,
            A_bank,
            dx,
            da_parts,
            seed,
            order_arg,
            counts_arg,
            n,
            G + 1,
            d_in,
            r,
            x.stride(0),
            A_bank.stride(0),
            A_bank.stride(1),
            A_bank.stride(2),
            rps,
            float(scale),
            dropout_threshold(p),
            1.0 / (1.0 - p),
            1,
            dA.stride(-2) if need_dA else 0,
            dA.stride(-1) if need_dA else 0,
            DT=dt,
            FP32=fp32,
            GROUPED=grouped,
            HAS_DROPOUT=p > 0.0,
            NEED_DX=need_dx,
            NEED_DA=need_dA,
            DIRECT=direct,
            R_PAD=r_pad,
            SCAN=_SCAN,
            BLOCK_M=in_m,
            BLOCK_K=cfg.in_k,
            num_warps=cfg.in_warps,
            num_stages=cfg.in_stages,
        )
        if need_dA and not direct:
            _reduce(da_parts, dA, counts_arg, splits, rps, d_in, r, r_pad, scale, True, grouped)
    return dx, dA, dB


def plan(ids: torch.Tensor, adapters: int):
    """(order, counts) for a multi-adapter batch, on the device, without a host sync: rows sorted
    stably by adapter id, and int32 row counts per id (slot 0: id -1, slot a + 1: adapter a)."""
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(adapters + 1, dtype=torch.int32, device=ids.device)
    counts.index_add_(0, ids + 1, torch.ones_like(ids, dtype=torch.int32))
    return order, counts


# --- the launchers the op registration calls -------------------------------------------------


def forward(x, layer_out, A, B, scale, p, seed):
    return _forward_impl(x, layer_out, A.unsqueeze(0), B.unsqueeze(0), None, None, scale, p, seed)


def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
    dx, dA, dB = _backward_impl(
        grad,
        x,
        t,
        A.unsqueeze(0),
        B.unsqueeze(0),
        None,
        None,
        scale,
        p,
        seed,
        need_dx,
        need_dA,
        need_dB,
    )
    return dx, dA[0] if need_dA else dA, dB[0] if need_dB else dB


def multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p, seed):
    order, counts = plan(ids, A_bank.shape[0])
    return _forward_impl(x, layer_out, A_bank, B_bank, order, counts, scale, p, seed)


def multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB):
    order, counts = plan(ids, A_bank.shape[0])
    return _backward_impl(
        grad, x, t, A_bank, B_bank, order, counts, scale, p, seed, need_dx, need_dA, need_dB
    )
