"""Argument checks: each error names the argument and what was expected.

The tensor checks serve the ops. The checks of module and configuration arguments (at the end)
serve the nn.Module front ends, LoR2CConfig and IMLoR2CSchedule: those raise ValueError for any
bad value, of the wrong kind or out of range, and refuse bools where numbers are expected.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(value, name: str, dim: int | None = None, min_dim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(value.shape)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(
            f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(value.shape)}"
        )
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16 "
            f"or float64), got {_name(value.dtype)}"
        )


def same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(
                f"{name}: expected a tensor on {first} (as {first_name}), got {device};"
                " nothing is copied between devices implicitly"
            )


def same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise ValueError(
            f"{b_name}: expected dtype {_name(a.dtype)} (as {a_name}), got {_name(b.dtype)}"
        )


def weight_dtype(weight: torch.Tensor, name: str, activation: torch.dtype) -> None:
    if weight.dtype not in (activation, torch.float32):
        raise ValueError(
            f"{name}: expected dtype {_name(activation)} (as the activations) or "
            f"float32 (mixed precision), got {_name(weight.dtype)}"
        )


# --- module and configuration arguments ------------------------------------------------------


def _or_none(allow_none: bool) -> str:
    return " or None" if allow_none else ""


def positive_int(value, name: str, allow_none: bool = False):
    """`value` (an int >= 1, not a bool), or None when allowed; else a ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{_or_none(allow_none)}, got {value!r}")
    return value


def positive_ints(**named) -> None:
    """positive_int for each keyword: positive_ints(in_features=d_in, r=r)."""
    for name, value in named.items():
        positive_int(value, name)


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return value


def int_in_range(value, name: str, low: int, high: int, what: str = "") -> int:
    """`value` as an int in low..high; `what` says where the bound comes from."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int in {low}..{high}{what}, got {value!r}")
    return value


def finite_number(value, name: str, allow_none: bool = False):
    """A finite real number (not a bool), or None when allowed; Python ints and floats come back
    as they are, other reals (NumPy scalars) as floats."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number{_or_none(allow_none)}, got {value!r}")
    return value if isinstance(value, (int, float)) else float(value)


def floating_dtype(value, name: str) -> torch.dtype:
    """The floating torch dtype named `value` ("float32", "bfloat16", ...)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype name, got {value!r}")
    return dtype


def dropout_probability(value, name: str = "dropout") -> float:
    """A module's dropout probability, as a float in [0, 1)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) < 1.0
    ):
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)
