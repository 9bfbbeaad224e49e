"""LoR2CAdapters: the submodule (`model.lor2c_adapters`) that owns a model's adapters and their
hooks. Its public members are what the handle, the schedules and save / load use; nothing
outside this file touches its private state."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modules.lor2c import FusedLoR2C
from ..modules.share import ShareLoR2C
from .config import LoR2CConfig
from .hooks import AddResidual, CaptureInput, InjectedLoRA, InjectedSlices
from .spans import SharedAdapter, SpanAdapter, SpanLoR2C
from .targets import InjectTarget

Params = List[nn.Parameter]


def injected_key(block: int, name: str) -> str:
    """The key of the LoRA injected on `name` in block `block`, in `injected` and in saved
    files ("2:attention__self__query": module names may not contain dots)."""
    return f"{block}:{name}".replace(".", "__")


def shared_widths(spans: Sequence[Tuple[int, int]], dims) -> Tuple[int, int]:
    """(d_in, d_out) of a bank over `spans`: every span must start at one input width and end
    at one output width (dims: [(d_in, d_out)] per block)."""
    d_ins = {dims[s][0] for s, _ in spans}
    d_outs = {dims[e][1] for _, e in spans}
    if len(d_ins) != 1 or len(d_outs) != 1:
        raise ValueError(
            "share=True needs one input and one output width for all spans, "
            f"got {sorted(d_ins)} and {sorted(d_outs)}"
        )
    return d_ins.pop(), d_outs.pop()


class Injection(NamedTuple):
    """A LoRA added by inject(): its key, block, target and module."""

    key: str
    block: int
    target: InjectTarget
    lora: FusedLoR2C


class LoR2CAdapters(nn.Module):
    """The adapters of one model: `lor2c` (ModuleList of SpanLoR2C) or `bank` (one ShareLoR2C
    whose rows are the SharedAdapters), and `injected` LoRAs keyed by injected_key(). The
    state_dict keys (lor2c.N.lora_A, bank.A_bank, injected.KEY.lora_B) are the saved format.

    Public: `config`, `layers_path`, `family`, `dims` ([(d_in, d_out)] per block), `num_blocks`,
    `history` (the edits so far, as dicts), `handle` (the live LoR2CHandle, or None), `adapters`,
    `spans()`, `shared`, `dtype`, `injections()`; the edits `merge_pair`, `remove_adapter`,
    `add_injected` (each returns what it removed and added; the caller reinstalls the hooks);
    `install(blocks)` / `uninstall()` of the hooks."""

    def __init__(
        self,
        config: LoR2CConfig,
        spans: Sequence[Tuple[int, int]],
        dims,
        factory: dict,
        layers_path: str,
        family: dict,
    ):
        super().__init__()
        self.config = config
        self.layers_path, self.family = layers_path, family
        self.dims = [tuple(d) for d in dims]
        self.num_blocks = len(dims)
        self.history: List[dict] = []
        self.handle = None  # set by apply_lor2c / load_adapters; get_handle(model) reads it
        self.lor2c = nn.ModuleList()
        self.bank: Optional[ShareLoR2C] = None
        self.injected = nn.ModuleDict()
        self._injections: Dict[str, Tuple[int, InjectTarget]] = {}  # key -> (block, target)
        self._shared: List[SharedAdapter] = []
        self._store: dict = {}
        self._hooks: list = []
        self._factory = factory
        for s, e in spans:
            if e >= self.num_blocks:
                raise ValueError(
                    f"spans: ({s}, {e}) is out of range for a model with {self.num_blocks} blocks"
                )
        if config.share:
            d_in, d_out = shared_widths(spans, dims)
            self.bank = ShareLoR2C(
                len(spans),
                d_in,
                d_out,
                r=config.r,
                alpha=config.alpha,
                dropout=config.dropout,
                backend=config.backend,
                **factory,
            )
            self._shared = [SharedAdapter(self.bank, i, s, e) for i, (s, e) in enumerate(spans)]
        else:
            for s, e in spans:
                self.lor2c.append(self._new_span(s, e))

    def _new_span(self, start: int, end: int, from_merge: bool = False) -> SpanLoR2C:
        cfg = self.config
        return SpanLoR2C(
            start,
            end,
            self.dims[start][0],
            self.dims[end][1],
            r=cfg.r,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            backend=cfg.backend,
            from_merge=from_merge,
            **self._factory,
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError("lor2c_adapters is a container; call the model")

    # what there is ---------------------------------------------------------------------------
    @property
    def adapters(self) -> List[SpanAdapter]:
        """The span adapters, ordered by start block."""
        return list(self._shared) if self.bank is not None else list(self.lor2c)

    def spans(self) -> List[Tuple[int, int]]:
        return [(a.start, a.end) for a in self.adapters]

    @property
    def shared(self) -> bool:
        """Whether the adapters are rows of one ShareLoR2C bank (config.share)."""
        return self.bank is not None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the adapter weights (config.dtype, or the base model's)."""
        return self._factory["dtype"]

    def injections(self) -> List[Injection]:
        """The injected LoRAs, in the order they were added."""
        return [
            Injection(key, block, target, self.injected[key])
            for key, (block, target) in self._injections.items()
        ]

    # structural edits --------------------------------------------------------------------------
    def merge_pair(self, i: int, j: int) -> Tuple[Params, Params]:
        """Adapters i and j = i + 1 (adjacent, checked by the caller) become one over
        lower.start..upper.end with the lower one's weights and scaling (docs/math.md section
        3.2). Returns (removed, added) parameters."""
        lower, upper = self.adapters[i], self.adapters[j]
        if self.bank is not None:
            removed, added = self._drop_bank_row(j)
            lower.end, lower.from_merge = upper.end, True
            return removed, added
        new = self._new_span(lower.start, upper.end, from_merge=True)
        with torch.no_grad():
            new.lora_A.copy_(lower.lora_A)
            new.lora_B.copy_(lower.lora_B)
        new.scaling = lower.scaling
        new.train(self.training)
        spans = list(self.lor2c)
        spans[i : j + 1] = [new]
        self.lor2c = nn.ModuleList(spans)
        return [lower.lora_A, lower.lora_B, upper.lora_A, upper.lora_B], [new.lora_A, new.lora_B]

    def remove_adapter(self, i: int) -> Tuple[Params, Params]:
        """Takes adapter i away. With a bank, B_bank is rebuilt without row i: the old Parameter
        leaves, the new one joins (the shared A stays while other adapters use it). Returns
        (removed, added) parameters."""
        if self.bank is not None:
            return self._drop_bank_row(i)
        spans = list(self.lor2c)
        old = spans.pop(i)
        self.lor2c = nn.ModuleList(spans)
        return [old.lora_A, old.lora_B], []

    def _drop_bank_row(self, row: int) -> Tuple[Params, Params]:
        bank = self.bank
        old = bank.B_bank
        keep = [n for n in range(bank.num_adapters) if n != row]
        if not keep:
            raise ValueError("cannot remove the last adapter of a shared bank")
        bank.B_bank = nn.Parameter(old.detach()[keep].clone())
        bank.groups = [bank.groups[n] for n in keep]
        bank.num_adapters = len(keep)
        del self._shared[row]
        for n, a in enumerate(self._shared):
            a.row = n
        return [old], [bank.B_bank]

    def add_injected(
        self, block: int, target: InjectTarget, r: int, alpha: float, device
    ) -> FusedLoR2C:
        """A new LoRA (the fused op with layer_out = the target's output) on `target` in block
        `block`, with the config's dropout and backend, in the adapters' dtype on `device` (the
        target's weight's), in this container's training mode."""
        cfg = self.config
        lora = FusedLoR2C(
            target.in_features,
            target.out_features,
            r=r,
            alpha=alpha,
            dropout=cfg.dropout,
            backend=cfg.backend,
            device=device,
            dtype=self.dtype,
        )
        lora.train(self.training)
        key = injected_key(block, target.name)
        self.injected[key] = lora
        self._injections[key] = (block, target)
        return lora

    # hooks -----------------------------------------------------------------------------------
    def install(self, blocks) -> None:
        """(Re)installs the hooks of every adapter and injected LoRA on `blocks`."""
        self.uninstall()
        kw = self.config.hidden_states_kwarg
        for a in self.adapters:
            if a.start != a.end:
                self._hooks.append(
                    blocks[a.start].register_forward_pre_hook(
                        CaptureInput(self._store, a.start, kw), with_kwargs=True
                    )
                )
            self._hooks.append(
                blocks[a.end].register_forward_hook(
                    AddResidual(a, self._store, kw), with_kwargs=True
                )
            )
        per_module: dict = {}
        for inj in self.injections():
            t = inj.target
            per_module.setdefault((inj.block, t.module), []).append((inj.lora, t.start, t.stop))
        for (block, path), parts in per_module.items():
            module = blocks[block].get_submodule(path)
            if len(parts) == 1 and parts[0][1] is None:
                hook = InjectedLoRA(parts[0][0])
            else:
                hook = InjectedSlices(parts)
            self._hooks.append(module.register_forward_hook(hook))

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._store.clear()
