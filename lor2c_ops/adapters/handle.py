"""LoR2CHandle: what apply_lor2c and load_adapters return. Inspection, SFS, the structural edits
of docs/math.md section 3 (merge: MergeLoR2C, inject: InjectLoR2C) with the optimizer kept in
step, and remove(). The handle decides which edit and checks its arguments; the container
(LoR2CAdapters) carries it out."""

from __future__ import annotations

import warnings
from typing import List, Optional

from torch import nn

from .config import LoR2CConfig
from .container import LoR2CAdapters
from .optim import StructuralEdit, check_optimizer
from .sfs import sfs as factored_sfs
from .spans import SpanAdapter
from .targets import InjectTarget, find_targets

ATTRIBUTE = "lor2c_adapters"  # where the container is registered on the model


class UntrainedParametersWarning(UserWarning):
    """A structural edit added parameters that no optimizer knows about: they would not train."""


def _index(v, n: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and 0 <= v < n


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
    def adapters(self) -> List[SpanAdapter]:
        """Ordered by start block; each has .start, .end, .from_merge, .lora_A, .lora_B,
        .scaling, .r (spans.SpanAdapter)."""
        return self.container.adapters

    @property
    def spans(self):
        return self.container.spans()

    @property
    def injected(self) -> dict:
        """{(block, module name): FusedLoR2C} of the LoRAs added by inject()."""
        return {(inj.block, inj.target.name): inj.lora for inj in self.container.injections()}

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

    def check_live(self) -> None:
        """RuntimeError when remove() has been called."""
        if self.removed:
            raise RuntimeError("this LoR2C handle was removed from its model")

    # SFS -------------------------------------------------------------------------------------
    def sfs(self, k: Optional[int] = None) -> List[float]:
        """SFS of each adapter from its factors (docs/math.md section 3.1: thin QR, r x r SVD)."""
        self.check_live()
        return [factored_sfs(a.lora_A, a.lora_B, k) for a in self.adapters]

    # merge: MergeLoR2C -----------------------------------------------------------------------
    def mergeable_pairs(self) -> List[tuple]:
        """Index pairs (i, i + 1) of adjacent adapters whose merged span respects
        max_merge_length."""
        ads = self.adapters
        limit = self.config.max_merge_length
        pairs = []
        for i in range(len(ads) - 1):
            lower, upper = ads[i], ads[i + 1]
            if upper.start == lower.end + 1 and (
                limit is None or upper.end - lower.start + 1 <= limit
            ):
                pairs.append((i, i + 1))
        return pairs

    def merge(
        self,
        i: Optional[int] = None,
        j: Optional[int] = None,
        optimizer=None,
        k: Optional[int] = None,
    ) -> StructuralEdit:
        """Merges adapters i and j = i + 1 (adjacent) into one over lower.start..upper.end,
        initialised from the lower adapter's A, B and scaling. i None: the mergeable pair with
        the smallest summed SFS (with `k`).

        The optimizer (`optimizer`, else the one given to attach_optimizer / apply_lor2c) is
        updated: the removed parameters leave it with their state, the new ones join the group
        the removed ones were in. With neither, an UntrainedParametersWarning lists the new
        parameters (they train only once you add them); `optimizer=False` says you will add
        `edit.added` yourself (e.g. you build the optimizer after the edits) and warns nothing."""
        self.check_live()
        self._optimizer_for_edit(optimizer)  # a wrong optimizer fails before anything changes
        ads = self.adapters
        if i is None:
            pairs = self.mergeable_pairs()
            if not pairs:
                raise ValueError(
                    "merge: no adjacent pair of adapters can be merged (max_merge_"
                    f"length={self.config.max_merge_length}, spans={self.spans})"
                )
            scores = self.sfs(k)
            i, j = min(pairs, key=lambda p: scores[p[0]] + scores[p[1]])
        if j is None:
            j = i + 1
        for name, v in (("i", i), ("j", j)):
            if not _index(v, len(ads)):
                raise ValueError(
                    f"merge: {name} must be an adapter index in 0..{len(ads) - 1}, got {v!r}"
                )
        lower, upper = ads[i], ads[j]
        if j != i + 1 or upper.start != lower.end + 1:
            raise ValueError(
                f"merge: adapters {i} {lower.start, lower.end} and {j} "
                f"{upper.start, upper.end} are not adjacent (the upper one must "
                f"start at the block after the lower one ends)"
            )
        limit = self.config.max_merge_length
        length = upper.end - lower.start + 1
        if limit is not None and length > limit:
            raise ValueError(
                f"merge: the span ({lower.start}, {upper.end}) would cover {length} "
                f"blocks, more than max_merge_length={limit}"
            )
        detail = {
            "i": i,
            "j": j,
            "lower": [lower.start, lower.end],
            "upper": [upper.start, upper.end],
            "span": [lower.start, upper.end],
        }
        removed, added = self.container.merge_pair(i, j)
        return self._finish("merge", detail, removed, added, optimizer)

    # inject: InjectLoR2C ---------------------------------------------------------------------
    def injectable(self) -> List[int]:
        """Indices of adapters inject() may pick: single-block, not created by a merge, on a block
        without injected LoRAs."""
        done = {inj.block for inj in self.container.injections()}
        return [
            i
            for i, a in enumerate(self.adapters)
            if a.start == a.end and not a.from_merge and a.start not in done
        ]

    def inject_targets(self, block: int) -> List[str]:
        """Names (inside block `block`) of what inject() puts a LoRA on: the query and value
        projections (nn.Linear or Conv1D, found by name), or the [query] and [value] slices of a
        fused [q | k | v] projection (GPT-2's c_attn); or config.inject_targets."""
        return [t.name for t in self._targets(block)]

    def _targets(self, block: int) -> List[InjectTarget]:
        return find_targets(self.blocks[block], block, self.config.inject_targets)

    def inject(
        self, i: Optional[int] = None, optimizer=None, k: Optional[int] = None
    ) -> StructuralEdit:
        """Removes adapter i (None: the injectable one with the largest SFS) and attaches a
        trainable LoRA (the fused op with layer_out = x W.T + b) on that block's query and value
        projections (inject_targets(block)). Updates the optimizer like merge()."""
        self.check_live()
        self._optimizer_for_edit(optimizer)  # a wrong optimizer fails before anything changes
        ads = self.adapters
        allowed = self.injectable()
        if i is None:
            if not allowed:
                raise ValueError(
                    "inject: no adapter can be injected (each must cover one block, "
                    "not come from a merge, and its block must have no LoRA yet)"
                )
            scores = self.sfs(k)
            i = max(allowed, key=lambda n: scores[n])
        if not _index(i, len(ads)):
            raise ValueError(f"inject: i must be an adapter index in 0..{len(ads) - 1}, got {i!r}")
        if i not in allowed:
            a = ads[i]
            raise ValueError(
                f"inject: adapter {i} over ({a.start}, {a.end}) cannot be injected "
                f"(it must cover one block, not come from a merge, and its block "
                f"must have no LoRA yet)"
            )
        block = ads[i].start
        targets = self._targets(block)
        cfg = self.config
        r = cfg.inject_r or cfg.r
        alpha = cfg.inject_alpha if cfg.inject_alpha is not None else cfg.alpha
        removed, added = self.container.remove_adapter(i)
        for t in targets:
            device = self.blocks[block].get_submodule(t.module).weight.device
            lora = self.container.add_injected(block, t, r, alpha, device)
            added += [lora.lora_A, lora.lora_B]
        detail = {"i": i, "block": block, "modules": [t.name for t in targets]}
        return self._finish("inject", detail, removed, added, optimizer)

    # after an edit ---------------------------------------------------------------------------
    def _optimizer_for_edit(self, optimizer):
        if optimizer is None:
            return self._optimizer
        if optimizer is False:
            return None
        check_optimizer(optimizer)
        return optimizer

    def _finish(self, kind, detail, removed, added, optimizer) -> StructuralEdit:
        opt = self._optimizer_for_edit(optimizer)
        self.container.install(self.blocks)
        self.container.history.append({"kind": kind, **detail})
        for p in added:
            p.requires_grad_(True)
        for p in removed:
            p.grad = None  # no stale gradient left behind on a parameter that left the model
        names = {id(p): n for n, p in self.model.named_parameters()}
        edit = StructuralEdit(
            kind, detail, removed, added, added_names=[names.get(id(p), "?") for p in added]
        )
        edit.apply_to(opt)
        if opt is None and optimizer is not False:
            listed = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(edit.added_names, added))
            warnings.warn(
                f"LoR2C {kind}: no optimizer knows the {len(added)} new parameters ({listed}); "
                f"they will not train. Pass optimizer= to {kind}(), call "
                f"handle.attach_optimizer(opt) once, or add edit.added to your optimizer (and "
                f"drop edit.removed); pass optimizer=False if you build the optimizer after the "
                f"edits.",
                UntrainedParametersWarning,
                stacklevel=3,
            )
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
        check_optimizer(optimizer)
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
        if self.container.handle is self:
            self.container.handle = None
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self.removed = True
        self._optimizer = None
        return self.model

    def __repr__(self) -> str:
        return (
            f"LoR2CHandle(spans={self.spans}, share={self.config.share}, "
            f"injected={sorted(self.injected)}, removed={self.removed})"
        )
