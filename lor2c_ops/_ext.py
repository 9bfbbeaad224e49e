"""Loads the compiled extension, lor2c_ops._C, if it was built; remembers why not otherwise.

Importing lor2c_ops never fails because of it: the backends that need it report the reason.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the lor2c_ops_ext:: kernels)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built (LOR2C_SKIP_EXT=1, or built for another torch)
    LOAD_ERROR = f"the compiled extension lor2c_ops._C is not available ({exc})"


def loaded() -> bool:
    return LOAD_ERROR is None


@torch.compiler.assume_constant_result  # fixed once the library is loaded: no graph break
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether lor2c_ops_ext::<op> has a kernel for dispatch_key ("CPU" or "CUDA")."""
    if not loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lor2c_ops_ext::{op}", dispatch_key)
