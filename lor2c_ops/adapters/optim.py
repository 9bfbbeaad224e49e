"""Keeping an optimizer in step with structural edits: removed parameters leave it (with their
state), new ones join the param group the removed ones were in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn


@dataclass(repr=False)
class StructuralEdit:
    """What a merge or injection changed. `removed` left the model, `added` joined it (trainable;
    `added_names` their names in the model). `optimizer_updated`: an optimizer has already been
    updated; otherwise call `apply_to(optimizer)` (or add `added` / drop `removed` yourself)."""

    kind: str
    detail: dict
    removed: List[nn.Parameter] = field(default_factory=list)
    added: List[nn.Parameter] = field(default_factory=list)
    added_names: List[str] = field(default_factory=list)
    optimizer_updated: bool = False

    def apply_to(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        if optimizer is not None:
            update_optimizer(optimizer, self.removed, self.added)
            self.optimizer_updated = True

    def _what(self) -> str:
        d = self.detail
        if self.kind == "merge" and {"i", "j", "lower", "upper", "span"} <= set(d):
            return (
                f"adapters {d['i']} {tuple(d['lower'])} and {d['j']} {tuple(d['upper'])} -> "
                f"one over {tuple(d['span'])}"
            )
        if self.kind == "inject" and {"i", "block", "modules"} <= set(d):
            return f"adapter {d['i']} -> LoRA on block {d['block']} {list(d['modules'])}"
        return ", ".join(f"{k}={v!r}" for k, v in d.items())

    def __repr__(self) -> str:
        def count(params):
            return f"{len(params)} tensors, {sum(p.numel() for p in params):,} values"

        state = "optimizer updated" if self.optimizer_updated else "optimizer not updated"
        return (
            f"StructuralEdit({self.kind}: {self._what()}; removed {count(self.removed)}; "
            f"added {count(self.added)}; {state})"
        )


def check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def update_optimizer(optimizer: torch.optim.Optimizer, removed, added) -> None:
    """`removed` leave `optimizer` (with their state); `added` join the param group the removed
    ones were in (the first group when none was)."""
    check_optimizer(optimizer)
    removed_ids = {id(p) for p in removed}
    target = None
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in removed_ids]
        if len(kept) != len(group["params"]) and target is None:
            target = group
        group["params"] = kept
    for p in removed:
        optimizer.state.pop(p, None)
    if added:
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [p for p in added if id(p) not in present]
        if target is None:
            target = optimizer.param_groups[0]
        target["params"].extend(new)


def optimizer_params(optimizer) -> List[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]
