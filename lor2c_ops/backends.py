"""Backends: what each one supports, and a dispatcher that says why a backend refused.

Every backend answers two questions: is it usable on this machine at all (`unavailable`), and
can it run these particular inputs (`refuses`). Both return None for yes, or the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _ext

NAMES = ("reference", "cpu", "triton", "cuda")
_COMPILED = {"cpu": "CPU", "cuda": "CUDA"}  # backends served by the extension: dispatch key
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)

# Fastest first, per device type; the reference backend runs anywhere and closes each list.
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_interpreting() -> bool:
    """Triton runs kernels on CPU tensors only in its interpreter, chosen at kernel definition."""
    from .triton import INTERPRET

    return INTERPRET


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple
    unavailable: Callable[[], Optional[str]]
    device_refusal: Callable[[torch.device], Optional[str]]

    def refuses(
        self, device: torch.device, dtype: torch.dtype, op: Optional[str] = None
    ) -> Optional[str]:
        """Why this backend cannot run `op` ("lor2c", "lor2c_multi", ...) on these inputs."""
        reason = self.unavailable()
        if reason is None:
            reason = self.device_refusal(device)
        if reason is None and op is not None and self.name in _COMPILED:
            # The extension registers lor2c_ops_ext::<op>_fwd / _bwd per dispatch key; a build
            # from older sources may lack some (e.g. no CUDA lor2c_multi kernels): say which.
            key = _COMPILED[self.name]
            missing = [
                f"{op}_{part}"
                for part in ("fwd", "bwd")
                if not _ext.has_kernel(f"{op}_{part}", key)
            ]
            if missing:
                reason = (
                    f"the compiled extension has no {key} kernel for {op} "
                    f"(lor2c_ops_ext::{' and '.join(missing)}): rebuild it from these sources"
                )
        if reason is None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reason = f"it supports dtypes {names}, not {str(dtype).replace('torch.', '')}"
        return reason


def _cpu_device(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else f"it runs on CPU tensors, not {device.type}"


def _cuda_device(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else f"it runs on CUDA tensors, not {device.type}"


def _triton_device(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return (
            "it runs on CPU tensors only in the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing lor2c_ops"
        )
    return f"it runs on CUDA tensors, not {device.type}"


def _cpu_unavailable() -> Optional[str]:
    if not _ext.loaded():
        return _ext.LOAD_ERROR
    return None


def _cuda_unavailable() -> Optional[str]:
    if not _ext.loaded():
        return _ext.LOAD_ERROR
    if not _ext.has_kernel("lor2c_fwd", "CUDA"):
        if torch.version.cuda is None:
            return (
                "the extension was built without CUDA kernels (the installed torch is a CPU build)"
            )
        return "the extension was built without CUDA kernels (no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


BACKENDS = {
    "reference": Backend(
        "reference", _HALF_AND_FLOAT + (torch.float64,), lambda: None, lambda device: None
    ),
    "cpu": Backend("cpu", _HALF_AND_FLOAT, _cpu_unavailable, _cpu_device),
    "triton": Backend("triton", _HALF_AND_FLOAT, _triton_unavailable, _triton_device),
    "cuda": Backend("cuda", _HALF_AND_FLOAT, _cuda_unavailable, _cuda_device),
}


def select(
    backend: Optional[str], device: torch.device, dtype: torch.dtype, op: Optional[str] = None
) -> str:
    """The backend to run `op` on (device, dtype): `backend` if it can, else the fastest one."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(
                f"backend: expected one of {', '.join(NAMES)} or None, got {backend!r}"
            )
        reason = BACKENDS[backend].refuses(device, dtype, op)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
        return backend
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if BACKENDS[name].refuses(device, dtype, op) is None:
            return name
    return "reference"


def available(device_type: Optional[str] = None) -> dict:
    """{backend name: None if usable, else the reason}, for a device type or globally."""
    result = {}
    for name, b in BACKENDS.items():
        reason = b.unavailable()
        if reason is None and device_type is not None:
            reason = b.device_refusal(torch.device(device_type))
        result[name] = reason
    return result
