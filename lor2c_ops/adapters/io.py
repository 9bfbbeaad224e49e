"""save_adapters / load_adapters: safetensors weights plus a JSON config, never a pickle.

One file holds both: the tensors of the adapters and, in the safetensors header metadata under
"lor2c_config", the JSON config (LoR2CConfig, spans, share, merges and injections so far,
library version, the model family and widths it was trained on). A directory path gets
`adapter_model.safetensors` (that file) plus `adapter_config.json` (the same JSON, for reading).
Each file is written under a temporary name in the same directory and renamed over the target
(os.replace), so an interrupted save never leaves a half-written adapter.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Union

import torch
from torch import nn

from .._version import __version__
from .apply import (FusedLoR2C, LoR2CHandle, attach, build, get_handle, resolve_target)
from .config import LoR2CConfig

FORMAT = "lor2c_ops.lor2c_adapters"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a test dependency
        raise ImportError("save_adapters / load_adapters need the safetensors package "
                          "(pip install safetensors)") from exc
    return st, safe_open


def _resolve(path, for_save: bool):
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(os.sep) or (for_save and not os.path.splitext(path)[1]
                                                        and not os.path.exists(path)):
        return os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    return path, None


def _atomic_write(target: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _describe(handle: LoR2CHandle) -> dict:
    c = handle.container
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "family": c.family,
        "layers_path": c.layers_path,
        "num_blocks": c.num_blocks,
        "dims": [list(d) for d in c.dims],
        "config": c.config.to_dict(),
        "share": c.config.share,
        "adapters": [{"start": a.start, "end": a.end, "merged": bool(a.merged),
                      "scaling": float(a.scaling)} for a in handle.adapters],
        "injected": [{"key": k, "block": b, "module": n,
                      "in_features": c.injected[k].in_features,
                      "out_features": c.injected[k].out_features, "r": c.injected[k].r,
                      "alpha": c.injected[k].alpha, "scaling": float(c.injected[k].scaling)}
                     for k, (b, n) in c.injected_meta.items()],
        "history": c.history,
        "dtype": str(c._factory["dtype"]).replace("torch.", ""),
    }


def save_adapters(handle_or_model: Union[LoR2CHandle, nn.Module], path) -> str:
    """Saves the LoR2C adapters of a handle (or of a model with adapters attached) to `path`
    (a .safetensors file, or a directory). Returns the weights file's path."""
    st, _ = _safetensors()
    handle = handle_or_model
    if isinstance(handle_or_model, nn.Module):
        handle = get_handle(handle_or_model)
        if handle is None:
            raise ValueError(f"{type(handle_or_model).__name__} has no LoR2C adapters attached "
                             f"(apply_lor2c first)")
    if not isinstance(handle, LoR2CHandle):
        raise TypeError(f"handle_or_model: expected a LoR2C handle or a model, got "
                        f"{type(handle_or_model).__name__}")
    handle._check_live()
    meta = _describe(handle)
    text = json.dumps(meta, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu()
               for k, v in handle.container.state_dict().items()}
    weights, config_path = _resolve(path, for_save=True)
    _atomic_write(weights, lambda tmp: st.save_file(tensors, tmp, metadata={
        "lor2c_config": text, "format": FORMAT}))
    if config_path is not None:
        def write_json(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        _atomic_write(config_path, write_json)
    return weights


def read_adapters(path):
    """(metadata dict, {name: tensor}) from a saved adapter, with clear errors for files that
    are missing, corrupt, truncated or of another format. Reads nothing with pickle."""
    st, safe_open = _safetensors()
    weights, _ = _resolve(path, for_save=False)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no LoR2C adapter file at {weights}")
    try:
        with safe_open(weights, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ValueError(f"{weights}: not a readable safetensors adapter file (corrupt or "
                         f"truncated?): {exc}") from None
    if header.get("format") != FORMAT or "lor2c_config" not in header:
        raise ValueError(f"{weights}: not a lor2c_ops adapter file (its header has no "
                         f"lor2c_config metadata of format {FORMAT!r})")
    try:
        meta = json.loads(header["lor2c_config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{weights}: the JSON config in the header is corrupt: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{weights}: adapter format version {meta.get('format_version')!r}; this "
                         f"lor2c_ops ({__version__}) reads version {FORMAT_VERSION}")
    return meta, tensors


def load_adapters(model: nn.Module, path, strict_family: bool = True) -> LoR2CHandle:
    """Attaches the adapters saved at `path` to `model` (a fresh base model of the same family
    and shape) and returns the handle. Every check runs before the model is touched: a wrong
    family, block count or width, a missing or misshapen tensor, or a corrupt file raises a
    ValueError naming the mismatch and leaves `model` unchanged."""
    meta, tensors = read_adapters(path)
    where = os.fspath(path)
    from .apply import find_blocks, model_family  # noqa: WPS433
    family = model_family(model)
    saved_family = meta.get("family", {})
    if strict_family and saved_family.get("model_type") != family["model_type"]:
        raise ValueError(f"{where}: adapters were saved for model family "
                         f"{saved_family.get('model_type')!r} ({saved_family.get('class')}), "
                         f"the model is {family['model_type']!r} ({family['class']})")
    config = LoR2CConfig.from_dict(meta["config"])
    if config.layers_path is None:
        config.layers_path = meta.get("layers_path")
    try:
        _, blocks = find_blocks(model, config.layers_path)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(blocks) != meta["num_blocks"]:
        raise ValueError(f"{where}: adapters were saved for {meta['num_blocks']} blocks, the model "
                         f"has {len(blocks)} at {config.layers_path!r}")
    spans = [(a["start"], a["end"]) for a in meta["adapters"]]
    container, blocks = build(model, config, spans=spans)
    if [list(d) for d in container.dims] != meta["dims"]:
        raise ValueError(f"{where}: adapters were saved for hidden widths {meta['dims']}, the model "
                         f"has {[list(d) for d in container.dims]}")
    for a, info in zip(container.adapters, meta["adapters"]):
        a.merged = bool(info["merged"])
        if container.bank is None:
            a.scaling = float(info["scaling"])
    for info in meta["injected"]:
        block, name = int(info["block"]), info["module"]
        try:
            t = resolve_target(blocks[block], name, block)
        except ValueError as exc:
            raise ValueError(f"{where}: the injected LoRA does not fit this model: {exc}") from None
        if (t.in_features, t.out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(f"{where}: the injected LoRA on block {block} {name!r} expects "
                             f"{info['in_features']} -> {info['out_features']} features, the "
                             f"model's are {t.in_features} -> {t.out_features}")
        weight = blocks[block].get_submodule(t.module).weight
        lora = FusedLoR2C(t.in_features, t.out_features, r=int(info["r"]),
                          alpha=info["alpha"], dropout=config.dropout, backend=config.backend,
                          device=weight.device, dtype=container._factory["dtype"])
        lora.scaling = float(info["scaling"])
        container.add_injected(block, t, lora)
    expected = container.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match the adapter structure: missing "
                         f"{missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the model "
                             f"needs {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    container.history = list(meta.get("history", []))
    return attach(model, container, blocks)
