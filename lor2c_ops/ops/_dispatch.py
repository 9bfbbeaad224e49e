"""Which kernels a backend name stands for, shared by every op's registration file.

A backend implements an op by providing the functions of that op's kernel interface (the
`Protocol` classes below); `ref/<op>.py`, `triton/<op>.py` and the op file's wrapper of the
compiled extension (`_Compiled`) each satisfy it.
"""

from __future__ import annotations

import importlib
from typing import Protocol

_CACHE: dict = {}


class LoR2CKernels(Protocol):
    def forward(self, x, layer_out, A, B, scale, p, seed): ...

    def backward(self, grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB): ...

    def multi_forward(self, x, layer_out, A_bank, B_bank, ids, scale, p, seed): ...

    def multi_backward(
        self, grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB
    ): ...


class DCFTKernels(Protocol):
    def forward(self, x, weight, bias, A, B, C, scale, stride, p, seed): ...

    def backward(
        self,
        grad,
        x,
        t,
        weight,
        A,
        B,
        C,
        scale,
        stride,
        p,
        seed,
        need_dx,
        need_dA,
        need_dB,
        need_dC,
    ): ...


def kernels(backend: str, op: str, compiled):
    """The module (or class) with the kernel functions of `op` on `backend`, looked up once.

    "reference" and "triton" are lor2c_ops.ref.<op> and lor2c_ops.triton.<op> (imported on first
    use: triton is optional); "cpu" and "cuda" are `compiled`, the op's wrappers of the
    extension's kernels, whose dispatcher picks the device.
    """
    key = (backend, op)
    found = _CACHE.get(key)
    if found is None:
        if backend in ("reference", "triton"):
            package = "ref" if backend == "reference" else "triton"
            found = importlib.import_module(f"lor2c_ops.{package}.{op}")
        else:
            found = compiled
        _CACHE[key] = found
    return found
