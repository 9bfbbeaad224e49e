"""DCFT (deconvolution in subspace, docs/math.md section 4) in plain PyTorch.

`dcft_delta` materialises the delta weight D (d_in x d_out) exactly as the published code does,
with conv_transpose2d: it is for folding into the base weight and for tests, never for training.
`eager` is the published expression, y = F.linear(x, W, b) + s * dropout(x) @ D, differentiated
by autograd: the oracle.

`forward` and `backward` are the reference backend of the fused op: the structured computation,
which never forms D. For one row x of length d_in = (m_in - 1) * st + k:

    X[p, a] = x[p * st + a]                    (m_in, k)   windows of x: x.unfold(-1, k, st)
    T = A @ X                                  (r, k)      saved for backward (fp32)
    U = T @ C                                  (r, k)
    Z = B @ U                                  (m_out, k)
    y[q * st + b] += s * Z[q, b]                           overlap-add (a reshape when st == k)

Backward, with g the output gradient, G[q, b] = g[q * st + b] (windows of g) and the dropout
multiplier m regenerated from the seed:

    V  = B.T @ G                               (r, k)
    dB = s * sum_rows G @ U.T  (m_out, r);     dC = s * sum_rows T.T @ V
    dT = s * V @ C.T;  dA = sum_rows dT @ X.T; dx = overlap-add(A.T @ dT) * m + g @ W
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .philox import dropout_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def dcft_delta(A, B, C, stride):
    """D = conv_transpose2d(A.T @ B.T, C, stride): (d_in, d_out), differentiable."""
    M = A.T @ B.T
    return F.conv_transpose2d(M[None, None], C[None, None], stride=stride)[0, 0]


def eager(x, weight, bias, A, B, C, scale, stride, mask=None):
    """The published approach: materialise D, then F.linear(x, W, b) + s * (x * mask) @ D."""
    xd = x if mask is None else x * mask
    return F.linear(x, weight, bias) + scale * (xd @ dcft_delta(A, B, C, stride))


def windows(rows, k, stride):
    """(n, d) rows as (n, m, k) windows: [i, p, a] = rows[i, p * stride + a] (a view)."""
    return rows.unfold(1, k, stride)


def overlap_add(Z, stride, d):
    """(n, m, k) -> (n, d): out[i, q * stride + b] = sum of Z[i, q, b] over (q, b) landing there."""
    n, m, k = Z.shape
    if stride == k:
        return Z.reshape(n, d)
    out = Z.new_zeros((n, d))
    for b in range(k):  # k shifted, strided adds: no index tensors, no d x d anything
        out[:, b : b + (m - 1) * stride + 1 : stride] += Z[:, :, b]
    return out


def _dropped(x, p, seed, ct):
    xd = x.to(ct)
    mask = None
    if p > 0.0:
        mask = dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device, dtype=ct)
        xd = xd * mask
    return xd, mask


def forward(x, weight, bias, A, B, C, scale, stride, p, seed):
    """(out, T) for 2-D x (n, d_in): out = x @ W.T + b + s * dropout(x) @ D; T (n, r * k)."""
    ct = _compute_dtype(x.dtype)
    k = C.shape[0]
    n, d_out = x.shape[0], weight.shape[0]
    xd, _ = _dropped(x, p, seed, ct)
    T = torch.einsum("jp,npa->nja", A.to(ct), windows(xd, k, stride))
    U = T @ C.to(ct)
    Z = torch.einsum("qj,njb->nqb", B.to(ct), U)
    base = F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    out = base + scale * overlap_add(Z, stride, d_out)
    return out.to(x.dtype), T.reshape(n, A.shape[0] * k)


def backward(
    grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB, need_dC
):
    """(dx, dA, dB, dC); dx includes the base linear's g @ W. Not asked for: empty tensors."""
    ct = _compute_dtype(x.dtype)
    r, k = A.shape[0], C.shape[0]
    n, d_in = x.shape
    g = grad.to(ct)
    Cc = C.to(ct)
    T = t.to(ct).reshape(n, r, k)
    V = torch.einsum("qj,nqb->njb", B.to(ct), windows(g, k, stride))
    dx, dA = x.new_empty((0,)), A.new_empty((0,))
    dB, dC = B.new_empty((0,)), C.new_empty((0,))
    if need_dB:
        dB = (
            (scale * torch.einsum("nqb,njb->qj", windows(g, k, stride), T @ Cc))
            .contiguous()
            .to(B.dtype)
        )
    if need_dC:
        dC = (scale * torch.einsum("nja,njb->ab", T, V)).contiguous().to(C.dtype)
    if need_dx or need_dA:
        dT = scale * (V @ Cc.T)
        xd, mask = _dropped(x, p, seed, ct) if need_dA or p > 0.0 else (None, None)
        if need_dA:
            dA = torch.einsum("nja,npa->jp", dT, windows(xd, k, stride)).contiguous().to(A.dtype)
        if need_dx:
            dxd = overlap_add(torch.einsum("jp,nja->npa", A.to(ct), dT), stride, d_in)
            if mask is not None:
                dxd = dxd * mask
            dx = (dxd + g @ weight.to(ct)).to(x.dtype).contiguous()
    return dx, dA, dB, dC
