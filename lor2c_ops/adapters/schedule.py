"""IMLoR2C schedules (docs/math.md section 3.4): merges and injections every `interval` steps
or epochs, up to `max_merges` / `max_injections`, by default only in the first quarter of
training."""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import _checks as checks
from .handle import LoR2CHandle
from .optim import StructuralEdit


class IMLoR2CSchedule:
    """Drives handle.merge() / handle.inject() from a plain training loop.

        sched = IMLoR2CSchedule(handle, max_merges=2, max_injections=1, interval=10,
                                total=1000, optimizer=opt)
        for step in range(1000):
            ...; opt.step(); sched.step()          # or sched.epoch_end() with unit="epoch"

    At each event (every `interval` units, while `count <= total * window` when `total` is
    given) the schedule merges the adjacent pair with the smallest summed SFS (while merges are
    left), then injects the adapter with the largest SFS (while injections are left). max_merges
    = 0 is InjectLoR2C, max_injections = 0 is MergeLoR2C, both > 0 is IMLoR2C. The optimizer's
    param groups are updated at every edit. Edits that cannot happen (no mergeable pair, nothing
    injectable) are skipped.
    """

    def __init__(
        self,
        handle: LoR2CHandle,
        max_merges: int = 0,
        max_injections: int = 0,
        interval: int = 1,
        unit: str = "step",
        total: Optional[int] = None,
        window: float = 0.25,
        sfs_k: Optional[int] = None,
        optimizer=None,
    ):
        checks.non_negative_int(max_merges, "max_merges")
        checks.non_negative_int(max_injections, "max_injections")
        checks.positive_int(interval, "interval")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit: expected 'step' or 'epoch', got {unit!r}")
        if not 0.0 < float(window) <= 1.0:
            raise ValueError(f"window: expected a fraction in (0, 1], got {window!r}")
        self.handle, self.optimizer = handle, optimizer
        self.max_merges, self.max_injections = max_merges, max_injections
        self.interval, self.unit, self.total, self.window = interval, unit, total, float(window)
        self.sfs_k = sfs_k
        self.count = 0
        self.merges = self.injections = 0
        self.edits: List[StructuralEdit] = []

    def _due(self) -> bool:
        if self.count % self.interval:
            return False
        return self.total is None or self.count <= self.total * self.window

    def event(self) -> List[StructuralEdit]:
        """One merge and/or one injection now (within the limits)."""
        done = []
        h = self.handle
        if self.merges < self.max_merges and h.mergeable_pairs():
            done.append(h.merge(optimizer=self.optimizer, k=self.sfs_k))
            self.merges += 1
        if self.injections < self.max_injections and h.injectable():
            done.append(h.inject(optimizer=self.optimizer, k=self.sfs_k))
            self.injections += 1
        self.edits += done
        return done

    def _advance(self, unit: str) -> List[StructuralEdit]:
        if unit != self.unit:
            return []
        self.count += 1
        return self.event() if self._due() else []

    def step(self) -> List[StructuralEdit]:
        """Call after each optimizer step (counts when unit == "step")."""
        return self._advance("step")

    def epoch_end(self) -> List[StructuralEdit]:
        """Call at the end of each epoch (counts when unit == "epoch")."""
        return self._advance("epoch")

    def state_dict(self) -> dict:
        return {"count": self.count, "merges": self.merges, "injections": self.injections}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.merges, self.injections = (
            state["count"],
            state["merges"],
            state["injections"],
        )


def _unwrap_optimizer(optimizer):
    """The torch.optim.Optimizer inside the Trainer's (accelerate's AcceleratedOptimizer wraps it
    as `.optimizer`; its param_groups and state are the inner optimizer's)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def trainer_callback(schedule: IMLoR2CSchedule, infer_total: bool = True):
    """`schedule` as a transformers.TrainerCallback:

        sched = IMLoR2CSchedule(handle, max_merges=2, max_injections=1, interval=10)
        trainer = Trainer(model=model, ..., callbacks=[trainer_callback(sched)])

    Events run in on_step_end (unit "step": after the optimizer step, the scheduler step and
    zero_grad, so the next step trains the new parameters) or on_epoch_end (unit "epoch"). At
    each edit the Trainer's optimizer (unwrapped from accelerate's AcceleratedOptimizer) is
    updated in place: the removed parameters and their state leave it, the new ones join the
    param group the removed ones were in (so they keep its learning rate and weight decay, and
    the LR scheduler drives them). With unit "step" the schedule counts the Trainer's global
    steps. With `infer_total` and no `schedule.total`, the total is the Trainer's max_steps (or
    number of epochs), so events happen in the first `window` (a quarter) of training.

    Structural edits under a multi-process Trainer (DDP/FSDP) are refused: the wrapper would not
    know the new parameters and their gradients would not be synchronised.
    """
    from transformers import TrainerCallback

    class IMLoR2CCallback(TrainerCallback):
        def __init__(self):
            self.schedule = schedule

        def _attach(self, optimizer):
            inner = _unwrap_optimizer(optimizer)
            if inner is not None:
                schedule.optimizer = inner

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if (schedule.max_merges or schedule.max_injections) and args.world_size > 1:
                raise RuntimeError(
                    f"IMLoR2C schedule: structural edits (max_merges={schedule.max_merges}, "
                    f"max_injections={schedule.max_injections}) are not supported with "
                    f"{args.world_size} processes: the DDP/FSDP wrapper would not see the new "
                    f"parameters; run the schedule in a single process"
                )
            if infer_total and schedule.total is None:
                total = state.max_steps if schedule.unit == "step" else state.num_train_epochs
                if total:
                    schedule.total = int(total)
            self._attach(optimizer)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if schedule.unit != "step":
                return
            self._attach(optimizer)
            schedule.count = state.global_step - 1  # step() counts this one
            schedule.step()

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            if schedule.unit != "epoch":
                return
            self._attach(optimizer)
            schedule.epoch_end()

    return IMLoR2CCallback()
