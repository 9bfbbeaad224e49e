"""What every op's public function does before its kernels run, in one place.

The eager path is kept cheap on the host: checks are plain attribute reads and comparisons,
the backend choice is cached per (backend, device, dtype, op), the zero seed of a call without
dropout is one cached tensor per device, and nothing here synchronises with the device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends

ROW_LIMIT = 2**32  # rows are indexed with 32-bit counters in the dropout mask (csrc/philox.h)

NO_FORWARD_AD = (
    "{op}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not "
    "implemented; use reverse mode (backward, torch.autograd.grad)"
)

_ZERO_SEEDS: dict = {}
_SELECTED: dict = {}
_FAST_ALLOWED: set = set()


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(seed, offset) for one call's dropout mask, drawn from `generator` or the default one.

    With generator=None the default generator of x's device is used (torch.manual_seed seeds
    it; on CUDA it is drawn on the device, so the call can be captured in a CUDA graph and each
    replay draws a fresh mask); a CPU generator with CUDA inputs gives the same mask as with
    CPU inputs.
    """
    if generator is None:
        return torch.randint(2**62, (2,), dtype=torch.int64, device=device)
    seed = torch.randint(
        2**62, (2,), dtype=torch.int64, device=generator.device, generator=generator
    )
    return seed.to(device)


def zero_seed(device: torch.device) -> Tensor:
    """The seed of a call without dropout (never read by the kernels): one tensor per device."""
    seed = _ZERO_SEEDS.get(device)
    if seed is None or torch.compiler.is_compiling():
        if torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        ):
            return torch.zeros(2, dtype=torch.int64, device=device)  # not kept: a graph's pool
        seed = _ZERO_SEEDS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return seed


def seed_for(p: float, generator, device: torch.device) -> Tensor:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator or None, got {type(generator).__name__}"
        )
    return draw_seed(generator, device) if p > 0.0 else zero_seed(device)


def select(backend: Optional[str], device: torch.device, dtype: torch.dtype, op: str) -> str:
    """backends.select, cached: what can run does not change while the process lives. A choice
    of the cpu backend for CPU tensors also allows the extension's fast entry for it (FAST)."""
    key = (backend, device.type, dtype, op)
    name = _SELECTED.get(key)
    if name is None:
        name = backends.select(backend, device, dtype, op=op)
        _SELECTED[key] = name
    if name == "cpu" and key not in _FAST_ALLOWED and not torch.compiler.is_compiling():
        # (not while torch.compile traces: it cannot call the extension). Remembered only once
        # told: a choice made while FAST is None (tests) is told again when it is back.
        if _allow_fast(backend, dtype, op):
            _FAST_ALLOWED.add(key)
    return name


# --- the fast entry ------------------------------------------------------------------------------
#
# lor2c_residual and dcft_linear first offer their arguments to the extension's fast entry
# (csrc/fast_entry.cpp: lor2c_ops._C._lor2c / _dcft), which runs the op's C++ autograd node
# straight away when every argument is of the common kind and Python has already chosen the cpu
# backend for (backend argument, dtype, op), and returns None otherwise: the Python path then runs
# as it always did (checks that raise naming the bad argument, everything else). FAST is the
# extension module, or None where it lacks the entry (a build from older sources, or no
# extension); tests set it to None to exercise the Python path alone.

_FAST_OPS = {"lor2c": 0, "lor2c_multi": 1, "dcft": 2}  # csrc/fast_entry.cpp enum Op
_FAST_AUTOGRAD = {"lor2c": "lor2c", "lor2c_multi": "lor2c", "dcft": "dcft"}
_FAST_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fast_module():
    from .. import _ext

    if not _ext.loaded():
        return None
    module = _ext._C
    return module if hasattr(module, "_lor2c") and hasattr(module, "_fast_allow") else None


FAST = _fast_module()


def _allow_fast(backend: Optional[str], dtype: torch.dtype, op: str) -> bool:
    """Tell the fast entry that Python chose the cpu backend for (backend argument, dtype, op) on
    CPU tensors (name == "cpu" implies CPU tensors: it refuses every other device), and from
    which rank it must leave calls without dropout to Python (see expression_rank). Whether it
    was told."""
    if (
        FAST is None
        or backend not in (None, "cpu")
        or dtype not in _FAST_DTYPES
        or op not in _FAST_OPS
        or not compiled_autograd(_FAST_AUTOGRAD[op])
    ):
        return False
    FAST._fast_allow(
        backend, _FAST_DTYPES[dtype], _FAST_OPS[op], expression_rank(backend, dtype, op)
    )
    return True


def expression_rank(backend: Optional[str], dtype: torch.dtype, op: str) -> Optional[int]:
    """The rank from which lor2c_residual may run a call without dropout (weights in the
    activations' dtype) as the plain expression rather than the cpu backend, or None: where
    ops/lor2c.py applies backends.cpu_loses_to_eager (backend=None, one adapter), the rank from
    which that rule fires for this dtype. The fast entry declines those calls."""
    if backend is None and op == "lor2c":
        return backends.expression_min_rank(dtype)
    return None


def rows(t: Tensor, width: int) -> Tensor:
    """t as (n, width) with unit column stride: a view whenever the layout allows one."""
    t2 = t if t.dim() == 2 else t.reshape(-1, width)
    if t2.shape[0] > 1 and width > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def check_rows(x: Tensor, d_in: int) -> None:
    n = x.numel() // max(d_in, 1)
    if n >= ROW_LIMIT:
        raise ValueError(f"x: at most 2^32 - 1 rows are supported, got {n}")


def scale_value(scale, name: str = "scale"):
    """A Python number (or, while torch.compile traces, a symbolic one); tensors that need a
    gradient are refused rather than silently detached."""
    if isinstance(scale, Tensor):
        if scale.requires_grad:
            raise TypeError(
                f"{name}: a tensor that requires grad is not supported (its gradient "
                f"would be lost); pass a Python float"
            )
        if scale.numel() != 1:
            raise ValueError(
                f"{name}: expected a number, got a tensor of shape {tuple(scale.shape)}"
            )
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name}: expected a real number, got {scale!r}")
    if isinstance(scale, (int, float)) and not torch.compiler.is_compiling():
        # (while torch.compile traces, a Python float may be a symbolic value: not checked here)
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"{name}: expected a finite number, got {scale}")
    return scale


def probability(p, name: str) -> float:
    if isinstance(p, (torch.SymFloat, torch.SymInt)) or (
        torch.compiler.is_compiling() and isinstance(p, float)
    ):
        return p
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {p!r}")
    value = float(p)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    return value


def eager_path(device: torch.device) -> bool:
    """Whether to run the kernels through the cheap autograd nodes rather than the library
    ops (which torch.compile traces, and whose fake kernels give meta outputs)."""
    return device.type != "meta" and not torch.compiler.is_compiling()


def no_autocast(device: torch.device, enabled: bool):
    """Autocast off around the kernels (they pick their own precision) when it was on."""
    if enabled:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


COMPILED = ("cpu", "cuda")  # the backends served by the compiled extension
_AUTOGRAD_OPS: dict = {}


def compiled_autograd(op: str) -> bool:
    """Whether the extension has lor2c_ops_ext::<op>, the C++ autograd op of the eager path
    (a build from older sources may not)."""
    found = _AUTOGRAD_OPS.get(op)
    if found is None:
        from .. import _ext

        try:
            found = _ext.has_kernel(op, "Autograd")
        except RuntimeError:  # no such op in this build
            found = False
        _AUTOGRAD_OPS[op] = found
    return found


def refuse_forward_ad(*tensors, op: str) -> None:
    """The C++ autograd node has no forward-mode formula: refuse dual tensors clearly."""
    if torch.autograd.forward_ad._current_level >= 0 and any(
        torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise NotImplementedError(NO_FORWARD_AD.format(op=op))


def refuse_functorch(op: str) -> None:
    """torch.func transforms (grad, vjp, jvp, vmap, ...) are not supported: say so, rather than
    fail deep inside (or, for jvp through a library op, return zero tangents)."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            f"{op}: torch.func transforms (grad, vjp, jvp, vmap, ...) are not supported; use "
            f"torch.autograd (backward, torch.autograd.grad). Forward-mode AD is not implemented"
        )


def none_grads(count: int) -> tuple:
    return (None,) * count
