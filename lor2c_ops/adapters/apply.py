"""apply_lor2c: LoR2C adapters attached to the stack of blocks of an existing model.

An adapter over blocks start..end changes the output of block `end` to
    Block_end(h_end) + s * dropout(h_start) @ A.T @ B.T
through the fused op (FusedLoR2C, or one ShareLoR2C bank with share=True).

The model's modules are not replaced: forward hooks run the adapters (hooks.py), so the base
model's state_dict keys are unchanged. The adapters live in one submodule registered on the
model (`model.lor2c_adapters`, a LoR2CAdapters: container.py), so `model.parameters()`, `.to()`,
`.train()` and `state_dict()` see them; `handle.remove()` (handle.py) takes it away, removes the
hooks and restores requires_grad.

The pieces, one role per file: blocks.py reads the model (its blocks, widths, family), spans.py
defines the adapters, targets.py finds what inject() adapts, hooks.py runs them, container.py
owns them, handle.py edits them; this file puts them on a model.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .blocks import adapter_factory, find_blocks, hidden_dims, model_family
from .config import LoR2CConfig, normalise_spans
from .container import LoR2CAdapters
from .handle import ATTRIBUTE, LoR2CHandle
from .optim import check_optimizer


def _is_trainable(name: str, patterns: Sequence[str]) -> bool:
    return any(
        name == t or name.startswith(t + ".") or ("." + t + ".") in ("." + name) for t in patterns
    )


def build(model: nn.Module, config: LoR2CConfig, spans=None):
    """(container, blocks) for `model` without touching it: the adapters over `spans` (default:
    config.spans, else one per block), freshly initialised, in the model's training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoR2CConfig):
        raise TypeError(f"config: expected a LoR2CConfig, got {type(config).__name__}")
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ValueError("model already has LoR2C adapters; call handle.remove() first")
    path, blocks = find_blocks(model, config.layers_path)
    dims = hidden_dims(model, blocks, config)
    if spans is None:
        spans = config.spans if config.spans is not None else [(i, i) for i in range(len(blocks))]
    spans = normalise_spans(spans)
    container = LoR2CAdapters(
        config, spans, dims, adapter_factory(model, blocks, config), path, model_family(model)
    )
    container.train(model.training)
    return container, blocks


def attach(model: nn.Module, container: LoR2CAdapters, blocks) -> LoR2CHandle:
    """Registers `container` on `model`, freezes the base model (config.freeze_base, except
    config.trainable), installs the hooks and returns the handle."""
    cfg = container.config
    saved = [(p, p.requires_grad) for p in model.parameters()]
    if cfg.freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad_(_is_trainable(name, cfg.trainable))
    model.add_module(ATTRIBUTE, container)
    container.install(blocks)
    handle = LoR2CHandle(model, container, blocks, saved)
    container.handle = handle
    return handle


def apply_lor2c(
    model: nn.Module, config: Optional[LoR2CConfig] = None, optimizer=None
) -> LoR2CHandle:
    """Attaches LoR2C adapters to `model` (in place) and returns the handle.

    Finds the stack of blocks (config.layers_path, or by name for Hugging Face models), freezes
    the base model (except config.trainable), and adds one adapter per block or per span of
    config.spans, each computing h_{end+1} = Block_end(h_end) + s * dropout(h_start) @ A.T @ B.T
    with the fused op.

    `optimizer` (optional): the adapters' parameters join it, and merge() / inject() keep it in
    step (handle.attach_optimizer does the same later).
    """
    config = LoR2CConfig() if config is None else config
    if optimizer is not None:
        check_optimizer(optimizer)
    container, blocks = build(model, config)
    handle = attach(model, container, blocks)
    if optimizer is not None:
        handle.attach_optimizer(optimizer)
    return handle


def get_handle(model: nn.Module) -> Optional[LoR2CHandle]:
    """The live LoR2C handle of `model`, or None."""
    container = getattr(model, ATTRIBUTE, None)
    return container.handle if isinstance(container, LoR2CAdapters) else None


__all__ = ["apply_lor2c", "attach", "build", "get_handle"]
