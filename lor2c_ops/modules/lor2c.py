"""FusedLoR2C: the LoR2C adapter module."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _checks as checks
from ..ops.lor2c import lor2c_residual


class FusedLoR2C(nn.Module):
    """A LoR2C adapter: forward(x, layer_out) = layer_out + scaling * dropout(x) @ A.T @ B.T.

    lora_A (r, in_features) is Kaiming-uniform (a = sqrt(5)) and lora_B (out_features, r) zero,
    so a fresh adapter returns layer_out unchanged. scaling = alpha / r.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        checks.positive_ints(in_features=in_features, out_features=out_features, r=r)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.backend = alpha, backend
        self.dropout = checks.dropout_probability(dropout)
        self.scaling = alpha / r
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, layer_out: torch.Tensor) -> torch.Tensor:
        return lor2c_residual(
            x,
            layer_out,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout,
            self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"
        )
        return text + (f", backend={self.backend!r}" if self.backend else "")
