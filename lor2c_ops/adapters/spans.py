"""The adapters of apply_lor2c: one kind of object, SpanAdapter, over blocks start..end, whose
weights are either its own (SpanLoR2C, a FusedLoR2C) or one row of a shared bank
(SharedAdapter, a view into a ShareLoR2C)."""

from __future__ import annotations

from typing import Tuple

import torch

from ..modules.lor2c import FusedLoR2C
from ..modules.share import ShareLoR2C


class SpanAdapter:
    """What handle.adapters holds: an adapter over blocks `start`..`end` (inclusive) that changes
    the output of block `end` to Block_end(h_end) + scaling * dropout(h_start) @ A.T @ B.T.

    Every adapter has `start`, `end`, `from_merge` (it was created by a merge: MergeLoR2C),
    `lora_A` (r, d_in), `lora_B` (d_out, r), `scaling`, `r`, and `residual(x, layer_out)`, the
    fused op with its weights. `merged` is the older name of `from_merge`."""

    start: int
    end: int
    from_merge: bool

    def _set_span(self, start: int, end: int, from_merge: bool) -> None:
        self.start, self.end, self.from_merge = start, end, from_merge

    @property
    def span(self) -> Tuple[int, int]:
        return self.start, self.end

    @property
    def merged(self) -> bool:
        return self.from_merge

    @merged.setter
    def merged(self, value: bool) -> None:
        self.from_merge = value

    def residual(self, x: torch.Tensor, layer_out: torch.Tensor) -> torch.Tensor:
        """layer_out + scaling * dropout(x) @ lora_A.T @ lora_B.T, through the fused op."""
        raise NotImplementedError

    def _span_repr(self) -> str:
        text = f"start={self.start}, end={self.end}"
        return text + (", from_merge=True" if self.from_merge else "")


class SpanLoR2C(FusedLoR2C, SpanAdapter):
    """An adapter with its own weights: a FusedLoR2C over blocks start..end."""

    def __init__(self, start: int, end: int, *args, from_merge: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_span(start, end, from_merge)

    def residual(self, x, layer_out):
        return self(x, layer_out)

    def extra_repr(self) -> str:
        return self._span_repr() + ", " + super().extra_repr()


class SharedAdapter(SpanAdapter):
    """An adapter of a ShareLoR2C bank: row `row` of B_bank and its group's row of A_bank (read
    in place; the bank owns the parameters)."""

    def __init__(self, bank: ShareLoR2C, row: int, start: int, end: int, from_merge: bool = False):
        self.bank, self.row = bank, row
        self._set_span(start, end, from_merge)

    @property
    def lora_A(self) -> torch.Tensor:
        return self.bank.A_bank[self.bank.groups[self.row]]

    @property
    def lora_B(self) -> torch.Tensor:
        return self.bank.B_bank[self.row]

    @property
    def scaling(self) -> float:
        return self.bank.scaling

    @property
    def r(self) -> int:
        return self.bank.r

    def residual(self, x, layer_out):
        return self.bank(self.row, x, layer_out)

    def __repr__(self) -> str:
        return f"SharedAdapter({self._span_repr()}, row={self.row})"
