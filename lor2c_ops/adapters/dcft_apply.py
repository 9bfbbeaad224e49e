"""apply_dcft: named nn.Linear modules of a model become DCFTLinear (docs/math.md section 4)."""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..modules.dcft import DCFTLinear


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class DCFTHandle:
    """What apply_dcft returns: `.modules` {name: DCFTLinear}; fold_and_unload(); remove()."""

    def __init__(self, model, replaced: Dict[str, tuple], saved_flags):
        self.model = model
        self._replaced = replaced  # name -> (original nn.Linear, DCFTLinear)
        self._saved_flags = saved_flags
        self.removed = False

    @property
    def modules(self) -> Dict[str, DCFTLinear]:
        return {n: d for n, (_, d) in self._replaced.items()}

    def parameters(self):
        return [p for d in self.modules.values() for p in (d.lora_A, d.lora_B, d.lora_C)]

    def _check_live(self):
        if self.removed:
            raise RuntimeError("this DCFT handle was already removed or unloaded")

    def _restore(self, fold: bool) -> nn.Module:
        self._check_live()
        for name, (linear, dcft) in self._replaced.items():
            dcft.unfold()  # the weight Parameter is the original Linear's: put it back first
            if fold:
                with torch.no_grad():
                    linear.weight.copy_(
                        (linear.weight.float() + dcft.delta_weight()).to(linear.weight.dtype)
                    )
            _set_submodule(self.model, name, linear)
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self.removed = True
        return self.model

    def fold_and_unload(self) -> nn.Module:
        """Folds each adapter's delta (scaling * D.T) into its Linear's weight, puts the plain
        nn.Linear modules back and returns the model."""
        return self._restore(fold=True)

    merge_and_unload = fold_and_unload  # the older (PEFT's) name, kept as an alias

    def remove(self) -> nn.Module:
        """Puts the original nn.Linear modules back unchanged (the adapters are dropped)."""
        return self._restore(fold=False)


def apply_dcft(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    r: int = 1,
    kernel_size: int = 2,
    stride: Optional[int] = None,
    alpha: float = 1,
    dropout: float = 0.0,
    backend: Optional[str] = None,
    freeze_base: bool = True,
    merge_on_eval: bool = True,
) -> DCFTHandle:
    """Replaces the nn.Linear modules named by `target_modules` (names or name suffixes like
    "query"; a single string is a regular expression matched against full names) with
    DCFTLinear.from_linear (same weight Parameters), freezes the rest of the model, and returns
    the handle."""
    if isinstance(target_modules, str):
        pass
    elif not target_modules:
        raise ValueError("target_modules: expected module names, got an empty list")
    hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    if not hits:
        raise ValueError(
            f"target_modules: {target_modules!r} matches no module of {type(model).__name__}"
        )
    for n, m in hits:
        if not isinstance(m, nn.Linear):
            raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}, not an nn.Linear")
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:  # every check (sizes vs kernel / stride) runs before any module is swapped
        new = {
            n: DCFTLinear.from_linear(
                m,
                r=r,
                kernel_size=kernel_size,
                stride=stride,
                alpha=alpha,
                dropout=dropout,
                backend=backend,
                merge_on_eval=merge_on_eval,
            )
            for n, m in hits
        }
    except BaseException:
        for p, flag in saved:  # from_linear froze the weights it got to
            p.requires_grad_(flag)
        raise
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    replaced = {}
    for n, m in hits:
        _set_submodule(model, n, new[n])
        replaced[n] = (m, new[n])
    return DCFTHandle(model, replaced, saved)
