"""What apply_lor2c reads from a model before it attaches anything: the stack of blocks, their
widths, the model family, and the device and dtype the adapters get."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import _checks as checks
from .config import LoR2CConfig

# Stacks of blocks, by the end of their dotted path (Hugging Face naming).
_STACK_SUFFIXES = (
    "encoder.layer",
    "encoder.layers",
    "model.layers",
    "decoder.layers",
    "transformer.h",
    "transformer.layers",
    "layers",
    "layer",
    "h",
    "blocks",
)


def find_blocks(model: nn.Module, layers_path: Optional[str] = None):
    """(path, nn.ModuleList of blocks) for `model`: at `layers_path`, or found by name."""
    if layers_path is not None:
        try:
            stack = model.get_submodule(layers_path)
        except AttributeError as exc:
            raise ValueError(
                f"layers_path: {layers_path!r} is not a submodule of {type(model).__name__} ({exc})"
            ) from None
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
            raise ValueError(
                f"layers_path: expected a non-empty nn.ModuleList or nn.Sequential "
                f"at {layers_path!r}, got {type(stack).__name__}"
            )
        return layers_path, stack
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(name == s or name.endswith("." + s) for s in _STACK_SUFFIXES):
                found.append((name, module))
    if not found:
        raise ValueError(
            f"cannot find the stack of blocks of {type(model).__name__} (looked for "
            f"an nn.ModuleList named like {', '.join(_STACK_SUFFIXES)}); pass "
            f"LoR2CConfig(layers_path=...)"
        )
    if len(found) > 1:
        names = [n for n, _ in found]
        raise ValueError(
            f"{type(model).__name__} has several stacks of blocks {names}; choose one "
            f"with LoR2CConfig(layers_path=...)"
        )
    return found[0]


def model_family(model: nn.Module) -> dict:
    """{"class", "model_type"} of `model`: what saved adapters are checked against."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None) if cfg is not None else None,
    }


def _block_dims(block: nn.Module) -> Optional[Tuple[int, int]]:
    """(d_in, d_out) of a block, read from its first and last nn.Linear, or None."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    return linears[0].in_features, linears[-1].out_features


def hidden_dims(model: nn.Module, blocks, config: LoR2CConfig) -> List[Tuple[int, int]]:
    """[(d_in, d_out)] per block: config.hidden_size, else model.config's width, else the
    blocks' own Linear layers."""
    if config.hidden_size is not None:
        return [(config.hidden_size, config.hidden_size)] * len(blocks)
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return [(value, value)] * len(blocks)
    dims = [_block_dims(b) for b in blocks]
    if any(d is None for d in dims):
        raise ValueError(
            "cannot tell the hidden size of the blocks (no model.config.hidden_size "
            "and no nn.Linear inside a block); pass LoR2CConfig(hidden_size=...)"
        )
    return dims


def adapter_factory(model: nn.Module, blocks, config: LoR2CConfig) -> dict:
    """{"device", "dtype"} of new adapters: the first block's device, and config.dtype or the
    base model's floating dtype (float32 when it has none)."""
    param = next(iter(blocks[0].parameters()), None)
    if param is None:
        param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if config.dtype is not None:
        dtype = checks.floating_dtype(config.dtype, "dtype")
    elif param is not None and param.dtype.is_floating_point:
        dtype = param.dtype
    else:
        dtype = torch.float32
    return {"device": device, "dtype": dtype}
