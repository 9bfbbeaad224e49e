"""Philox4x32-10 and the dropout mask in plain PyTorch (int64 arithmetic emulating uint32).

Same function as csrc/philox.h and lor2c_ops/triton/philox.py; see csrc/philox.h for the mask
convention every backend follows.
"""
from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a*b can reach 2^64, past int64: split a into 16-bit halves so every partial fits.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    partial = a_lo * b
    hi = (a_hi * b + (partial >> 16)) >> 16
    lo = (a * b) & _MASK32  # wraps in int64, but the low 32 bits are exact
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, key0: int, key1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns four such tensors."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ key0), lo1, (hi0 ^ c3 ^ key1), lo0
        key0 = (key0 + _W0) & _MASK32
        key1 = (key1 + _W1) & _MASK32
    return c0, c1, c2, c3


def split_seed(seed: torch.Tensor) -> tuple[int, int, int, int]:
    """(key0, key1, off0, off1) from the op's int64[2] seed tensor (seed, offset)."""
    s, o = (int(v) for v in seed.detach().cpu().tolist())
    return s & _MASK32, (s >> 32) & _MASK32, o & _MASK32, (o >> 32) & _MASK32


def dropout_threshold(p: float) -> int:
    """Draws (uint32) at or above this value keep their element."""
    return min(int(p * 4294967296.0), _MASK32)


def dropout_mask(seed: torch.Tensor, n: int, d: int, p: float, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """The (n, d) dropout multiplier (0 or 1/(1-p)) for seed, as every backend draws it."""
    device = device if device is not None else seed.device
    if p == 0.0:
        return torch.ones(n, d, device=device, dtype=dtype)
    key0, key1, off0, off1 = split_seed(seed)
    rows = torch.arange(n, device=device, dtype=torch.int64)[:, None]
    cols = torch.arange(d, device=device, dtype=torch.int64)[None, :]
    c0 = (cols >> 2).expand(n, d)
    c1 = rows.expand(n, d)
    zero = torch.zeros((n, d), device=device, dtype=torch.int64)
    outs = philox4x32_10(c0, c1, zero + off0, zero + off1, key0, key1)
    lane = (cols & 3).expand(n, d)
    draw = torch.where(lane == 0, outs[0], torch.where(lane == 1, outs[1],
                       torch.where(lane == 2, outs[2], outs[3])))
    keep = draw >= dropout_threshold(p)
    return keep.to(dtype) * (1.0 / (1.0 - p))
