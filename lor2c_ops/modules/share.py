"""ShareLoR2C: LoR2C adapters sharing down-projections within groups (docs/math.md section 2)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import _checks as checks
from ..ops.lor2c import lor2c_residual


def _group_map(groups: Optional[Sequence[int]], num_adapters: int) -> list[int]:
    if groups is None:
        return [0] * num_adapters
    groups = [int(g) for g in groups]
    if len(groups) != num_adapters:
        raise ValueError(
            f"groups: expected one group id per adapter ({num_adapters}), got {len(groups)}"
        )
    used = sorted(set(groups))
    if used != list(range(len(used))):
        raise ValueError(f"groups: expected group ids 0..G-1, each used at least once, got {used}")
    return groups


class ShareLoR2C(nn.Module):
    """`num_adapters` LoR2C adapters; those of one share group use one down-projection.

    A_bank (G, r, in_features) holds one A per group (Kaiming-uniform, a = sqrt(5)); B_bank
    (num_adapters, out_features, r) one B per adapter (zeros, so a fresh module changes
    nothing). groups maps adapter index -> group (default: one group, the paper's setting).
    Trainable parameters: G * r * in_features + num_adapters * out_features * r.

    forward(index, x, layer_out): index an int runs adapter `index` (its bank rows are read in
    place); index an integer tensor of adapter ids (one per row, or per sequence; -1: none)
    runs a multi-adapter batch in one launch, which needs one A per adapter (groups = 0..L-1).
    """

    def __init__(
        self,
        num_adapters: int,
        in_features: int,
        out_features: Optional[int] = None,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        groups: Optional[Sequence[int]] = None,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        checks.positive_ints(
            num_adapters=num_adapters, in_features=in_features, out_features=out_features, r=r
        )
        self.num_adapters, self.in_features, self.out_features, self.r = (
            num_adapters,
            in_features,
            out_features,
            r,
        )
        self.alpha, self.backend = alpha, backend
        self.dropout = checks.dropout_probability(dropout)
        self.scaling = alpha / r
        self.groups = _group_map(groups, num_adapters)
        num_groups = max(self.groups) + 1
        factory = {"device": device, "dtype": dtype}
        self.A_bank = nn.Parameter(torch.empty(num_groups, r, in_features, **factory))
        self.B_bank = nn.Parameter(torch.empty(num_adapters, out_features, r, **factory))
        self.reset_parameters()

    @property
    def num_groups(self) -> int:
        return self.A_bank.shape[0]

    def reset_parameters(self) -> None:
        for g in range(self.num_groups):
            nn.init.kaiming_uniform_(self.A_bank.data[g], a=math.sqrt(5))
        nn.init.zeros_(self.B_bank)

    def forward(
        self, index: Union[int, torch.Tensor], x: torch.Tensor, layer_out: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            if self.groups != list(range(self.num_adapters)):
                raise ValueError(
                    "index: a tensor of adapter ids needs one A per adapter "
                    "(groups = 0..num_adapters-1); call adapters one by one instead"
                )
            return lor2c_residual(
                x,
                layer_out,
                self.A_bank,
                self.B_bank,
                self.scaling,
                self.dropout,
                self.training,
                backend=self.backend,
                adapter_ids=index,
            )
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"index: expected an int or an integer tensor, got {type(index).__name__}"
            )
        if not 0 <= index < self.num_adapters:
            raise ValueError(f"index: expected 0 <= index < {self.num_adapters}, got {index}")
        return lor2c_residual(
            x,
            layer_out,
            self.A_bank[self.groups[index]],
            self.B_bank[index],
            self.scaling,
            self.dropout,
            self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_adapters={self.num_adapters}, groups={self.num_groups}, "
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"
        )
