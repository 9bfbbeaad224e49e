"""IMLoR2C schedules (DESIGN.md 2.3): merges and injections every `interval` steps or epochs,
up to `max_merges` / `max_injections`, by default only in the first quarter of training."""
from __future__ import annotations

from typing import List, Optional

from .apply import LoR2CHandle
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

    def __init__(self, handle: LoR2CHandle, max_merges: int = 0, max_injections: int = 0,
                 interval: int = 1, unit: str = "step", total: Optional[int] = None,
                 window: float = 0.25, sfs_k: Optional[int] = None, optimizer=None):
        for name, v in (("max_merges", max_merges), ("max_injections", max_injections)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval: expected a positive int, got {interval!r}")
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
        self.count, self.merges, self.injections = (state["count"], state["merges"],
                                                    state["injections"])


def trainer_callback(schedule: IMLoR2CSchedule):
    """A transformers.TrainerCallback running `schedule` inside a Trainer (the Trainer's optimizer
    is updated at each edit). Untested against transformers.Trainer so far."""
    from transformers import TrainerCallback

    class IMLoR2CCallback(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                schedule.optimizer = getattr(optimizer, "optimizer", optimizer)
            schedule.step()

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                schedule.optimizer = getattr(optimizer, "optimizer", optimizer)
            schedule.epoch_end()

    return IMLoR2CCallback()
