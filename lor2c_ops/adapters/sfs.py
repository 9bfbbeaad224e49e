"""SFS (shape of feature space) of B @ A, from its factors (docs/math.md section 3.1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as checks


def factored_singular_values(A: Tensor, B: Tensor) -> Tensor:
    """The r singular values of B @ A (B: (d_out, r), A: (r, d_in)), descending, without forming
    the d_out x d_in product: B = Q_b R_b, A.T = Q_a R_a (thin QR), svdvals(R_b @ R_a.T).
    O((d_in + d_out) r^2). Computed in float32, or float64 for float64 factors."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"expected A (r, d_in) and B (d_out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    dt = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    with torch.no_grad():
        _, r_b = torch.linalg.qr(B.detach().to(dt), mode="reduced")
        _, r_a = torch.linalg.qr(A.detach().to(dt).T, mode="reduced")
        return torch.linalg.svdvals(r_b @ r_a.T)


def sfs_from_sigma(sigma: Tensor, full_count: int, k: Optional[int] = None) -> float:
    """k given: sum(top-k sigma) / sum(sigma) (0 when all are zero); k None: the mean over all
    `full_count` = min(d_out, d_in) singular values, the zero ones included."""
    total = float(sigma.sum())
    if k is None:
        return total / full_count
    checks.positive_int(k, "k", allow_none=True)
    if total == 0.0:
        return 0.0
    top = torch.sort(sigma, descending=True).values[:k]
    return float(top.sum()) / total


def sfs(A: Tensor, B: Tensor, k: Optional[int] = None) -> float:
    """SFS of the adapter B @ A from its factors (never the dense product)."""
    return sfs_from_sigma(factored_singular_values(A, B), min(B.shape[0], A.shape[1]), k)


def dense_sfs(A: Tensor, B: Tensor, k: Optional[int] = None) -> float:
    """The definition on the dense product, O(d^3): for tests and benchmarks only."""
    sigma = torch.linalg.svdvals((B.detach().double() @ A.detach().double()))
    if k is None:
        return float(sigma.mean())
    total = float(sigma.sum())
    return 0.0 if total == 0.0 else float(sigma[:k].sum()) / total
