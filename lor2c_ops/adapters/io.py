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
ValueError naming the file and the field.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import tempfile
import warnings
from typing import Union

import torch
from torch import nn

from .._version import __version__
from .apply import (FusedLoR2C, LoR2CHandle, _hidden_dims, _key, attach, build, find_blocks,
                    get_handle, model_family, resolve_target)
from .config import LoR2CConfig, normalise_spans

FORMAT = "lor2c_ops.lor2c_adapters"
FORMAT_VERSION = 2  # 2 added tensors_sha256; version 1 files (no checksum) load with a warning
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}


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
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                               dir=directory)  # mode 0600 until it is complete
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


def tensors_sha256(tensors: dict) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and the raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).replace('torch.', '')}\0{list(t.shape)}\0".encode())
        nbytes = t.numel() * t.element_size()
        if nbytes:
            h.update(ctypes.string_at(t.data_ptr(), nbytes))
    return h.hexdigest()


def _describe(handle: LoR2CHandle, digest: str) -> dict:
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
        "tensors_sha256": digest,
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
    tensors = {k: v.detach().contiguous().cpu()
               for k, v in handle.container.state_dict().items()}
    meta = _describe(handle, tensors_sha256(tensors))
    text = json.dumps(meta, sort_keys=True)
    weights, config_path = _resolve(path, for_save=True)
    _atomic_write(weights, lambda tmp: st.save_file(tensors, tmp, metadata={
        "lor2c_config": text, "format": FORMAT}))
    if config_path is not None:
        def write_json(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        _atomic_write(config_path, write_json)
    return weights


# --- reading: the header, field by field ----------------------------------------------------------

class _Header:
    """Checks of one file's header: each failure is a ValueError naming the file and field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, message: str):
        raise ValueError(f"{self.where}: malformed adapter file: header field {field!r}: "
                         f"{message}")

    def get(self, d: dict, key: str, field: str):
        if key not in d:
            self.fail(field, "missing")
        return d[key]

    def int(self, v, field: str, low: int = 0, high=None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"expected an int, got {v!r}")
        if v < low or (high is not None and v > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            self.fail(field, f"expected an int {bound}, got {v}")
        return v

    def number(self, v, field: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(field, f"expected a number, got {v!r}")
        try:
            value = float(v)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            self.fail(field, f"expected a finite number, got {v!r}")
        return value

    def str(self, v, field: str, none: bool = False):
        if v is None and none:
            return None
        if not isinstance(v, str):
            self.fail(field, f"expected a string{' or null' if none else ''}, got {v!r}")
        return v

    def bool(self, v, field: str) -> bool:
        if not isinstance(v, bool):
            self.fail(field, f"expected true or false, got {v!r}")
        return v

    def list(self, v, field: str) -> list:
        if not isinstance(v, list):
            self.fail(field, f"expected a list, got {type(v).__name__}")
        return v

    def dict(self, v, field: str) -> dict:
        if not isinstance(v, dict):
            self.fail(field, f"expected an object, got {type(v).__name__}")
        return v


def _check_header(meta, where: str) -> dict:
    """The header's JSON, every field checked for type and range; returns it with
    meta["_config"] (the LoR2CConfig) and meta["_version"] added."""
    h = _Header(where)
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: malformed adapter file: the JSON config is a "
                         f"{type(meta).__name__}, expected an object")
    if h.get(meta, "format", "format") != FORMAT:
        h.fail("format", f"expected {FORMAT!r}, got {meta['format']!r}")
    version = h.get(meta, "format_version", "format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: adapter format version {version!r}; this lor2c_ops "
                         f"({__version__}) reads versions {list(READABLE_VERSIONS)}")
    family = h.dict(h.get(meta, "family", "family"), "family")
    for key in ("class", "model_type"):
        h.str(family.get(key), f"family.{key}", none=True)
    h.str(h.get(meta, "layers_path", "layers_path"), "layers_path", none=True)
    num_blocks = h.int(h.get(meta, "num_blocks", "num_blocks"), "num_blocks", low=1)
    dims = h.list(h.get(meta, "dims", "dims"), "dims")
    if len(dims) != num_blocks:
        h.fail("dims", f"expected {num_blocks} [d_in, d_out] pairs (num_blocks), got {len(dims)}")
    for n, pair in enumerate(dims):
        if not isinstance(pair, list) or len(pair) != 2:
            h.fail(f"dims[{n}]", f"expected a [d_in, d_out] pair, got {pair!r}")
        for m, v in enumerate(pair):
            h.int(v, f"dims[{n}][{m}]", low=1)

    cfg = h.dict(h.get(meta, "config", "config"), "config")
    try:
        config = LoR2CConfig.from_dict(cfg)
    except (ValueError, TypeError, OverflowError) as exc:
        h.fail("config", str(exc))
    share = h.bool(h.get(meta, "share", "share"), "share")
    if share != config.share:
        h.fail("share", f"{share} disagrees with config.share = {config.share}")

    adapters = h.list(h.get(meta, "adapters", "adapters"), "adapters")
    if not adapters:
        h.fail("adapters", "expected at least one adapter, got an empty list")
    spans = []
    for n, a in enumerate(adapters):
        field = f"adapters[{n}]"
        h.dict(a, field)
        start = h.int(h.get(a, "start", field + ".start"), field + ".start", 0, num_blocks - 1)
        end = h.int(h.get(a, "end", field + ".end"), field + ".end", 0, num_blocks - 1)
        if end < start:
            h.fail(field, f"start {start} after end {end}")
        h.bool(h.get(a, "merged", field + ".merged"), field + ".merged")
        h.number(h.get(a, "scaling", field + ".scaling"), field + ".scaling")
        spans.append((start, end))
    try:
        if normalise_spans(spans) != tuple(spans):
            h.fail("adapters", f"spans {spans} are not in block order")
    except ValueError as exc:
        h.fail("adapters", str(exc))

    injected = h.list(h.get(meta, "injected", "injected"), "injected")
    seen = set()
    for n, inj in enumerate(injected):
        field = f"injected[{n}]"
        h.dict(inj, field)
        block = h.int(h.get(inj, "block", field + ".block"), field + ".block", 0, num_blocks - 1)
        module = h.str(h.get(inj, "module", field + ".module"), field + ".module")
        for key in ("in_features", "out_features", "r"):
            h.int(h.get(inj, key, f"{field}.{key}"), f"{field}.{key}", low=1)
        for key in ("alpha", "scaling"):
            h.number(h.get(inj, key, f"{field}.{key}"), f"{field}.{key}")
        if (block, module) in seen:
            h.fail(field, f"a second LoRA on block {block} {module!r}")
        seen.add((block, module))

    history = h.list(meta.get("history", []), "history")
    for n, event in enumerate(history):
        h.dict(event, f"history[{n}]")
    dtype = h.str(h.get(meta, "dtype", "dtype"), "dtype")
    if not isinstance(getattr(torch, dtype, None), torch.dtype) or \
            not getattr(torch, dtype).is_floating_point:
        h.fail("dtype", f"expected a floating dtype name, got {dtype!r}")
    if version >= 2:
        digest = h.str(h.get(meta, "tensors_sha256", "tensors_sha256"), "tensors_sha256")
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            h.fail("tensors_sha256", f"expected 64 lowercase hex digits, got {digest!r}")
    return {**meta, "_config": config, "_version": version}


def _not_json_config(weights: str) -> None:
    if os.path.basename(weights).endswith(".json"):
        raise ValueError(f"{weights}: this is the JSON copy of the config, written for reading; "
                         f"load_adapters reads the weights: pass the directory "
                         f"({os.path.dirname(weights) or '.'}) or its {WEIGHTS_NAME}")
    try:
        with open(weights, "rb") as f:
            first = f.read(1)
    except OSError:
        return
    if first == b"{":
        raise ValueError(f"{weights}: a JSON file, not a safetensors adapter file; "
                         f"load_adapters reads {WEIGHTS_NAME} (or its directory)")


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
            layout = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...
        _not_json_config(weights)
        raise ValueError(f"{weights}: not a readable safetensors adapter file (corrupt or "
                         f"truncated?): {exc}") from None
    if header.get("format") != FORMAT or "lor2c_config" not in header:
        raise ValueError(f"{weights}: not a lor2c_ops adapter file (its header has no "
                         f"lor2c_config metadata of format {FORMAT!r})")
    try:
        meta = json.loads(header["lor2c_config"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, ints of > 4300 digits, ...
        raise ValueError(f"{weights}: the JSON config in the header is corrupt: {exc}") from None
    return weights, _check_header(meta, weights), layout


def _load_tensors(weights: str, meta: dict) -> dict:
    """The tensors, after their checksum matched the header's."""
    _, safe_open = _safetensors()
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{weights}: not a readable safetensors adapter file (corrupt or "
                         f"truncated?): {exc}") from None
    if meta["_version"] < 2:
        warnings.warn(f"{weights}: a format-1 adapter file has no checksum: its tensor data "
                      f"cannot be verified (save it again to add one)", stacklevel=3)
    elif tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise ValueError(f"{weights}: the tensor data does not match the checksum in its header "
                         f"(tensors_sha256): the file is corrupt")
    return tensors


def read_adapters(path):
    """(metadata dict, {name: tensor}) from a saved adapter, with clear errors for files that
    are missing, corrupt, truncated, malformed or of another format. Reads nothing with
    pickle."""
    weights, meta, layout = _open(path)
    _check_layout(meta, layout, weights)
    tensors = _load_tensors(weights, meta)
    return {k: v for k, v in meta.items() if not k.startswith("_")}, tensors


# --- reading: against the file's own tensors and the model --------------------------------------

def _expected_shapes(meta: dict) -> dict:
    """{tensor name: (shape, what in the header sets it)} from the header alone."""
    config, dims = meta["_config"], meta["dims"]
    r = config.r
    out = {}
    spans = [(a["start"], a["end"]) for a in meta["adapters"]]
    if config.share:
        d_ins = {dims[s][0] for s, _ in spans}
        d_outs = {dims[e][1] for _, e in spans}
        if len(d_ins) != 1 or len(d_outs) != 1:
            raise ValueError(f"share=True needs one input and one output width for all spans "
                             f"(header fields 'dims', 'adapters'), got {sorted(d_ins)} and "
                             f"{sorted(d_outs)}")
        out["bank.A_bank"] = ((1, r, d_ins.pop()), "config.r, dims")
        out["bank.B_bank"] = ((len(spans), d_outs.pop(), r), "adapters, dims, config.r")
    else:
        for n, (s, e) in enumerate(spans):
            out[f"lor2c.{n}.lora_A"] = ((r, dims[s][0]), f"config.r, dims[{s}]")
            out[f"lor2c.{n}.lora_B"] = ((dims[e][1], r), f"dims[{e}], config.r")
    for n, inj in enumerate(meta["injected"]):
        key = _key(inj["block"], inj["module"])
        out[f"injected.{key}.lora_A"] = ((inj["r"], inj["in_features"]),
                                        f"injected[{n}].r, injected[{n}].in_features")
        out[f"injected.{key}.lora_B"] = ((inj["out_features"], inj["r"]),
                                        f"injected[{n}].out_features, injected[{n}].r")
    return out


def _check_layout(meta: dict, layout: dict, where: str) -> None:
    """The header's sizes against the file's tensors (names, shapes, floating dtypes): after
    this, building the adapters allocates what the file holds, never more."""
    try:
        expected = _expected_shapes(meta)
    except ValueError as exc:
        raise ValueError(f"{where}: malformed adapter file: {exc}") from None
    missing = sorted(set(expected) - set(layout))
    unexpected = sorted(set(layout) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match the adapter structure of the header: "
                         f"missing {missing}, unexpected {unexpected}")
    for name, (shape, fields) in expected.items():
        got, dtype = layout[name]
        if tuple(got) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(got)}, the header "
                             f"({fields}) needs {tuple(shape)}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has dtype {dtype}, expected one of "
                             f"{sorted(_FLOAT_DTYPES)}")


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
        raise ValueError(f"{where}: adapters were saved for model family "
                         f"{saved_family.get('model_type')!r} ({saved_family.get('class')}), "
                         f"the model is {family['model_type']!r} ({family['class']})")
    config = meta["_config"]
    if config.layers_path is None:
        config.layers_path = meta["layers_path"]
    try:
        _, blocks = find_blocks(model, config.layers_path)
        dims = [list(d) for d in _hidden_dims(model, blocks, config)]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(blocks) != meta["num_blocks"]:
        raise ValueError(f"{where}: adapters were saved for {meta['num_blocks']} blocks, the model "
                         f"has {len(blocks)} at {config.layers_path!r}")
    if dims != meta["dims"]:
        raise ValueError(f"{where}: adapters were saved for hidden widths {meta['dims']}, the model "
                         f"has {dims}")
    targets = []
    for n, info in enumerate(meta["injected"]):
        block, name = info["block"], info["module"]
        try:
            t = resolve_target(blocks[block], name, block)
        except ValueError as exc:
            raise ValueError(f"{where}: the injected LoRA of header field 'injected[{n}]' "
                             f"does not fit this model: {exc}") from None
        if (t.in_features, t.out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(f"{where}: the injected LoRA on block {block} {name!r} (header field "
                             f"'injected[{n}]') expects {info['in_features']} -> "
                             f"{info['out_features']} features, the model's are "
                             f"{t.in_features} -> {t.out_features}")
        targets.append(t)
    _check_layout(meta, layout, where)
    tensors = _load_tensors(weights, meta)

    spans = [(a["start"], a["end"]) for a in meta["adapters"]]
    try:
        container, blocks = build(model, config, spans=spans)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for a, info in zip(container.adapters, meta["adapters"]):
        a.merged = info["merged"]
        if container.bank is None:
            a.scaling = float(info["scaling"])
    for info, t in zip(meta["injected"], targets):
        weight = blocks[info["block"]].get_submodule(t.module).weight
        lora = FusedLoR2C(t.in_features, t.out_features, r=info["r"], alpha=info["alpha"],
                          dropout=config.dropout, backend=config.backend,
                          device=weight.device, dtype=container._factory["dtype"])
        lora.scaling = float(info["scaling"])
        container.add_injected(info["block"], t, lora)
    expected = container.state_dict()
    if set(expected) != set(tensors):  # _check_layout made sure; kept as a guard
        raise ValueError(f"{where}: tensors do not match the adapter structure: missing "
                         f"{sorted(set(expected) - set(tensors))}, unexpected "
                         f"{sorted(set(tensors) - set(expected))}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the model "
                             f"needs {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    container.history = list(meta["history"])
    return attach(model, container, blocks)
