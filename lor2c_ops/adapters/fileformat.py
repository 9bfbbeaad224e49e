"""The adapter file format (version 2; docs/api.md section 4): what the header says, and the
checks a header and its tensors must pass before anything is allocated.

A file is a safetensors file whose tensors are the container's state_dict and whose header
metadata holds, under "lor2c_config", a JSON object: describe() writes it; check_header()
checks it field by field (each failure one ValueError naming the file and the field),
expected_shapes() derives from it every tensor's name and shape, and check_layout() holds the
file's own tensors to those. io.py reads and writes the files.
"""

from __future__ import annotations

import ctypes
import hashlib
import math

import torch

from .. import _checks as checks
from .._version import __version__
from .config import LoR2CConfig, normalise_spans
from .container import injected_key, shared_widths

FORMAT = "lor2c_ops.lor2c_adapters"
FORMAT_VERSION = 2  # 2 added tensors_sha256; version 1 files (no checksum) load with a warning
READABLE_VERSIONS = (1, 2)
_FLOAT_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


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


def describe(handle, digest: str) -> dict:
    """The header's JSON for the adapters of `handle` (a LoR2CHandle) whose tensors hash to
    `digest`. Saved files say "merged" for an adapter's from_merge."""
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
        "adapters": [
            {
                "start": a.start,
                "end": a.end,
                "merged": bool(a.from_merge),
                "scaling": float(a.scaling),
            }
            for a in c.adapters
        ],
        "injected": [
            {
                "key": inj.key,
                "block": inj.block,
                "module": inj.target.name,
                "in_features": inj.lora.in_features,
                "out_features": inj.lora.out_features,
                "r": inj.lora.r,
                "alpha": inj.lora.alpha,
                "scaling": float(inj.lora.scaling),
            }
            for inj in c.injections()
        ],
        "history": c.history,
        "dtype": str(c.dtype).replace("torch.", ""),
        "tensors_sha256": digest,
    }


class _Header:
    """Checks of one file's header: each failure is a ValueError naming the file and field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, message: str):
        raise ValueError(f"{self.where}: malformed adapter file: header field {field!r}: {message}")

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


def check_header(meta, where: str) -> dict:
    """The header's JSON, every field checked for type and range; returns it with
    meta["_config"] (the LoR2CConfig) and meta["_version"] added."""
    h = _Header(where)
    if not isinstance(meta, dict):
        raise ValueError(
            f"{where}: malformed adapter file: the JSON config is a "
            f"{type(meta).__name__}, expected an object"
        )
    if h.get(meta, "format", "format") != FORMAT:
        h.fail("format", f"expected {FORMAT!r}, got {meta['format']!r}")
    version = h.get(meta, "format_version", "format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"{where}: adapter format version {version!r}; this lor2c_ops "
            f"({__version__}) reads versions {list(READABLE_VERSIONS)}"
        )
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
    try:
        checks.floating_dtype(dtype, "dtype")
    except ValueError:
        h.fail("dtype", f"expected a floating dtype name, got {dtype!r}")
    if version >= 2:
        digest = h.str(h.get(meta, "tensors_sha256", "tensors_sha256"), "tensors_sha256")
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            h.fail("tensors_sha256", f"expected 64 lowercase hex digits, got {digest!r}")
    return {**meta, "_config": config, "_version": version}


# --- the header against the file's own tensors ---------------------------------------------------


def expected_shapes(meta: dict) -> dict:
    """{tensor name: (shape, what in the header sets it)} from the header alone."""
    config, dims = meta["_config"], meta["dims"]
    r = config.r
    out = {}
    spans = [(a["start"], a["end"]) for a in meta["adapters"]]
    if config.share:
        try:
            d_in, d_out = shared_widths(spans, dims)
        except ValueError as exc:
            raise ValueError(f"{exc} (header fields 'dims', 'adapters')") from None
        out["bank.A_bank"] = ((1, r, d_in), "config.r, dims")
        out["bank.B_bank"] = ((len(spans), d_out, r), "adapters, dims, config.r")
    else:
        for n, (s, e) in enumerate(spans):
            out[f"lor2c.{n}.lora_A"] = ((r, dims[s][0]), f"config.r, dims[{s}]")
            out[f"lor2c.{n}.lora_B"] = ((dims[e][1], r), f"dims[{e}], config.r")
    for n, inj in enumerate(meta["injected"]):
        key = injected_key(inj["block"], inj["module"])
        out[f"injected.{key}.lora_A"] = (
            (inj["r"], inj["in_features"]),
            f"injected[{n}].r, injected[{n}].in_features",
        )
        out[f"injected.{key}.lora_B"] = (
            (inj["out_features"], inj["r"]),
            f"injected[{n}].out_features, injected[{n}].r",
        )
    return out


def check_layout(meta: dict, layout: dict, where: str) -> None:
    """The header's sizes against the file's tensors (names, shapes, floating dtypes): after
    this, building the adapters allocates what the file holds, never more."""
    try:
        expected = expected_shapes(meta)
    except ValueError as exc:
        raise ValueError(f"{where}: malformed adapter file: {exc}") from None
    missing = sorted(set(expected) - set(layout))
    unexpected = sorted(set(layout) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensors do not match the adapter structure of the header: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, (shape, fields) in expected.items():
        got, dtype = layout[name]
        if tuple(got) != tuple(shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(got)}, the header "
                f"({fields}) needs {tuple(shape)}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{where}: tensor {name!r} has dtype {dtype}, expected one of "
                f"{sorted(_FLOAT_DTYPES)}"
            )
