"""The LoR2C residual op in plain PyTorch (DESIGN.md 2.1).

`eager` is the oracle: the expression itself, differentiated by autograd. `forward` and
`backward` are the reference backend of the fused op: the closed-form gradients of DESIGN.md
2.1, with the same saved tensors and the same regenerated mask as the fused kernels.
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
