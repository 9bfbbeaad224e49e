"""Triton kernels and launchers for the LoR2C residual op (DESIGN.md 2.1, 2.2).

Forward: one program per block of rows reads x once (t = dropout(x) @ A.T over d_in), then
layer_out once while writing out = layer_out + s * t @ B.T over d_out.

Backward, deterministic and without n x d temporaries:
  1. `_grad_pass`, grid (d_out chunks, row splits): reads g once; writes the chunk's share of
     u = g @ B for its rows and accumulates dB = g.T @ t for the chunk over its rows;
  2. the u shares are summed (n x r, small);
  3. `_input_pass`, grid (d_in chunks, row splits): reads x once, regenerating the mask;
     writes dx = s * (u @ A) * mask and accumulates dA = u.T @ (x * mask) over its rows;
  4. the per-split dA and dB partials (splits x r x d, small) are summed and scaled.

Multi-adapter batches (GROUPED): rows are visited in the order of a stable sort by adapter id;
every forward block and backward split holds rows of one adapter, read from the weight banks
in place at that adapter's offset. Rows with id -1 get out = layer_out and dx = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
def _block_rows(pid, n, order_ptr, start_ptr, count_ptr, adapter_ptr, GROUPED: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """(row indices, row mask, adapter) of forward block `pid`."""
    lanes = tl.arange(0, BLOCK_M)
    if GROUPED:
        start = tl.load(start_ptr + pid)
        ok = lanes < tl.load(count_ptr + pid)
        rows = tl.load(order_ptr + start + lanes, mask=ok, other=0)
        adapter = tl.load(adapter_ptr + pid)
    else:
        rows = pid * BLOCK_M + lanes
        ok = rows < n
        adapter = pid * 0
    return rows, ok, adapter


@triton.jit
def _split_range(split, n, rows_per_split, start_ptr, end_ptr, adapter_ptr,
                 GROUPED: tl.constexpr):
    """[start, end) positions and adapter of backward split `split`."""
    if GROUPED:
        return tl.load(start_ptr + split), tl.load(end_ptr + split), tl.load(adapter_ptr + split)
    start = split * rows_per_split
    return start, tl.minimum(start + rows_per_split, n), split * 0


@triton.jit
def _forward(x_ptr, lo_ptr, a_ptr, b_ptr, out_ptr, t_ptr, seed_ptr,
             order_ptr, blk_start_ptr, blk_count_ptr, blk_adapter_ptr,
             n, d_in, d_out, r, stride_x, stride_lo, stride_ag, stride_a0, stride_a1,
             stride_bg, stride_b0, stride_b1, scale, threshold, inv_keep,
             GROUPED: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    rows, row_ok, adapter = _block_rows(tl.program_id(0), n, order_ptr, blk_start_ptr,
                                        blk_count_ptr, blk_adapter_ptr, GROUPED, BLOCK_M)
    rows64 = rows.to(tl.int64)
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ag
    b_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_bg

    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if adapter >= 0:
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
        ok = row_ok[:, None] & col_ok[None, :]
        lo = tl.load(lo_ptr + rows64[:, None] * stride_lo + cols[None, :], mask=ok, other=0.0)
        y = lo.to(tl.float32)
        if adapter >= 0:
            bt = tl.load(b_ptr + cols[None, :] * stride_b0 + rk[:, None] * stride_b1,
                         mask=col_ok[None, :] & rk_ok[:, None], other=0.0).to(tl.float32)
            y += scale * tl.dot(t, bt, input_precision=PRECISION)
        tl.store(out_ptr + rows64[:, None] * d_out + cols[None, :], y.to(lo.dtype), mask=ok)


@triton.jit
def _grad_pass(g_ptr, t_ptr, b_ptr, u_parts_ptr, db_parts_ptr,
               order_ptr, split_start_ptr, split_end_ptr, split_adapter_ptr,
               n, d_out, r, stride_g, stride_bg, stride_b0, stride_b1, rows_per_split,
               GROUPED: tl.constexpr, NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    start, end, adapter = _split_range(split, n, rows_per_split, split_start_ptr, split_end_ptr,
                                       split_adapter_ptr, GROUPED)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    db = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    if adapter >= 0:
        b_ptr += adapter.to(tl.int64) * stride_bg
        b = tl.load(b_ptr + cols[:, None] * stride_b0 + rk[None, :] * stride_b1,
                    mask=col_ok[:, None] & rk_ok[None, :], other=0.0).to(tl.float32)
        for m0 in range(start, end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < end
            if GROUPED:
                rows64 = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            else:
                rows64 = pos.to(tl.int64)
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
                order_ptr, split_start_ptr, split_end_ptr, split_adapter_ptr,
                n, d_in, r, stride_x, stride_ag, stride_a0, stride_a1, rows_per_split,
                scale, threshold, inv_keep,
                GROUPED: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr,
                NEED_DA: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    start, end, adapter = _split_range(split, n, rows_per_split, split_start_ptr, split_end_ptr,
                                       split_adapter_ptr, GROUPED)
    col0 = chunk * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < d_in
    rk = tl.arange(0, R_PAD)
    rk_ok = rk < r
    a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ag
    a = tl.load(a_ptr + rk[:, None] * stride_a0 + cols[None, :] * stride_a1,
                mask=rk_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    da = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        if GROUPED:
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0)
        else:
            rows = pos
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        if adapter < 0:  # rows without an adapter: no gradient reaches x
            if NEED_DX:
                tl.store(dx_ptr + rows64[:, None] * d_in + cols[None, :],
                         tl.zeros((BLOCK_M, BLOCK_K), dtype=dx_ptr.dtype.element_ty), mask=ok)
        else:
            u = tl.load(u_ptr + rows64[:, None] * R_PAD + rk[None, :], mask=row_ok[:, None],
                        other=0.0)
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


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one: fewer, longer programs are faster


@dataclass
class _Plan:
    """How rows are grouped: None fields mean the plain op (one adapter, rows in order)."""
    order: Optional[torch.Tensor] = None          # int64 (n,): rows sorted by adapter id
    segments: Optional[list] = None               # [(start, end, adapter)] over `order`

    def forward_blocks(self, device):
        starts, counts, adapters = [], [], []
        for start, end, adapter in self.segments:
            for s in range(start, end, _BLOCK_M):
                starts.append(s)
                counts.append(min(_BLOCK_M, end - s))
                adapters.append(adapter)
        return [torch.tensor(v, dtype=torch.int32, device=device) for v in (starts, counts, adapters)]

    def splits(self, n: int, chunks: int, device) -> tuple[int, int, list]:
        """(number of splits, rows per split, [start, end, adapter tensors] or Nones)."""
        target = max(1, triton.cdiv(_target_programs(device), chunks))
        if self.order is None:
            blocks = triton.cdiv(n, _BLOCK_M)
            splits = max(1, min(blocks, target))
            rows_per_split = triton.cdiv(blocks, splits) * _BLOCK_M
            return triton.cdiv(max(n, 1), rows_per_split), rows_per_split, [None, None, None]
        blocks = sum(triton.cdiv(e - s, _BLOCK_M) for s, e, _ in self.segments)
        rows_per_split = triton.cdiv(blocks, target) * _BLOCK_M if blocks else _BLOCK_M
        starts, ends, adapters = [], [], []
        for start, end, adapter in self.segments:
            for s in range(start, end, rows_per_split):
                starts.append(s)
                ends.append(min(end, s + rows_per_split))
                adapters.append(adapter)
        tables = [torch.tensor(v, dtype=torch.int32, device=device) for v in (starts, ends, adapters)]
        return len(starts), rows_per_split, tables


def _grouped_plan(ids: torch.Tensor, adapters: int) -> _Plan:
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=adapters + 1).tolist()
    segments, start = [], 0
    for slot, count in enumerate(counts):
        if count:
            segments.append((start, start + count, slot - 1))
        start += count
    return _Plan(order=order, segments=segments)


def _forward_impl(x, layer_out, A_bank, B_bank, plan: _Plan, scale, p, seed):
    n, d_in = x.shape
    _, d_out, r = B_bank.shape
    out = torch.empty((n, d_out), device=x.device, dtype=layer_out.dtype)
    t = torch.empty((n, r), device=x.device, dtype=torch.float32)
    if n == 0:
        return out, t
    grouped = plan.order is not None
    if grouped:
        tables = plan.forward_blocks(x.device)
        grid = (tables[0].numel(),)
        order = plan.order
    else:
        tables, order = [x, x, x], x  # unused pointers
        grid = (triton.cdiv(n, _BLOCK_M),)
    _forward[grid](
        x, layer_out, A_bank, B_bank, out, t, seed, order, *tables,
        n, d_in, d_out, r, x.stride(0), layer_out.stride(0),
        A_bank.stride(0), A_bank.stride(1), A_bank.stride(2),
        B_bank.stride(0), B_bank.stride(1), B_bank.stride(2),
        float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
        GROUPED=grouped, HAS_DROPOUT=p > 0.0, R_PAD=_rank_pad(r), BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, PRECISION=_precision(x.dtype))
    return out, t


def _backward_impl(grad, x, t, A_bank, B_bank, plan: _Plan, scale, p, seed, need_dx, need_dA,
                   need_dB):
    n, d_in = x.shape
    G, d_out, r = B_bank.shape
    r_pad = _rank_pad(r)
    dev = x.device
    grouped = plan.order is not None
    order = plan.order if grouped else x  # unused pointer when not grouped
    dx = torch.empty((n, d_in) if need_dx else (0,), device=dev, dtype=x.dtype)
    dA = torch.zeros_like(A_bank) if need_dA else torch.empty((0,), device=dev, dtype=A_bank.dtype)
    dB = torch.zeros_like(B_bank) if need_dB else torch.empty((0,), device=dev, dtype=B_bank.dtype)
    if n == 0:
        return dx, dA, dB
    precision = _precision(x.dtype)

    chunks_out = triton.cdiv(d_out, _BLOCK_N)
    splits, rows_per_split, tables = plan.splits(n, chunks_out, dev)
    tables = [x if v is None else v for v in tables]
    u_parts = torch.empty((chunks_out, n, r_pad), device=dev, dtype=torch.float32)
    db_parts = torch.empty((splits, d_out, r_pad) if need_dB else (0,), device=dev,
                           dtype=torch.float32)
    if splits:
        _grad_pass[(chunks_out, splits)](
            grad, t, B_bank, u_parts, db_parts, order, *tables, n, d_out, r, grad.stride(0),
            B_bank.stride(0), B_bank.stride(1), B_bank.stride(2), rows_per_split,
            GROUPED=grouped, NEED_DB=need_dB, R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            PRECISION=precision)
    u = u_parts.sum(0) if chunks_out > 1 else u_parts[0]
    if need_dB:
        _reduce_into(dB, db_parts[:, :, :r], tables[2] if grouped else None, scale)

    if need_dx or need_dA:
        chunks_in = triton.cdiv(d_in, _BLOCK_K)
        splits, rows_per_split, tables = plan.splits(n, chunks_in, dev)
        tables = [x if v is None else v for v in tables]
        da_parts = torch.empty((splits, r_pad, d_in) if need_dA else (0,), device=dev,
                               dtype=torch.float32)
        if splits:
            _input_pass[(chunks_in, splits)](
                x, u, A_bank, dx, da_parts, seed, order, *tables, n, d_in, r, x.stride(0),
                A_bank.stride(0), A_bank.stride(1), A_bank.stride(2), rows_per_split,
                float(scale), dropout_threshold(p), 1.0 / (1.0 - p),
                GROUPED=grouped, HAS_DROPOUT=p > 0.0, NEED_DX=need_dx, NEED_DA=need_dA,
                R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, PRECISION=precision)
        if need_dA:
            _reduce_into(dA, da_parts[:, :r], tables[2] if grouped else None, scale)
    return dx, dA, dB


def _reduce_into(bank_grad, parts, split_adapter, scale):
    """bank_grad[adapter] = scale * sum of the parts of that adapter's splits."""
    if split_adapter is None:
        bank_grad[0] = (parts.sum(0) * scale).to(bank_grad.dtype)
        return
    used = split_adapter >= 0
    summed = torch.zeros(bank_grad.shape, device=parts.device, dtype=torch.float32)
    summed.index_add_(0, split_adapter[used].long(), parts[used])
    bank_grad.copy_(summed * scale)


# --- the launchers the op registration calls -------------------------------------------------

def forward(x, layer_out, A, B, scale, p, seed):
    return _forward_impl(x, layer_out, A.unsqueeze(0), B.unsqueeze(0), _Plan(), scale, p, seed)


def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
    dx, dA, dB = _backward_impl(grad, x, t, A.unsqueeze(0), B.unsqueeze(0), _Plan(), scale, p,
                                seed, need_dx, need_dA, need_dB)
    return dx, dA[0] if need_dA else dA, dB[0] if need_dB else dB


def multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p, seed):
    return _forward_impl(x, layer_out, A_bank, B_bank, _grouped_plan(ids, A_bank.shape[0]), scale,
                         p, seed)


def multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB):
    return _backward_impl(grad, x, t, A_bank, B_bank, _grouped_plan(ids, A_bank.shape[0]), scale,
                          p, seed, need_dx, need_dA, need_dB)
