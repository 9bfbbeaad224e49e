"""apply_lor2c: LoR2C adapters attached to the stack of blocks of an existing model.

An adapter over blocks start..end changes the output of block `end` to
    Block_end(h_end) + s * dropout(h_start) @ A.T @ B.T
through the fused op (FusedLoR2C, or one ShareLoR2C bank with share=True).

The model's modules are not replaced: a forward hook on block `end` adds the residual (and a
forward pre-hook on block `start` keeps h_start when the span covers several blocks), so the
base model's state_dict keys are unchanged. The adapters live in one submodule registered on the
model (`model.lor2c_adapters`), so `model.parameters()`, `.to()`, `.train()` and `state_dict()`
see them; `handle.remove()` takes it away, removes the hooks and restores requires_grad.
Hooks run outside Hugging Face's gradient checkpointing (which checkpoints `forward`), and
torch.compile of the whole model traces them.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..modules.lor2c import FusedLoR2C
from ..modules.share import ShareLoR2C
from .config import LoR2CConfig, normalise_spans
from .optim import StructuralEdit
from .sfs import factored_singular_values, sfs_from_sigma

ATTRIBUTE = "lor2c_adapters"

# Stacks of blocks, by the end of their dotted path (Hugging Face naming).
_STACK_SUFFIXES = ("encoder.layer", "encoder.layers", "model.layers", "decoder.layers",
                   "transformer.h", "transformer.layers", "layers", "layer", "h", "blocks")
_QUERY_NAMES = ("query", "q_proj", "query_proj", "q_lin", "q")
_VALUE_NAMES = ("value", "v_proj", "value_proj", "v_lin", "v")
# Fused query/key/value projections laid out as [q | k | v] along the output (GPT-2's c_attn, a
# transformers Conv1D): inject() adapts the query and value slices, as PEFT does for fused
# projections. (GPT-NeoX's query_key_value interleaves the heads: not listed.)
_FUSED_QKV_NAMES = ("c_attn",)
_QKV_PARTS = ("query", "key", "value")
# a target: a dotted module path inside the block, optionally with the [query|key|value] slice
# of a fused projection; nothing else (no "..", "/", empty or dunder components)
_TARGET_RE = re.compile(r"^(?!.*(?:^|\.)__)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*"
                        r"(?:\[(query|key|value)\])?$")


class UntrainedParametersWarning(UserWarning):
    """A structural edit added parameters that no optimizer knows about: they would not train."""


# --- finding the blocks -------------------------------------------------------------------------

def find_blocks(model: nn.Module, layers_path: Optional[str] = None):
    """(path, nn.ModuleList of blocks) for `model`: at `layers_path`, or found by name."""
    if layers_path is not None:
        try:
            stack = model.get_submodule(layers_path)
        except AttributeError as exc:
            raise ValueError(f"layers_path: {layers_path!r} is not a submodule of "
                             f"{type(model).__name__} ({exc})") from None
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
            raise ValueError(f"layers_path: expected a non-empty nn.ModuleList or nn.Sequential "
                             f"at {layers_path!r}, got {type(stack).__name__}")
        return layers_path, stack
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(name == s or name.endswith("." + s) for s in _STACK_SUFFIXES):
                found.append((name, module))
    if not found:
        raise ValueError(f"cannot find the stack of blocks of {type(model).__name__} (looked for "
                         f"an nn.ModuleList named like {', '.join(_STACK_SUFFIXES)}); pass "
                         f"LoR2CConfig(layers_path=...)")
    if len(found) > 1:
        names = [n for n, _ in found]
        raise ValueError(f"{type(model).__name__} has several stacks of blocks {names}; choose one "
                         f"with LoR2CConfig(layers_path=...)")
    return found[0]


def model_family(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {"class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None) if cfg is not None else None}


def linear_dims(module: nn.Module):
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (GPT-2: weight
    (in, out), y = x @ W + b), or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1]):
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
        raise ValueError(f"inject target {name!r}: expected a dotted module path inside block "
                         f"{index}, optionally with [query], [key] or [value]")
    part = m.group(1)
    path = name[: name.index("[")] if part else name
    try:
        module = block.get_submodule(path)
    except AttributeError:
        raise ValueError(f"inject target {name!r}: block {index} has no submodule {path!r}") from None
    dims = linear_dims(module)
    if dims is None:
        raise ValueError(f"inject target {name!r}: block {index}'s {path!r} is a "
                         f"{type(module).__name__}, not an nn.Linear or Conv1D")
    d_in, d_out = dims
    if part is None:
        return InjectTarget(name, path, None, None, d_in, d_out)
    if d_out % 3:
        raise ValueError(f"inject target {name!r}: {path!r} has {d_out} outputs, not a fused "
                         f"[query | key | value] projection (a multiple of 3)")
    width = d_out // 3
    start = _QKV_PARTS.index(part) * width
    return InjectTarget(name, path, start, start + width, d_in, width)


def _block_dims(block: nn.Module):
    """(d_in, d_out) of a block, read from its first and last nn.Linear, or None."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    return linears[0].in_features, linears[-1].out_features


def _hidden_dims(model: nn.Module, blocks, config: LoR2CConfig):
    """[(d_in, d_out)] per block."""
    if config.hidden_size is not None:
        return [(config.hidden_size, config.hidden_size)] * len(blocks)
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return [(value, value)] * len(blocks)
    dims = [_block_dims(b) for b in blocks]
    if any(d is None for d in dims):
        raise ValueError("cannot tell the hidden size of the blocks (no model.config.hidden_size "
                         "and no nn.Linear inside a block); pass LoR2CConfig(hidden_size=...)")
    return dims


def _factory(model: nn.Module, blocks, config: LoR2CConfig):
    param = next(iter(blocks[0].parameters()), None)
    if param is None:
        param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if config.dtype is not None:
        dtype = getattr(torch, config.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype name, got {config.dtype!r}")
    elif param is not None and param.dtype.is_floating_point:
        dtype = param.dtype
    else:
        dtype = torch.float32
    return {"device": device, "dtype": dtype}


# --- calling conventions of blocks --------------------------------------------------------------

def _hidden_input(args, kwargs, name: str, index: int) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if name in kwargs and isinstance(kwargs[name], torch.Tensor):
        return kwargs[name]
    raise TypeError(f"LoR2C: block {index} was called without the hidden states as its first "
                    f"positional argument or as keyword {name!r}; set "
                    f"LoR2CConfig(hidden_states_kwarg=...)")


def _replace_hidden(output, new, index: int):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise TypeError(f"LoR2C: block {index} returned {type(output).__name__}; expected a tensor or "
                    f"a tuple/list whose first element is the hidden states")


def _hidden_output(output, index: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"LoR2C: block {index} returned {type(output).__name__}; expected a tensor or "
                    f"a tuple/list whose first element is the hidden states")


# --- adapters -----------------------------------------------------------------------------------

class SpanLoR2C(FusedLoR2C):
    """A FusedLoR2C adapter over blocks start..end (inclusive)."""

    def __init__(self, start: int, end: int, *args, merged: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.start, self.end, self.merged = start, end, merged

    def residual(self, x, layer_out):
        return self(x, layer_out)

    def extra_repr(self) -> str:
        return f"start={self.start}, end={self.end}, " + super().extra_repr()


class SharedAdapter:
    """One adapter of a ShareLoR2C bank: row `row` of B_bank, its group's row of A_bank."""

    def __init__(self, bank: ShareLoR2C, row: int, start: int, end: int, merged: bool = False):
        self.bank, self.row, self.start, self.end, self.merged = bank, row, start, end, merged

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
        return f"SharedAdapter(start={self.start}, end={self.end}, row={self.row})"


class _Capture:
    """Forward pre-hook on block `start` of a multi-block span: keeps h_start until block `end`."""

    def __init__(self, store: dict, start: int, kwarg: str):
        self.store, self.start, self.kwarg = store, start, kwarg

    def __call__(self, module, args, kwargs):
        self.store[self.start] = _hidden_input(args, kwargs, self.kwarg, self.start)
        return None


class _Residual:
    """Forward hook on block `end`: output += s * dropout(h_start) @ A.T @ B.T (fused)."""

    def __init__(self, adapter, store: dict, kwarg: str):
        self.adapter, self.store, self.kwarg = adapter, store, kwarg

    def __call__(self, module, args, kwargs, output):
        a = self.adapter
        if a.start == a.end:
            x = _hidden_input(args, kwargs, self.kwarg, a.start)
        else:
            x = self.store.pop(a.start, None)
            if x is None:
                raise RuntimeError(f"LoR2C: block {a.end} ran without block {a.start} before it; "
                                   f"the span ({a.start}, {a.end}) needs h_{a.start}")
        out = _hidden_output(output, a.end)
        return _replace_hidden(output, a.residual(x, out), a.end)


class _InjectedLoRA:
    """Forward hook on an nn.Linear (or Conv1D): y = x W.T + b + s * dropout(x) @ A.T @ B.T (the
    fused op with layer_out = x W.T + b)."""

    def __init__(self, lora: FusedLoR2C):
        self.lora = lora

    def __call__(self, module, args, output):
        return self.lora(args[0], output)


class _InjectedSlices:
    """Forward hook on a fused projection: the LoRAs add to their [start, stop) slices of the
    output (GPT-2's c_attn: query and value), the rest passes through."""

    def __init__(self, parts):
        self.parts = sorted(parts, key=lambda p: p[1])  # (lora, start, stop)

    def __call__(self, module, args, output):
        x, pieces, pos = args[0], [], 0
        for lora, start, stop in self.parts:
            if start > pos:
                pieces.append(output[..., pos:start])
            pieces.append(lora(x, output[..., start:stop]))
            pos = stop
        if pos < output.shape[-1]:
            pieces.append(output[..., pos:])
        return torch.cat(pieces, dim=-1)


def _key(block: int, name: str) -> str:
    return f"{block}:{name}".replace(".", "__")


class LoR2CAdapters(nn.Module):
    """The adapters of one model (registered on it as `lor2c_adapters`): `lor2c` (ModuleList of
    SpanLoR2C) or `bank` (ShareLoR2C), and `injected` LoRAs keyed by block and module name."""

    def __init__(self, config: LoR2CConfig, spans, dims, factory, layers_path, family):
        super().__init__()
        self.config = config
        self.layers_path, self.family = layers_path, family
        self.dims = [tuple(d) for d in dims]
        self.num_blocks = len(dims)
        self.history: List[dict] = []
        self.lor2c = nn.ModuleList()
        self.bank: Optional[ShareLoR2C] = None
        self.injected = nn.ModuleDict()
        self.injected_meta: dict = {}  # key -> (block, target name)
        self.injected_targets: Dict[str, InjectTarget] = {}  # key -> where it acts
        self._shared: List[SharedAdapter] = []
        self._store: dict = {}
        self._hooks: list = []
        self._factory = factory
        for s, e in spans:
            if e >= self.num_blocks:
                raise ValueError(f"spans: ({s}, {e}) is out of range for a model with "
                                 f"{self.num_blocks} blocks")
        if config.share:
            d_ins = {dims[s][0] for s, _ in spans}
            d_outs = {dims[e][1] for _, e in spans}
            if len(d_ins) != 1 or len(d_outs) != 1:
                raise ValueError("share=True needs one input and one output width for all spans, "
                                 f"got {sorted(d_ins)} and {sorted(d_outs)}")
            self.bank = ShareLoR2C(len(spans), d_ins.pop(), d_outs.pop(), r=config.r,
                                   alpha=config.alpha, dropout=config.dropout,
                                   backend=config.backend, **factory)
            self._shared = [SharedAdapter(self.bank, i, s, e) for i, (s, e) in enumerate(spans)]
        else:
            for s, e in spans:
                self.lor2c.append(self._new_span(s, e))

    def _new_span(self, start, end, merged=False) -> SpanLoR2C:
        c = self.config
        return SpanLoR2C(start, end, self.dims[start][0], self.dims[end][1], r=c.r,
                         alpha=c.alpha, dropout=c.dropout, backend=c.backend, merged=merged,
                         **self._factory)

    @property
    def adapters(self) -> list:
        return list(self._shared) if self.bank is not None else list(self.lor2c)

    def spans(self):
        return [(a.start, a.end) for a in self.adapters]

    def forward(self, *args, **kwargs):
        raise RuntimeError("lor2c_adapters is a container; call the model")

    # hooks -----------------------------------------------------------------------------------
    def install(self, blocks) -> None:
        self.uninstall()
        kw = self.config.hidden_states_kwarg
        for a in self.adapters:
            if a.start != a.end:
                self._hooks.append(blocks[a.start].register_forward_pre_hook(
                    _Capture(self._store, a.start, kw), with_kwargs=True))
            self._hooks.append(blocks[a.end].register_forward_hook(
                _Residual(a, self._store, kw), with_kwargs=True))
        per_module: dict = {}
        for key, (block, _) in self.injected_meta.items():
            t = self.injected_targets[key]
            per_module.setdefault((block, t.module), []).append(
                (self.injected[key], t.start, t.stop))
        for (block, path), parts in per_module.items():
            module = blocks[block].get_submodule(path)
            if len(parts) == 1 and parts[0][1] is None:
                hook = _InjectedLoRA(parts[0][0])
            else:
                hook = _InjectedSlices(parts)
            self._hooks.append(module.register_forward_hook(hook))

    def add_injected(self, block: int, target: InjectTarget, lora: FusedLoR2C) -> str:
        key = _key(block, target.name)
        self.injected[key] = lora
        self.injected_meta[key] = (block, target.name)
        self.injected_targets[key] = target
        return key

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._store.clear()


# --- the handle ---------------------------------------------------------------------------------

class LoR2CHandle:
    """What apply_lor2c returns: the adapters, structural edits, and remove()."""

    def __init__(self, model: nn.Module, container: LoR2CAdapters, blocks, saved_flags):
        self.model, self.container, self.blocks = model, container, blocks
        self._saved_flags = saved_flags
        self._optimizer = None
        self.removed = False

    # inspection -------------------------------------------------------------------------------
    @property
    def config(self) -> LoR2CConfig:
        return self.container.config

    @property
    def adapters(self) -> list:
        """Ordered by start block; each has .start, .end, .lora_A, .lora_B, .scaling."""
        return self.container.adapters

    @property
    def spans(self):
        return self.container.spans()

    @property
    def injected(self) -> dict:
        """{(block, module name): FusedLoR2C} of the LoRAs added by inject()."""
        return {meta: self.container.injected[k] for k, meta in self.container.injected_meta.items()}

    @property
    def history(self) -> List[dict]:
        return list(self.container.history)

    def parameters(self):
        """The adapter parameters (all trainable)."""
        return list(self.container.parameters())

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def _check_live(self):
        if self.removed:
            raise RuntimeError("this LoR2C handle was removed from its model")

    # SFS -------------------------------------------------------------------------------------
    def sfs(self, k: Optional[int] = None) -> List[float]:
        """SFS of each adapter from its factors (docs/math.md section 3.1: thin QR, r x r SVD)."""
        self._check_live()
        out = []
        for a in self.adapters:
            A, B = a.lora_A, a.lora_B
            sigma = factored_singular_values(A, B)
            out.append(sfs_from_sigma(sigma, min(B.shape[0], A.shape[1]), k))
        return out

    # structural edits ------------------------------------------------------------------------
    def mergeable_pairs(self) -> List[tuple]:
        """Index pairs (i, i + 1) of adjacent adapters whose merged span respects
        max_merge_length."""
        ads = self.adapters
        limit = self.config.max_merge_length
        pairs = []
        for i in range(len(ads) - 1):
            lo, up = ads[i], ads[i + 1]
            if up.start == lo.end + 1 and (limit is None or up.end - lo.start + 1 <= limit):
                pairs.append((i, i + 1))
        return pairs

    def merge(self, i: Optional[int] = None, j: Optional[int] = None, optimizer=None,
              k: Optional[int] = None) -> StructuralEdit:
        """Merges adapters i and j = i + 1 (adjacent) into one over lower.start..upper.end,
        initialised from the lower adapter's A, B and scaling. i None: the mergeable pair with
        the smallest summed SFS (with `k`).

        The optimizer (`optimizer`, else the one given to attach_optimizer / apply_lor2c) is
        updated: the removed parameters leave it with their state, the new ones join the group
        the removed ones were in. With neither, an UntrainedParametersWarning lists the new
        parameters (they train only once you add them); `optimizer=False` says you will add
        `edit.added` yourself (e.g. you build the optimizer after the edits) and warns nothing."""
        self._check_live()
        self._optimizer_for_edit(optimizer)  # a wrong optimizer fails before anything changes
        ads = self.adapters
        if i is None:
            pairs = self.mergeable_pairs()
            if not pairs:
                raise ValueError("merge: no adjacent pair of adapters can be merged (max_merge_"
                                 f"length={self.config.max_merge_length}, spans={self.spans})")
            scores = self.sfs(k)
            i, j = min(pairs, key=lambda p: scores[p[0]] + scores[p[1]])
        if j is None:
            j = i + 1
        for name, v in (("i", i), ("j", j)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(ads):
                raise ValueError(f"merge: {name} must be an adapter index in 0..{len(ads) - 1}, "
                                 f"got {v!r}")
        if j != i + 1 or ads[j].start != ads[i].end + 1:
            raise ValueError(f"merge: adapters {i} {ads[i].start, ads[i].end} and {j} "
                             f"{ads[j].start, ads[j].end} are not adjacent (the upper one must "
                             f"start at the block after the lower one ends)")
        lo, up = ads[i], ads[j]
        limit = self.config.max_merge_length
        length = up.end - lo.start + 1
        if limit is not None and length > limit:
            raise ValueError(f"merge: the span ({lo.start}, {up.end}) would cover {length} blocks, "
                             f"more than max_merge_length={limit}")
        c = self.container
        detail = {"i": i, "j": j, "lower": [lo.start, lo.end], "upper": [up.start, up.end],
                  "span": [lo.start, up.end]}
        if c.bank is None:
            new = c._new_span(lo.start, up.end, merged=True)
            with torch.no_grad():
                new.lora_A.copy_(lo.lora_A)
                new.lora_B.copy_(lo.lora_B)
            new.scaling = lo.scaling
            new.train(lo.training)
            removed = [lo.lora_A, lo.lora_B, up.lora_A, up.lora_B]
            mods = list(c.lor2c)
            mods[i:j + 1] = [new]
            c.lor2c = nn.ModuleList(mods)
            added = [new.lora_A, new.lora_B]
        else:
            removed, added = self._drop_bank_row(j)
            lo.end, lo.merged = up.end, True
        return self._finish("merge", detail, removed, added, optimizer)

    def injectable(self) -> List[int]:
        """Indices of adapters inject() may pick: single-block, not created by a merge, on a block
        without injected LoRAs."""
        done = {b for b, _ in self.container.injected_meta.values()}
        return [i for i, a in enumerate(self.adapters)
                if a.start == a.end and not a.merged and a.start not in done]

    def inject_targets(self, block: int) -> List[str]:
        """Names (inside block `block`) of what inject() puts a LoRA on: the query and value
        projections (nn.Linear or Conv1D, found by name), or the [query] and [value] slices of a
        fused [q | k | v] projection (GPT-2's c_attn); or config.inject_targets."""
        return [t.name for t in self._targets(block)]

    def _targets(self, block: int) -> List[InjectTarget]:
        module = self.blocks[block]
        linears = {n: m for n, m in module.named_modules() if n and linear_dims(m) is not None}
        wanted = self.config.inject_targets
        if wanted is not None:
            out = []
            for t in wanted:
                base, bracket, part = t.partition("[")
                hits = [n for n in linears if n == base or n.endswith("." + base)]
                if len(hits) != 1:
                    raise ValueError(f"inject_targets: {t!r} matches {len(hits)} nn.Linear / "
                                     f"Conv1D modules in block {block} ({sorted(linears)}); "
                                     f"expected exactly one")
                out.append(resolve_target(module, hits[0] + bracket + part, block))
        else:
            out = self._default_targets(block, module, linears)
        seen: dict = {}
        for t in out:  # one LoRA per output element: no target twice, no slice overlapping
            for other in seen.get(t.module, []):
                if (t.start is None or other.start is None
                        or (t.start < other.stop and other.start < t.stop)):
                    raise ValueError(f"inject_targets: {other.name!r} and {t.name!r} overlap in "
                                     f"block {block}")
            seen.setdefault(t.module, []).append(t)
        return out

    @staticmethod
    def _default_targets(block, module, linears) -> List[InjectTarget]:
        found = {}
        for kind, candidates in (("query", _QUERY_NAMES), ("value", _VALUE_NAMES)):
            for cand in candidates:
                hits = [n for n in linears if n.split(".")[-1] == cand]
                if len(hits) == 1:
                    found[kind] = hits[0]
                    break
        if len(found) == 2:
            return [resolve_target(module, found[k], block) for k in ("query", "value")]
        fused = [n for n in linears if n.split(".")[-1] in _FUSED_QKV_NAMES
                 and linear_dims(linears[n])[1] == 3 * linear_dims(linears[n])[0]]
        if not found and len(fused) == 1:
            return [resolve_target(module, f"{fused[0]}[{k}]", block) for k in ("query", "value")]
        kind = "value" if "query" in found else "query"
        raise ValueError(f"inject: cannot find the {kind} projection (an nn.Linear or Conv1D named "
                         f"one of {_QUERY_NAMES if kind == 'query' else _VALUE_NAMES}, or a fused "
                         f"[q | k | v] projection named one of {_FUSED_QKV_NAMES}) in block "
                         f"{block}; pass LoR2CConfig(inject_targets=[...])")

    def inject(self, i: Optional[int] = None, optimizer=None,
               k: Optional[int] = None) -> StructuralEdit:
        """Removes adapter i (None: the injectable one with the largest SFS) and attaches a
        trainable LoRA (the fused op with layer_out = x W.T + b) on that block's query and value
        projections (inject_targets(block)). Updates the optimizer like merge()."""
        self._check_live()
        self._optimizer_for_edit(optimizer)  # a wrong optimizer fails before anything changes
        ads = self.adapters
        allowed = self.injectable()
        if i is None:
            if not allowed:
                raise ValueError("inject: no adapter can be injected (each must cover one block, "
                                 "not come from a merge, and its block must have no LoRA yet)")
            scores = self.sfs(k)
            i = max(allowed, key=lambda n: scores[n])
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(ads):
            raise ValueError(f"inject: i must be an adapter index in 0..{len(ads) - 1}, got {i!r}")
        if i not in allowed:
            a = ads[i]
            raise ValueError(f"inject: adapter {i} over ({a.start}, {a.end}) cannot be injected "
                             f"(it must cover one block, not come from a merge, and its block "
                             f"must have no LoRA yet)")
        block = ads[i].start
        targets = self._targets(block)
        c = self.container
        cfg = self.config
        r = cfg.inject_r or cfg.r
        alpha = cfg.inject_alpha if cfg.inject_alpha is not None else cfg.alpha
        new_modules = []
        for t in targets:
            weight = self.blocks[block].get_submodule(t.module).weight
            lora = FusedLoR2C(t.in_features, t.out_features, r=r, alpha=alpha,
                              dropout=cfg.dropout, backend=cfg.backend,
                              device=weight.device, dtype=c._factory["dtype"])
            lora.train(c.training)
            new_modules.append((t, lora))
        if c.bank is None:
            old = c.lor2c[i]
            removed = [old.lora_A, old.lora_B]
            mods = list(c.lor2c)
            del mods[i]
            c.lor2c = nn.ModuleList(mods)
            added = []
        else:
            # B_bank is rebuilt without row i: the old Parameter leaves, the new one joins (the
            # shared A stays while other adapters use it)
            removed, added = self._drop_bank_row(i)
        for t, lora in new_modules:
            c.add_injected(block, t, lora)
            added += [lora.lora_A, lora.lora_B]
        detail = {"i": i, "block": block, "modules": [t.name for t, _ in new_modules]}
        return self._finish("inject", detail, removed, added, optimizer)

    def _drop_bank_row(self, row: int):
        c = self.container
        bank = c.bank
        old = bank.B_bank
        keep = [n for n in range(bank.num_adapters) if n != row]
        if not keep:
            raise ValueError("cannot remove the last adapter of a shared bank")
        bank.B_bank = nn.Parameter(old.detach()[keep].clone())
        bank.groups = [bank.groups[n] for n in keep]
        bank.num_adapters = len(keep)
        del c._shared[row]
        for n, a in enumerate(c._shared):
            a.row = n
        return [old], [bank.B_bank]

    def _optimizer_for_edit(self, optimizer):
        if optimizer is None:
            return self._optimizer
        if optimizer is False:
            return None
        _check_optimizer(optimizer)
        return optimizer

    def _finish(self, kind, detail, removed, added, optimizer) -> StructuralEdit:
        opt = self._optimizer_for_edit(optimizer)
        c = self.container
        c.install(self.blocks)
        c.history.append({"kind": kind, **detail})
        for p in added:
            p.requires_grad_(True)
        for p in removed:
            p.grad = None  # no stale gradient left behind on a parameter that left the model
        names = {id(p): n for n, p in self.model.named_parameters()}
        edit = StructuralEdit(kind, detail, removed, added,
                              added_names=[names.get(id(p), "?") for p in added])
        edit.apply_to(opt)
        if opt is None and optimizer is not False:
            listed = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(edit.added_names, added))
            warnings.warn(
                f"LoR2C {kind}: no optimizer knows the {len(added)} new parameters ({listed}); "
                f"they will not train. Pass optimizer= to {kind}(), call "
                f"handle.attach_optimizer(opt) once, or add edit.added to your optimizer (and "
                f"drop edit.removed); pass optimizer=False if you build the optimizer after the "
                f"edits.", UntrainedParametersWarning, stacklevel=3)
        return edit

    # the optimizer ---------------------------------------------------------------------------
    @property
    def optimizer(self):
        """The optimizer merge() / inject() keep in step when not given one (attach_optimizer)."""
        return self._optimizer

    def attach_optimizer(self, optimizer) -> list:
        """From now on every merge() / inject() updates `optimizer` (None: forget it). Adapter
        parameters it does not hold yet join its first param group. Returns those."""
        if optimizer is None:
            self._optimizer = None
            return []
        _check_optimizer(optimizer)
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.parameters() if p.requires_grad and id(p) not in present]
        if missing:
            optimizer.param_groups[0]["params"].extend(missing)
        self._optimizer = optimizer
        return missing

    # removal ---------------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Restores the model exactly: hooks and the adapters' submodule gone, requires_grad
        flags as before apply_lor2c. Returns the model."""
        if self.removed:
            return self.model
        self.container.uninstall()
        if getattr(self.model, ATTRIBUTE, None) is self.container:
            delattr(self.model, ATTRIBUTE)
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self.removed = True
        self._optimizer = None
        return self.model

    def __repr__(self) -> str:
        return (f"LoR2CHandle(spans={self.spans}, share={self.config.share}, "
                f"injected={sorted(self.injected)}, removed={self.removed})")


def _is_trainable(name: str, patterns: Sequence[str]) -> bool:
    return any(name == t or name.startswith(t + ".") or ("." + t + ".") in ("." + name)
               for t in patterns)


def build(model: nn.Module, config: LoR2CConfig, spans=None):
    """(container, blocks, path) for `model` without touching it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoR2CConfig):
        raise TypeError(f"config: expected a LoR2CConfig, got {type(config).__name__}")
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ValueError("model already has LoR2C adapters; call handle.remove() first")
    path, blocks = find_blocks(model, config.layers_path)
    dims = _hidden_dims(model, blocks, config)
    if spans is None:
        spans = config.spans if config.spans is not None else [(i, i) for i in range(len(blocks))]
    spans = normalise_spans(spans)
    container = LoR2CAdapters(config, spans, dims, _factory(model, blocks, config), path,
                              model_family(model))
    container.train(model.training)
    return container, blocks


def attach(model: nn.Module, container: LoR2CAdapters, blocks) -> LoR2CHandle:
    cfg = container.config
    saved = [(p, p.requires_grad) for p in model.parameters()]
    if cfg.freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad_(_is_trainable(name, cfg.trainable))
    model.add_module(ATTRIBUTE, container)
    container.install(blocks)
    handle = LoR2CHandle(model, container, blocks, saved)
    container.__dict__["handle"] = handle  # a plain attribute: save_adapters(model) finds it
    return handle


def apply_lor2c(model: nn.Module, config: Optional[LoR2CConfig] = None,
                optimizer=None) -> LoR2CHandle:
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
        _check_optimizer(optimizer)
    container, blocks = build(model, config)
    handle = attach(model, container, blocks)
    if optimizer is not None:
        handle.attach_optimizer(optimizer)
    return handle


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")


def get_handle(model: nn.Module) -> Optional[LoR2CHandle]:
    """The live LoR2C handle of `model`, or None."""
    container = getattr(model, ATTRIBUTE, None)
    return None if container is None else container.__dict__.get("handle")


__all__ = ["InjectTarget", "LoR2CHandle", "LoR2CAdapters", "SpanLoR2C", "SharedAdapter",
           "UntrainedParametersWarning", "apply_lor2c", "find_blocks", "get_handle"]
