"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

import math

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
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape "
                         f"{tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating-point tensor (float32, float16, bfloat16 "
                         f"or float64), got {_name(value.dtype)}")


def same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: expected a tensor on {first} (as {first_name}), got {device};"
                             " nothing is copied between devices implicitly")


def same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{b_name}: expected dtype {_name(a.dtype)} (as {a_name}), got "
                         f"{_name(b.dtype)}")


def weight_dtype(weight: torch.Tensor, name: str, activation: torch.dtype) -> None:
    if weight.dtype not in (activation, torch.float32):
        raise ValueError(f"{name}: expected dtype {_name(activation)} (as the activations) or "
                         f"float32 (mixed precision), got {_name(weight.dtype)}")


def probability(p, name: str) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float in [0, 1), got {p!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    return value


def finite(value, name: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{name}: expected a finite number, got {result}")
    return result
