"""LoR2CConfig: what apply_lor2c attaches, and how the structural edits behave."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
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
            raise ValueError(f"spans: ({s0}, {e0}) and ({s1}, {e1}) overlap; each block may end "
                             f"or lie inside at most one span")
    return tuple(out)


@dataclass
class LoR2CConfig:
    """Configuration of LoR2C adapters (DESIGN.md 2.1-2.3).

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
    inject_targets: names (suffixes) of the Linear modules inside a block that inject() puts a
        LoRA on; None = the query and value projections, found by name.
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
        _positive_int(self.r, "r")
        _positive_int(self.max_merge_length, "max_merge_length", allow_none=True)
        _positive_int(self.inject_r, "inject_r", allow_none=True)
        _positive_int(self.hidden_size, "hidden_size", allow_none=True)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.share, bool):
            raise ValueError(f"share: expected a bool, got {self.share!r}")
        self.spans = normalise_spans(self.spans)
        if isinstance(self.trainable, str):
            self.trainable = (self.trainable,)
        self.trainable = tuple(self.trainable)
        if isinstance(self.inject_targets, str):
            self.inject_targets = (self.inject_targets,)
        if self.inject_targets is not None:
            self.inject_targets = tuple(self.inject_targets)
        if self.dtype is not None and not isinstance(self.dtype, str):
            self.dtype = str(self.dtype).replace("torch.", "")  # JSON-friendly

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spans"] = None if self.spans is None else [list(s) for s in self.spans]
        d["trainable"] = list(self.trainable)
        d["inject_targets"] = (None if self.inject_targets is None
                               else list(self.inject_targets))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoR2CConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoR2CConfig: unknown fields {unknown}")
        return cls(**d)
