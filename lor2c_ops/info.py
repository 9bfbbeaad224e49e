"""`python -m lor2c_ops.info`: versions, and which backends run here and why the others do not."""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from . import __version__, _ext, backends


def report() -> str:
    lines = [
        f"lor2c_ops {__version__}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"python {platform.python_version()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    for device_type in device_types:
        lines.append(
            f"\nbackends for {device_type} tensors "
            f"(default: {backends.select(None, torch.device(device_type), torch.float32)}):"
        )
        for name, reason in backends.available(device_type).items():
            lines.append(
                f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}"
            )
        if device_type == "cpu":
            lines.append(f"  cpu kernels' instruction-set path: {cpu_isa_line()}")
            blas = backends.cpu_blas()
            lines.append(
                "  cpu blocked plan's BLAS: "
                + ("found (torch's sgemm)" if blas is None else "none: " + blas)
            )
            bf16 = backends.cpu_bf16_kernels()
            lines.append(
                "  cpu bf16 products: "
                + (
                    "bf16 kernels (AVX512-BF16, fp32 sums; LOR2C_CPU_BF16_DOT=0 turns them off)"
                    if bf16 is None
                    else "widened to fp32 (" + bf16 + ")"
                )
            )
            lines.append(f"  backend=None sends to the eager expression: {eager_rule_line()}")
        else:
            lines.append(f"  cuda kernels' rank products: {cuda_mma_line()}")
    return "\n".join(lines)


def eager_rule_line() -> str:
    """Which plain CPU calls lor2c_residual(backend=None) runs as the eager expression on this
    CPU, per dtype (backends.expression_min_rank, the rule's one source)."""
    rules = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        start = backends.expression_min_rank(dtype)
        if start is not None:
            name = str(dtype).removeprefix("torch.")
            rules.append(
                f"{name} calls without dropout from rank {start} "
                f"({backends.cpu_loses_to_eager(start, dtype, 0.0)})"
            )
    return "; ".join(rules) if rules else "nothing (the cpu backend is faster at every rank here)"


def cuda_mma_line() -> str:
    """Which rank-product kernels the cuda backend runs for fp16/bf16 activations: the C++
    launchers read LOR2C_CUDA_MMA once, at their first call (csrc/cuda/lor2c_kernels.h)."""
    if os.environ.get("LOR2C_CUDA_MMA", "") == "1":
        return (
            "tensor cores for fp16/bf16 (LOR2C_CUDA_MMA=1; these kernels have not yet been "
            "verified on a GPU: csrc/cuda/README.md)"
        )
    return "CUDA cores (the default; LOR2C_CUDA_MMA=1 selects the tensor-core kernels)"


def cpu_isa() -> tuple[Optional[str], list[str], Optional[str]]:
    """(path in use, paths this CPU runs widest first, error) of the compiled CPU kernels
    (csrc/cpu/isa.h): the path is the widest the CPU runs unless LOR2C_CPU_ISA, read when the
    extension loads, forces a narrower one; (None, [], reason) where it cannot be said."""
    if not _ext.loaded():
        return None, [], _ext.LOAD_ERROR
    ops = torch.ops.lor2c_ops_ext
    if not hasattr(ops, "cpu_isa"):
        return None, [], "the compiled extension predates cpu_isa(): rebuild it from these sources"
    runnable = list(ops.cpu_isa_runnable())
    try:
        return ops.cpu_isa(), runnable, None
    except RuntimeError as exc:  # LOR2C_CPU_ISA invalid, or asking for more than the CPU runs
        return None, runnable, str(exc).splitlines()[0]


def cpu_isa_line() -> str:
    path, runnable, error = cpu_isa()
    if path is None:
        return f"unknown: {error}"
    forced = os.environ.get("LOR2C_CPU_ISA", "")
    how = (
        f"forced by LOR2C_CPU_ISA={forced}"
        if forced and forced.lower() != "auto"
        else "the widest this CPU runs"
    )
    return f"{path} ({how}; this CPU runs {', '.join(runnable)}; LOR2C_CPU_ISA=<path> forces one)"


if __name__ == "__main__":
    print(report())
