"""save_adapters / load_adapters: safetensors weights plus a JSON config, never a pickle.

One file holds both: the tensors of the adapters and, in the safetensors header metadata under
"lor2c_config", the JSON config (LoR2CConfig, spans, share, merges and injections so far,
library version, the model family and widths it was trained on, and a sha256 of the tensor
data). A directory path gets `adapter_model.safetensors` (that file) plus `adapter_config.json`
(the same JSON, for reading). Each file is written under a temporary name in the same directory
and renamed over the target (os.replace), so an interrupted save never leaves a half-written
adapter; the files get the permissions the umask gives any new file (or keep the old file's).

Loading treats the file as untrusted: every header field is checked (type, range, agreement
with the model and with the shapes of the file's own tensors) before anything is allocated or
the model is touched, the tensor data must match its checksum, and a malformed file raises one
ValueError naming the file and the field. The format itself, and the checks of a header and of
the tensors against it, are in fileformat.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Union

import torch
from torch import nn

from .apply import attach, build, get_handle
from .blocks import find_blocks, hidden_dims, model_family
from .fileformat import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    check_header,
    check_layout,
    describe,
    tensors_sha256,
)
from .handle import LoR2CHandle
from .targets import resolve_target

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_adapters",
    "read_adapters",
    "save_adapters",
    "tensors_sha256",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a test dependency
        raise ImportError(
            "save_adapters / load_adapters need the safetensors package (pip install safetensors)"
        ) from exc
    return st, safe_open


def _resolve(path, for_save: bool):
    path = os.fspath(path)
    if (
        os.path.isdir(path)
        or path.endswith(os.sep)
        or (for_save and not os.path.splitext(path)[1] and not os.path.exists(path))
    ):
        return os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    return path, None


# --- writing ------------------------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(target: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    try:  # overwriting keeps the file's permissions, a new file gets what the umask allows
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=directory
    )  # mode 0600 until it is complete
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapters(handle_or_model: Union[LoR2CHandle, nn.Module], path) -> str:
    """Saves the LoR2C adapters of a handle (or of a model with adapters attached) to `path`
    (a .safetensors file, or a directory). Returns the weights file's path."""
    st, _ = _safetensors()
    handle = handle_or_model
    if isinstance(handle_or_model, nn.Module):
        handle = get_handle(handle_or_model)
        if handle is None:
            raise ValueError(
                f"{type(handle_or_model).__name__} has no LoR2C adapters attached "
                f"(apply_lor2c first)"
            )
    if not isinstance(handle, LoR2CHandle):
        raise TypeError(
            f"handle_or_model: expected a LoR2C handle or a model, got "
            f"{type(handle_or_model).__name__}"
        )
    handle.check_live()
    tensors = {k: v.detach().contiguous().cpu() for k, v in handle.container.state_dict().items()}
    meta = describe(handle, tensors_sha256(tensors))
    text = json.dumps(meta, sort_keys=True)
    weights, config_path = _resolve(path, for_save=True)
    _atomic_write(
        weights,
        lambda tmp: st.save_file(tensors, tmp, metadata={"lor2c_config": text, "format": FORMAT}),
    )
    if config_path is not None:

        def write_json(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)

        _atomic_write(config_path, write_json)
    return weights


# --- reading ------------------------------------------------------------------------------------


def _not_json_config(weights: str) -> None:
    if os.path.basename(weights).endswith(".json"):
        raise ValueError(
            f"{weights}: this is the JSON copy of the config, written for reading; "
            f"load_adapters reads the weights: pass the directory "
            f"({os.path.dirname(weights) or '.'}) or its {WEIGHTS_NAME}"
        )
    try:
        with open(weights, "rb") as f:
            first = f.read(1)
    except OSError:
        return
    if first == b"{":
        raise ValueError(
            f"{weights}: a JSON file, not a safetensors adapter file; "
            f"load_adapters reads {WEIGHTS_NAME} (or its directory)"
        )


def _open(path):
    """(weights path, checked header, {name: (shape, dtype name)}): nothing but the header read."""
    _, safe_open = _safetensors()
    weights, _ = _resolve(path, for_save=False)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no LoR2C adapter file at {weights}")
    if weights.endswith(".json"):
        _not_json_config(weights)
    try:
        with safe_open(weights, framework="pt") as f:
            header = f.metadata() or {}
            layout = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
            }
    except Exception as exc:  # SafetensorError, OSError, ...
        _not_json_config(weights)
        raise ValueError(
            f"{weights}: not a readable safetensors adapter file (corrupt or truncated?): {exc}"
        ) from None
    if header.get("format") != FORMAT or "lor2c_config" not in header:
        raise ValueError(
            f"{weights}: not a lor2c_ops adapter file (its header has no "
            f"lor2c_config metadata of format {FORMAT!r})"
        )
    try:
        meta = json.loads(header["lor2c_config"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, ints of > 4300 digits, ...
        raise ValueError(f"{weights}: the JSON config in the header is corrupt: {exc}") from None
    return weights, check_header(meta, weights), layout


def _load_tensors(weights: str, meta: dict) -> dict:
    """The tensors, after their checksum matched the header's."""
    _, safe_open = _safetensors()
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(
            f"{weights}: not a readable safetensors adapter file (corrupt or truncated?): {exc}"
        ) from None
    if meta["_version"] < 2:
        warnings.warn(
            f"{weights}: a format-1 adapter file has no checksum: its tensor data "
            f"cannot be verified (save it again to add one)",
            stacklevel=3,
        )
    elif tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise ValueError(
            f"{weights}: the tensor data does not match the checksum in its header "
            f"(tensors_sha256): the file is corrupt"
        )
    return tensors


def read_adapters(path):
    """(metadata dict, {name: tensor}) from a saved adapter, with clear errors for files that
    are missing, corrupt, truncated, malformed or of another format. Reads nothing with
    pickle."""
    weights, meta, layout = _open(path)
    check_layout(meta, layout, weights)
    tensors = _load_tensors(weights, meta)
    return {k: v for k, v in meta.items() if not k.startswith("_")}, tensors


def load_adapters(model: nn.Module, path, strict_family: bool = True) -> LoR2CHandle:
    """Attaches the adapters saved at `path` to `model` (a fresh base model of the same family
    and shape) and returns the handle. Every check runs before anything is allocated or the
    model is touched: a malformed header, a wrong family, block count or width, a missing or
    misshapen tensor, or data that fails its checksum raises a ValueError naming the file and
    the mismatch, and leaves `model` unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    weights, meta, layout = _open(path)
    where = weights
    family = model_family(model)
    saved_family = meta["family"]
    if strict_family and saved_family.get("model_type") != family["model_type"]:
        raise ValueError(
            f"{where}: adapters were saved for model family "
            f"{saved_family.get('model_type')!r} ({saved_family.get('class')}), "
            f"the model is {family['model_type']!r} ({family['class']})"
        )
    config = meta["_config"]
    if config.layers_path is None:
        config.layers_path = meta["layers_path"]
    try:
        _, blocks = find_blocks(model, config.layers_path)
        dims = [list(d) for d in hidden_dims(model, blocks, config)]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(blocks) != meta["num_blocks"]:
        raise ValueError(
            f"{where}: adapters were saved for {meta['num_blocks']} blocks, the model "
            f"has {len(blocks)} at {config.layers_path!r}"
        )
    if dims != meta["dims"]:
        raise ValueError(
            f"{where}: adapters were saved for hidden widths {meta['dims']}, the model has {dims}"
        )
    targets = []
    for n, info in enumerate(meta["injected"]):
        block, name = info["block"], info["module"]
        try:
            t = resolve_target(blocks[block], name, block)
        except ValueError as exc:
            raise ValueError(
                f"{where}: the injected LoRA of header field 'injected[{n}]' "
                f"does not fit this model: {exc}"
            ) from None
        if (t.in_features, t.out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(
                f"{where}: the injected LoRA on block {block} {name!r} (header field "
                f"'injected[{n}]') expects {info['in_features']} -> "
                f"{info['out_features']} features, the model's are "
                f"{t.in_features} -> {t.out_features}"
            )
        targets.append(t)
    check_layout(meta, layout, where)
    tensors = _load_tensors(weights, meta)

    spans = [(a["start"], a["end"]) for a in meta["adapters"]]
    try:
        container, blocks = build(model, config, spans=spans)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for a, info in zip(container.adapters, meta["adapters"]):
        a.from_merge = info["merged"]
        if not container.shared:  # a bank's adapters share its scaling
            a.scaling = float(info["scaling"])
    for info, t in zip(meta["injected"], targets):
        device = blocks[info["block"]].get_submodule(t.module).weight.device
        lora = container.add_injected(info["block"], t, info["r"], info["alpha"], device)
        lora.scaling = float(info["scaling"])
    expected = container.state_dict()
    if set(expected) != set(tensors):  # check_layout made sure; kept as a guard
        raise ValueError(
            f"{where}: tensors do not match the adapter structure: missing "
            f"{sorted(set(expected) - set(tensors))}, unexpected "
            f"{sorted(set(tensors) - set(expected))}"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the "
                f"model needs {tuple(v.shape)}"
            )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    container.history = list(meta["history"])
    return attach(model, container, blocks)
