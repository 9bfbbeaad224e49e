"""Backends: what each one supports, and a dispatcher that says why a backend refused.

Every backend answers two questions: is it usable on this machine at all (`unavailable`), and
can it run these particular inputs (`refuses`). Both return None for yes, or the reason.
"""

from __future__ import annotations

import functools
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


# Triton 3.0 and 3.1 (torch 2.4, 2.5) crash (a segmentation fault in their TTGIR passes) compiling
# the backward kernel `_grad_pass` for sm_90; they compile everything for sm_80. 3.2 and later
# compile all kernels for sm_90 (scripts/check_triton_compile.py, run with each: docs/verified.md
# 2.10). So the triton backend refuses Hopper and newer GPUs under an older Triton.
TRITON_MIN_FOR_SM90 = (3, 2)


def triton_refuses_capability(capability: tuple) -> Optional[str]:
    """Why the installed Triton cannot compile these kernels for a GPU of this compute
    capability, or None."""
    import triton
    from torch.torch_version import TorchVersion  # compares "3.2.0+git..." with a tuple

    if tuple(capability) >= (9, 0) and TorchVersion(triton.__version__) < TRITON_MIN_FOR_SM90:
        need = ".".join(map(str, TRITON_MIN_FOR_SM90))
        return (
            f"Triton {triton.__version__} crashes compiling its backward kernel for "
            f"sm_{capability[0]}{capability[1]} (fixed in Triton {need}, which torch 2.6 and "
            f"later ship): upgrade triton, or use backend='cuda'"
        )
    return None


@functools.lru_cache(maxsize=None)
def _triton_cuda_device(index: int) -> Optional[str]:
    return triton_refuses_capability(torch.cuda.get_device_capability(index))


def _triton_device(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _triton_cuda_device(index)
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


# ---- The cpu backend against the eager expression, per shape (issue 15 item 2) ----------------
#
# Forward+backward, fp32 unless said, medians of round-robin runs on the 2-core dev machine (AMD
# EPYC Zen 4 with AVX-512 and AVX512-BF16, 2 threads, shared: load 1.5 during the runs), after
# the register-tiled kernels (csrc/cpu/rank_products.cpp). "fused" is the single-pass kernel,
# "gemm" the cpu backend's GEMM path (ATen's fp32 matrix products with the same mask and saved
# t), each against eager timed in the same process; x = eager / backend, < 1 loses:
#
#   d_in=d_out  r    n=1    n=2    n=4    n=8   n=16   n=32   n=64  n=128  n=256  n=512
#   768         8  fused  0.85   1.01   1.03   1.05   1.12   1.17   1.46   1.79   2.60   2.08
#                  gemm   0.78   0.81   0.82   0.83   0.86   0.90   0.97   1.02   1.04   1.05
#   768        64  fused  0.61   0.80   0.82   0.83   0.85   0.81   0.96   1.02   1.09   1.19
#                  gemm   0.79   0.84   0.83   0.84   0.86   0.91   0.95   0.99   1.08   1.27
#   4096        8  fused  0.70   0.91   0.98   1.01   1.19   1.58   2.15   2.27   2.96   3.11
#                  gemm   0.83   0.85   0.89   0.93   0.96   1.03   1.06   1.05   1.36   1.30
#   4096       64  fused  0.28   0.42   0.48   0.50   0.49   0.59   0.79   0.98   1.13   1.30
#                  gemm   0.89   0.91   0.95   0.93   0.84   1.03   1.09   0.99   1.14   1.29
#
# (At n = 8192: x1.45 at r=64 d=768, x1.9-2.5 at r=16, x2.4-7 at r=8; bench_lor2c.py.)
# Re-measured at the large shapes on the same machine (commit 1a20913, load 3-8), fp32,
# AVX-512 and forced AVX2, one thread, CPU time of the thread (README, "CPU figures on a 2-core
# AMD EPYC"): p=0 x1.47-2.46 at r=16, x4.0-5.5 at r=8, x1.07-1.61 at r=64 (lowest: n=2048
# d=4096 r=64, x1.07 / x1.09); p=0.1 x1.6-6.0. Two threads, bench_lor2c.py: x1.8-7.8. So no
# large fp32 shape loses, and (below) no small one does any more: the rule has no fp32 case.
# So the cpu backend itself takes the GEMM path for one row and for fewer rows than the rank from
# rank 32 on, the blocked plan (BLAS products on blocks of rows in one pass) on the baseline
# instruction-set path from rank 16 on (the GEMM path where no BLAS is found) and on the AVX2 path
# from rank 64 on (csrc/cpu/lor2c.cpp
# plan_for, with the blocked plan's figures; cpu_plan below says which). The baseline rule is from
# issue 15's second pass (the GEMM plan then; after the prefetching kernels, commit b93f48d), one
# thread, CPU time, fused vs eager, n=8192 d=768 r=16 / r=64 and n=2048 d=4096 r=16 / r=64, p=0:
# AVX-512 2.43x / 1.48x / 2.11x / 1.29x, forced AVX2 2.17x / 1.28x / 2.99x / 1.43x; forced baseline
# (SSE2, against eager's products on AVX-512) 0.99x / 0.52x / 0.77x / 0.39x (p=0.1: 1.06x / 0.67x /
# 1.38x / 0.75x), while r <= 8 wins there (d=1024 r=8 3.9x, d=768 r=4 4.1x); the baseline path's
# GEMM plan: 1.07-1.57x eager at the same shapes (p=0 and 0.1; n=2048 d=768 r=16 p=0.1: 0.94x,
# within the noise of this shared machine). What still loses after that, and where no other backend
# helps (the reference backend is slower still: 0.21 ms at n=1 d=768 r=8 against eager's 0.10,
# 138 ms against 41 at n=8192 r=64 bf16):
#
#  - (no longer) host-bound calls: a few rows at any rank, and fewer than about 2r rows from rank
#    32 on, lost 0.6-0.95x (above) to the op layer's host time per call. Since the hand-written
#    autograd nodes and the fast entry (issue 10, commit 22be05b) the cpu backend wins there too:
#    fwd+bwd through torch.autograd.grad, fp32, one thread, p=0, eager / fused (backend="cpu"),
#    commit 26ac9ae, load 1.2: n=1 d=64 r=4 1.53x, n=4 d=64 r=4 2.36x, n=4 d=768 r=16 1.56x, n=8
#    d=768 r=64 1.27x, n=64 d=768 r=32 1.26x, n=64 d=768 r=64 1.10x, n=128 d=768 r=64 1.11x,
#    n=32 d=4096 r=64 1.06x, n=128 d=4096 r=64 1.00x. So the rule no longer has that case;
#  - bfloat16 at rank >= 32 without dropout, on a CPU with AVX512-BF16 (or AMX): the expression's
#    bf16 matrix products (oneDNN) run at twice the rate of the kernel's fp32 multiply-adds.
#    n=8192 d=768, eager / fused: r=8 1.0-1.5, r=16 1.0-1.2, r=32 0.8-1.0, r=64 0.59 (19 vs
#    32 ms; the GEMM path in bf16 reached 0.75); with p=0.1 the fused kernel wins (x1.7 at
#    r=64: the expression's dropout costs more). On CPUs without bf16 products eager bf16 is
#    slow (float16 everywhere: x25 at r=64).
#    With the bf16 product kernels (vdpbf16ps in the register tiles, csrc/cpu/bf16_products.h;
#    2 threads, n=8192 d=768, bench_lor2c.py, eager / fused, p=0 | p=0.1): r=16 1.24x | 4.64x,
#    r=32 1.16x | 3.59x, r=64 0.96x | 3.09x (fp32 kernels: 1.10x | 3.79x, -, 0.63x | 1.77x). So
#    from rank 64 where they run, from rank 32 where they do not (LOR2C_CPU_BF16_DOT=0, a forced
#    AVX2 or baseline path). Since the bf16 kernels prefetch their rows (commit 11cdcec): r=16
#    1.80x, r=32 1.33x, r=64 1.10-1.15x, r=96 0.91-1.28x, r=128 0.86-0.95x, so from rank 96
#    where they run (_BF16_KERNELS_MIN_RANK).
#
# cpu_loses_to_eager() states these (it takes what they depend on: rank, dtype and p; the cached
# select() does not see ranks). lor2c_residual with backend=None runs the plain expression where
# it fires without dropout (ops/lor2c.py); with dropout the fused kernel stays.
# expression_min_rank() is the one place the rule's constants are written: cpu_loses_to_eager
# reads it, and so does the extension's fast entry, told through ops/_common.py _allow_fast
# (csrc/fast_entry.cpp declines the calls the rule may cover, so that Python applies it).


def cpu_plan(n: int, r: int, adapters: Optional[int] = None) -> str:
    """How the cpu backend runs a plain LoR2C call of n rows and rank r: "fused" (the single-pass
    kernel), "blocked" (the same single pass over blocks of 128 rows whose rank products are BLAS
    calls) or "gemm" (ATen's matrix products, same contract), for the instruction-set path in use
    (the blocked plan from rank 16 on on the baseline path, from rank 64 on on the AVX2 path;
    without a BLAS in the process the GEMM plan on the baseline path, the fused one on AVX2).
    LOR2C_CPU_PLAN=fused|blocked|gemm, read when the extension loads, forces one (tests,
    measurements). With `adapters` (G), a multi-adapter batch of n rows over G adapters:
    "blocked" on the baseline path from rank 16 with 16 rows per adapter or more, else
    "fused" (csrc/cpu/lor2c.cpp multi_plan_for)."""
    if not _ext.loaded():
        return "unavailable"
    if adapters is not None:
        return torch.ops.lor2c_ops_ext.cpu_lor2c_multi_plan(n, adapters, r)
    return torch.ops.lor2c_ops_ext.cpu_lor2c_plan(n, r)


def cpu_blas() -> Optional[str]:
    """None where the cpu backend's blocked plan has a BLAS (torch's own, found in the process),
    else why not; "unavailable" without the compiled extension."""
    if not _ext.loaded():
        return "unavailable: the compiled extension is not loaded"
    return torch.ops.lor2c_ops_ext.cpu_blas_missing() or None


def cpu_bf16_kernels() -> Optional[str]:
    """None where bfloat16 calls (bf16 weights too) run the cpu backend's bf16 product kernels
    (AVX512-BF16: products in bf16, sums in fp32; csrc/cpu/bf16_products.h), else why they run
    the fp32 kernels: the AVX-512 path not in use, a CPU without AVX512-BF16, or
    LOR2C_CPU_BF16_DOT=0 (read once)."""
    if not _ext.loaded():
        return "unavailable: the compiled extension is not loaded"
    if not _BF16_KERNELS:  # fixed for the process (read once in C++): asked once, not per call
        ops = torch.ops.lor2c_ops_ext
        if not hasattr(ops, "cpu_bf16_dot_missing"):
            return "the compiled extension predates the bf16 kernels: rebuild it from these sources"
        _BF16_KERNELS.append(ops.cpu_bf16_dot_missing() or None)
    return _BF16_KERNELS[0]


_BF16_KERNELS: list = []


_GEMM_MIN_RANK = 32  # csrc/cpu/lor2c.cpp kGemmMinRank
# With the bf16 product kernels the fused op keeps up with eager's native bf16 products further.
# Measured (2-core AMD EPYC Zen 4, 2 threads, p=0, fused / eager fwd+bwd, README "Fifth pass"):
# rank 64 1.13-1.15x at n=8192 d=768 and 1.10x at n=2048 d=4096; rank 96 1.28x and 0.91x; rank
# 128 0.95x and 0.86x. (At 64 before the bf16 kernels prefetched their rows: 0.96-1.0x.)
_BF16_KERNELS_MIN_RANK = 96


def expression_min_rank(dtype: torch.dtype) -> Optional[int]:
    """The rank from which cpu_loses_to_eager fires for `dtype` without dropout (at any number
    of rows and any widths), or None where it never does. Cheap after the first call (one cached
    CPU-feature query)."""
    if dtype == torch.bfloat16 and _bf16_products():
        return _BF16_KERNELS_MIN_RANK if cpu_bf16_kernels() is None else _GEMM_MIN_RANK
    return None


def cpu_loses_to_eager(r: int, dtype: torch.dtype, p: float) -> Optional[str]:
    """Why the cpu backend is slower than the eager expression for a plain LoR2C call of rank r
    on this CPU (the measurements above), or None where it is not. The number of rows and the
    widths no longer matter (see "no longer host-bound" above)."""
    start = expression_min_rank(dtype) if p == 0.0 else None
    if start is None or r < start:
        return None
    if cpu_bf16_kernels() is None:
        return (
            f"bfloat16 at rank {r}: this CPU multiplies bf16 natively (AVX512-BF16), and from "
            f"rank {start} the eager expression's bf16 products keep up with the kernel's "
            f"(measured 0.91x at r=96 and 0.86-0.95x at r=128, the kernel ahead at r=64: "
            f"1.10-1.15x)"
        )
    return (
        f"bfloat16 at rank {r}: this CPU multiplies bf16 natively (AVX512-BF16), the eager "
        f"expression's products run at twice the rate of the kernel's fp32 ones (measured "
        f"0.59x at r=64, 0.8-1.0x at r=32; the bf16 kernels do not run: {cpu_bf16_kernels()})"
    )


_BF16_PRODUCTS: list = []


def _bf16_products() -> bool:
    if not _BF16_PRODUCTS:
        cpu = getattr(torch, "cpu", None)
        has = False
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            fn = getattr(cpu, probe, None)
            if fn is not None:
                try:
                    has = has or bool(fn())
                except Exception:  # noqa: BLE001 - a probe missing in this torch build
                    pass
        _BF16_PRODUCTS.append(has)
    return _BF16_PRODUCTS[0]


def available(device_type: Optional[str] = None) -> dict:
    """{backend name: None if usable, else the reason}, for a device type or globally."""
    result = {}
    for name, b in BACKENDS.items():
        reason = b.unavailable()
        if reason is None and device_type is not None:
            reason = b.device_refusal(torch.device(device_type))
        result[name] = reason
    return result
