"""The LoR2C residual op in plain PyTorch (docs/math.md section 1).

`eager` is the oracle: the expression itself, differentiated by autograd. `forward` and
`backward` are the reference backend of the fused op: the closed-form gradients of
docs/math.md section 1.1, with the same saved tensors and the same regenerated mask as the
fused kernels.
"""

from __future__ import annotations

import torch

from .philox import dropout_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def eager(x, layer_out, A, B, scale, mask=None):
    """layer_out + scale * (x * mask) @ A.T @ B.T, by autograd; mask is the dropout multiplier."""
    xd = x if mask is None else x * mask
    return layer_out + scale * (xd @ A.T @ B.T)


def forward(x, layer_out, A, B, scale, p, seed):
    ct = _compute_dtype(x.dtype)
    xd = x.to(ct)
    if p > 0.0:
        xd = xd * dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device, dtype=ct)
    t = xd @ A.to(ct).T
    out = layer_out.to(ct) + scale * (t @ B.to(ct).T)
    return out.to(layer_out.dtype), t.to(torch.promote_types(ct, torch.float32))


def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
    ct = _compute_dtype(x.dtype)
    g = grad.to(ct)
    u = g @ B.to(ct)
    mask = None
    if p > 0.0 and (need_dx or need_dA):
        mask = dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device, dtype=ct)
    empty = x.new_empty((0,))
    dx, dA, dB = empty, A.new_empty((0,)), B.new_empty((0,))
    if need_dx:
        dx = scale * (u @ A.to(ct))
        dx = (dx if mask is None else dx * mask).to(x.dtype)
    if need_dA:
        xd = x.to(ct) if mask is None else x.to(ct) * mask
        dA = (scale * (u.T @ xd)).to(A.dtype)
    if need_dB:
        dB = (scale * (g.T @ t.to(ct))).to(B.dtype)
    return dx, dA, dB


def _adapter_rows(ids):
    """(adapter, row indices) for every adapter present in ids (-1 excluded)."""
    present = torch.unique(ids)
    return [(int(g), (ids == g).nonzero().squeeze(1)) for g in present.tolist() if g >= 0]


def multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p, seed):
    """Per-row adapters: row i uses A_bank[ids[i]], B_bank[ids[i]]; id -1 rows keep layer_out."""
    ct = _compute_dtype(x.dtype)
    n, d_in = x.shape
    xd = x.to(ct)
    if p > 0.0:
        xd = xd * dropout_mask(seed, n, d_in, p, device=x.device, dtype=ct)
    t = torch.zeros((n, A_bank.shape[1]), device=x.device, dtype=ct)
    out = layer_out.to(ct).clone()
    for g, rows in _adapter_rows(ids):
        t[rows] = xd[rows] @ A_bank[g].to(ct).T
        out[rows] += scale * (t[rows] @ B_bank[g].to(ct).T)
    return out.to(layer_out.dtype), t.to(torch.promote_types(ct, torch.float32))


def multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB):
    ct = _compute_dtype(x.dtype)
    n, d_in = x.shape
    mask = None
    if p > 0.0 and (need_dx or need_dA):
        mask = dropout_mask(seed, n, d_in, p, device=x.device, dtype=ct)
    dx = torch.zeros((n, d_in), device=x.device, dtype=ct)
    dA = torch.zeros(A_bank.shape, device=x.device, dtype=ct)
    dB = torch.zeros(B_bank.shape, device=x.device, dtype=ct)
    for g, rows in _adapter_rows(ids):
        gr = grad[rows].to(ct)
        u = gr @ B_bank[g].to(ct)
        if need_dx:
            dx[rows] = scale * (u @ A_bank[g].to(ct)) * (1.0 if mask is None else mask[rows])
        if need_dA:
            xd = x[rows].to(ct) * (1.0 if mask is None else mask[rows])
            dA[g] = scale * (u.T @ xd)
        if need_dB:
            dB[g] = scale * (gr.T @ t[rows].to(ct))
    empty = x.new_empty((0,))
    return (
        dx.to(x.dtype) if need_dx else empty,
        dA.to(A_bank.dtype) if need_dA else A_bank.new_empty((0,)),
        dB.to(B_bank.dtype) if need_dB else B_bank.new_empty((0,)),
    )
