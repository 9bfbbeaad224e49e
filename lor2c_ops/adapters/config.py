"""LoR2CConfig: what apply_lor2c attaches, and how the structural edits behave."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from .. import _checks as checks


def _names(value, name: str, allow_none: bool = False):
    """A tuple of strings from a string or a sequence of strings."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{name}: expected a name or a list of names, got {value!r}")


def _optional_str(value, name: str):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: expected a string or None, got {value!r}")
    return value


def normalise_spans(spans) -> Optional[Tuple[Tuple[int, int], ...]]:
    """spans as a tuple of (start, end) int pairs, sorted and checked not to overlap."""
    if spans is None:
        return None
    out = []
    for item in spans:
        try:
            start, end = item
        except (TypeError, ValueError):
            raise ValueError(f"spans: expected (start, end) pairs, got {item!r}") from None
        for v in (start, end):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"spans: expected non-negative int block indices, got {item!r}")
        if end < start:
            raise ValueError(f"spans: expected start <= end, got {item!r}")
        out.append((int(start), int(end)))
    if not out:
        raise ValueError("spans: expected at least one (start, end) pair, got an empty list")
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 <= e0:
            raise ValueError(
                f"spans: ({s0}, {e0}) and ({s1}, {e1}) overlap; each block may end "
                f"or lie inside at most one span"
            )
    return tuple(out)


@dataclass
class LoR2CConfig:
    """Configuration of LoR2C adapters (docs/math.md sections 1-3).

    r, alpha, dropout: rank, scaling alpha / r, and dropout on the span input h_start.
    share: one ShareLoR2C bank (a single down-projection A shared by all adapters, one B each).
    spans: (start, end) block ranges, inclusive; None = one adapter per block.
    layers_path: dotted path of the stack of blocks (an nn.ModuleList) inside the model; None
        finds it for Hugging Face models (encoder.layer, model.layers, transformer.h, ...).
    hidden_size: the width of the hidden states; None reads it from model.config (hidden_size,
        n_embd, d_model) or from the Linear layers of the blocks.
    hidden_states_kwarg: name of the hidden-states argument when a block gets it by keyword.
    trainable: names of modules of the base model that stay trainable (e.g. a classifier head).
    freeze_base: freeze every other parameter of the base model (restored by handle.remove()).
    max_merge_length: the longest span (in blocks) a merge may create; None = no limit.
    inject_targets: names (suffixes) of the nn.Linear / Conv1D modules inside a block that
        inject() puts a LoRA on, or "<name>[query]" / "[key]" / "[value]" for a slice of a fused
        [q | k | v] projection; None = the query and value projections, found by name (GPT-2:
        the query and value slices of c_attn).
    inject_r, inject_alpha: rank and alpha of injected LoRAs (default: r and alpha).
    dtype: dtype of the adapter weights; None = the dtype of the base model's parameters.
    backend: forwarded to the fused op (None = the fastest for the inputs).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    share: bool = False
    spans: Optional[Sequence[Tuple[int, int]]] = None
    layers_path: Optional[str] = None
    hidden_size: Optional[int] = None
    hidden_states_kwarg: str = "hidden_states"
    trainable: Sequence[str] = field(default_factory=tuple)
    freeze_base: bool = True
    max_merge_length: Optional[int] = None
    inject_targets: Optional[Sequence[str]] = None
    inject_r: Optional[int] = None
    inject_alpha: Optional[float] = None
    dtype: Optional[str] = None
    backend: Optional[str] = None

    def __post_init__(self):
        checks.positive_int(self.r, "r")
        checks.positive_int(self.max_merge_length, "max_merge_length", allow_none=True)
        checks.positive_int(self.inject_r, "inject_r", allow_none=True)
        checks.positive_int(self.hidden_size, "hidden_size", allow_none=True)
        self.alpha = checks.finite_number(self.alpha, "alpha")
        self.inject_alpha = checks.finite_number(self.inject_alpha, "inject_alpha", allow_none=True)
        self.dropout = checks.dropout_probability(self.dropout)
        for name in ("share", "freeze_base"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        self.spans = normalise_spans(self.spans)
        self.trainable = _names(self.trainable, "trainable")
        self.inject_targets = _names(self.inject_targets, "inject_targets", allow_none=True)
        _optional_str(self.layers_path, "layers_path")
        _optional_str(self.backend, "backend")
        if not isinstance(self.hidden_states_kwarg, str):
            raise ValueError(
                f"hidden_states_kwarg: expected a string, got {self.hidden_states_kwarg!r}"
            )
        if self.dtype is not None and not isinstance(self.dtype, str):
            self.dtype = str(self.dtype).replace("torch.", "")  # JSON-friendly
        if self.dtype is not None:
            checks.floating_dtype(self.dtype, "dtype")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spans"] = None if self.spans is None else [list(s) for s in self.spans]
        d["trainable"] = list(self.trainable)
        d["inject_targets"] = None if self.inject_targets is None else list(self.inject_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoR2CConfig":
        if not isinstance(d, dict):
            raise ValueError(f"LoR2CConfig: expected a dict of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoR2CConfig: unknown fields {unknown}")
        return cls(**d)
