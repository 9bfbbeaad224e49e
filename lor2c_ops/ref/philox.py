"""Philox4x32-10 and the dropout mask in plain PyTorch (int64 arithmetic emulating uint32).

Same function as csrc/philox.h and lor2c_ops/triton/philox.py; see csrc/philox.h for the mask
convention every backend follows (one call per 8 columns, 16-bit draws).
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
    """floor(p * 65536), at most 65535: 16-bit draws at or above it keep their element.

    The one Python definition (the Triton launchers import it); csrc/philox.h has the C++ one.
    """
    if not p > 0.0:
        return 0
    return min(int(p * 65536.0), 0xFFFF)  # p * 2^16 is exact; int() is floor for p >= 0


def dropout_draws(seed: torch.Tensor, n: int, d: int, device=None) -> torch.Tensor:
    """The (n, d) 16-bit draws (int64) of the mask convention: one Philox call per 8 columns."""
    device = device if device is not None else seed.device
    key0, key1, off0, off1 = split_seed(seed)
    groups = (d + 7) // 8
    rows = torch.arange(n, device=device, dtype=torch.int64)[:, None].expand(n, groups)
    cols = torch.arange(groups, device=device, dtype=torch.int64)[None, :].expand(n, groups)
    zero = torch.zeros((n, groups), device=device, dtype=torch.int64)
    words = philox4x32_10(cols, rows, zero + off0, zero + off1, key0, key1)
    # column 8g + 2w + h <- half h (low 16 bits first) of word w of counter g
    halves = [part for w in words for part in (w & 0xFFFF, w >> 16)]
    return torch.stack(halves, dim=-1).reshape(n, groups * 8)[:, :d]


def dropout_mask(
    seed: torch.Tensor, n: int, d: int, p: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """The (n, d) dropout multiplier (0 or 1/(1-p)) for seed, as every backend draws it."""
    device = device if device is not None else seed.device
    if p == 0.0:
        return torch.ones(n, d, device=device, dtype=dtype)
    keep = dropout_draws(seed, n, d, device) >= dropout_threshold(p)
    return keep.to(dtype) * (1.0 / (1.0 - p))
