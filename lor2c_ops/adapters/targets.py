"""Where inject() puts its LoRAs: the query and value projections of a block (nn.Linear or a
transformers Conv1D, found by name), slices of a fused [q | k | v] projection, or the modules
named by LoR2CConfig.inject_targets."""

from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import nn

_QUERY_NAMES = ("query", "q_proj", "query_proj", "q_lin", "q")
_VALUE_NAMES = ("value", "v_proj", "value_proj", "v_lin", "v")
# Fused query/key/value projections laid out as [q | k | v] along the output (GPT-2's c_attn, a
# transformers Conv1D): inject() adapts the query and value slices, as PEFT does for fused
# projections. (GPT-NeoX's query_key_value interleaves the heads: not listed.)
_FUSED_QKV_NAMES = ("c_attn",)
_QKV_PARTS = ("query", "key", "value")
# a target: a dotted module path inside the block, optionally with the [query|key|value] slice
# of a fused projection; nothing else (no "..", "/", empty or dunder components)
_TARGET_RE = re.compile(
    r"^(?!.*(?:^|\.)__)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*"
    r"(?:\[(query|key|value)\])?$"
)


def linear_dims(module: nn.Module):
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (GPT-2: weight
    (in, out), y = x @ W + b), or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    ):
        return int(weight.shape[0]), int(weight.shape[1])
    return None


class InjectTarget(NamedTuple):
    """Where inject() puts a LoRA: `name` (what handle.injected and saved files call it),
    `module` (the Linear / Conv1D inside the block), and the [start, stop) slice of its output
    (None: all of it); in / out features of the LoRA."""

    name: str
    module: str
    start: Optional[int]
    stop: Optional[int]
    in_features: int
    out_features: int


def resolve_target(block: nn.Module, name: str, index: int) -> InjectTarget:
    """The InjectTarget of `name` ("attention.query", "attn.c_attn", "attn.c_attn[value]")
    inside `block`; ValueError when it is not a Linear / Conv1D there (or not a [q | k | v]
    fused projection when a slice is asked for)."""
    m = _TARGET_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"inject target {name!r}: expected a dotted module path inside block "
            f"{index}, optionally with [query], [key] or [value]"
        )
    part = m.group(1)
    path = name[: name.index("[")] if part else name
    try:
        module = block.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"inject target {name!r}: block {index} has no submodule {path!r}"
        ) from None
    dims = linear_dims(module)
    if dims is None:
        raise ValueError(
            f"inject target {name!r}: block {index}'s {path!r} is a "
            f"{type(module).__name__}, not an nn.Linear or Conv1D"
        )
    d_in, d_out = dims
    if part is None:
        return InjectTarget(name, path, None, None, d_in, d_out)
    if d_out % 3:
        raise ValueError(
            f"inject target {name!r}: {path!r} has {d_out} outputs, not a fused "
            f"[query | key | value] projection (a multiple of 3)"
        )
    width = d_out // 3
    start = _QKV_PARTS.index(part) * width
    return InjectTarget(name, path, start, start + width, d_in, width)


def find_targets(
    block: nn.Module, index: int, wanted: Optional[Sequence[str]] = None
) -> List[InjectTarget]:
    """The InjectTargets inside `block` (block `index` of the stack): those named by `wanted`
    (LoR2CConfig.inject_targets, name suffixes), else the query and value projections. No
    target twice, no two slices overlapping."""
    linears = {n: m for n, m in block.named_modules() if n and linear_dims(m) is not None}
    if wanted is not None:
        out = []
        for t in wanted:
            base, bracket, part = t.partition("[")
            hits = [n for n in linears if n == base or n.endswith("." + base)]
            if len(hits) != 1:
                raise ValueError(
                    f"inject_targets: {t!r} matches {len(hits)} nn.Linear / "
                    f"Conv1D modules in block {index} ({sorted(linears)}); "
                    f"expected exactly one"
                )
            out.append(resolve_target(block, hits[0] + bracket + part, index))
    else:
        out = _default_targets(block, index, linears)
    seen: dict = {}
    for t in out:  # one LoRA per output element: no target twice, no slice overlapping
        for other in seen.get(t.module, []):
            if (
                t.start is None
                or other.start is None
                or (t.start < other.stop and other.start < t.stop)
            ):
                raise ValueError(
                    f"inject_targets: {other.name!r} and {t.name!r} overlap in block {index}"
                )
        seen.setdefault(t.module, []).append(t)
    return out


def _default_targets(block: nn.Module, index: int, linears: dict) -> List[InjectTarget]:
    found = {}
    for kind, candidates in (("query", _QUERY_NAMES), ("value", _VALUE_NAMES)):
        for cand in candidates:
            hits = [n for n in linears if n.split(".")[-1] == cand]
            if len(hits) == 1:
                found[kind] = hits[0]
                break
    if len(found) == 2:
        return [resolve_target(block, found[k], index) for k in ("query", "value")]
    fused = [
        n
        for n in linears
        if n.split(".")[-1] in _FUSED_QKV_NAMES
        and linear_dims(linears[n])[1] == 3 * linear_dims(linears[n])[0]
    ]
    if not found and len(fused) == 1:
        return [resolve_target(block, f"{fused[0]}[{k}]", index) for k in ("query", "value")]
    kind = "value" if "query" in found else "query"
    raise ValueError(
        f"inject: cannot find the {kind} projection (an nn.Linear or Conv1D named "
        f"one of {_QUERY_NAMES if kind == 'query' else _VALUE_NAMES}, or a fused "
        f"[q | k | v] projection named one of {_FUSED_QKV_NAMES}) in block "
        f"{index}; pass LoR2CConfig(inject_targets=[...])"
    )
