"""Which kernels a backend name stands for, shared by every op's registration file."""
from __future__ import annotations

import importlib


def kernels(backend: str, op: str, compiled):
    """The module (or class) with the forward/backward functions of `op` on `backend`.

    "reference" and "triton" are lor2c_ops.ref.<op> and lor2c_ops.triton.<op> (imported on first
    use: triton is optional); "cpu" and "cuda" are `compiled`, the op's wrappers of the
    extension's kernels, whose dispatcher picks the device.
    """
    if backend in ("reference", "triton"):
        package = "ref" if backend == "reference" else "triton"
        return importlib.import_module(f"lor2c_ops.{package}.{op}")
    return compiled
