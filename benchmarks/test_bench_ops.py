"""Op-level benchmarks through pytest-benchmark: every op, every provider, forward and backward.

    python -m pytest benchmarks/ --benchmark-only                     # small: 1-2 min on 2 cores
    python -m pytest benchmarks/ --benchmark-only --bench-size=large  # the bench scripts' sizes
    python -m pytest benchmarks/ --benchmark-only -k "lor2c and fwd+bwd"

Ops: `lor2c` (lor2c_residual), `share` (a ShareLoR2C adapter called with an int index, reading
its bank rows in place), `multi` (lor2c_residual with A/B banks and adapter_ids: a multi-adapter
batch) and `dcft` (dcft_linear, the whole adapted linear layer).
Providers: `eager` (the published reference expression: `layer_out + (dropout(x) @ A.T @ B.T) * s`
from bench_lor2c.py; for DCFT the published approach of bench_dcft.py, which builds D with
conv_transpose2d every step), `compiled` (the same under torch.compile), each fused backend that
runs on the device (the Triton interpreter is for tests, not timing, so no triton on CPU) and,
for DCFT, `linear`: the frozen F.linear alone, the floor the adapter adds cost to.
Modes: `fwd` (a training forward: the autograd graph is built), `bwd` (the backward alone, each
round after an untimed forward) and `fwd+bwd`.

Test ids read provider-mode-shape-dtype (`test_lor2c[cpu-fwd+bwd-n2048-d768-r8-fp32]`) and each
(op, mode, shape) is one pytest-benchmark group, so the table puts the providers side by side.
extra_info holds the shape, dtype, device, dropout p, the bytes the op must move at least
(docs/math.md section 1.2: x and layer_out read, the output written; the same again in
backward) and the bandwidth that makes at the median time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dcft  # noqa: E402
import bench_lor2c  # noqa: E402
import bench_share  # noqa: E402
import common  # noqa: E402
from bench_dcft import frozen_linear  # noqa: E402
from bench_dcft import published as dcft_published  # noqa: E402
from bench_lor2c import reference_expression  # noqa: E402
from bench_share import multi_reference as multi_expression  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops import backends  # noqa: E402
from lor2c_ops.ops.dcft import subspace_size  # noqa: E402

P = 0.1  # dropout probability: the training case, mask generation included
SCALE = 2.0  # alpha / r
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (size, device type) -> op -> shape, and the op name each fused backend is asked about
# (backends.Backend.refuses): declared by the scripts themselves (BENCH_OPS); the dtype is fp32
# on the CPU and bf16 on CUDA.
_OPS = {**bench_lor2c.BENCH_OPS, **bench_share.BENCH_OPS, **bench_dcft.BENCH_OPS}
SIZES = {
    key: {op: spec["sizes"][key] for op, spec in _OPS.items()}
    for key in (("small", "cpu"), ("large", "cpu"), ("small", "cuda"), ("large", "cuda"))
}
KERNEL_OP = {op: spec["kernel_op"] for op, spec in _OPS.items()}


# ---- the eager expressions of the ops that have no bench script function ----------------------


def share_expression(x, layer_out, A_bank, B_bank, group: int, index: int, scale, p):
    """Adapter `index` of a shared bank in eager PyTorch: the reference expression on bank rows."""
    return reference_expression(x, layer_out, A_bank[group], B_bank[index], scale, p)


# ---- configuration from the command line -------------------------------------------------------


def bench_device(config) -> torch.device:
    choice = config.getoption("bench_device", "auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda: no CUDA device is visible")
    return torch.device(choice)


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fused_backends(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The fused backends to time: those that run op here, but neither the pure-PyTorch fallback
    nor, on the CPU, Triton's interpreter (as bench_lor2c.providers)."""
    names = []
    for name in backends.NAMES:
        if name == "reference" or (name == "triton" and device.type == "cpu"):
            continue
        if backends.BACKENDS[name].refuses(device, dtype, KERNEL_OP[op]) is None:
            names.append(name)
    return names


def providers(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    floor = ["linear"] if op == "dcft" else []
    return floor + ["eager", "compiled"] + fused_backends(op, device, dtype)


def shape_id(shape: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in shape.items())


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    mode: str
    shape: tuple  # ((name, value), ...)
    dtype: torch.dtype
    device: torch.device

    @property
    def id(self) -> str:
        return f"{self.provider}-{self.mode}-{shape_id(dict(self.shape))}-{DTYPE_NAMES[self.dtype]}"

    @property
    def group(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape)
        return f"{self.op} {self.mode} {shape} {DTYPE_NAMES[self.dtype]} {self.device.type}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    op = metafunc.function.__name__.removeprefix("test_")
    device = bench_device(metafunc.config)
    dtype = bench_dtype(device)
    shape = tuple(SIZES[metafunc.config.getoption("bench_size", "small"), device.type][op].items())
    cases = [
        Case(op, provider, mode, shape, dtype, device)
        for mode in MODES
        for provider in providers(op, device, dtype)
    ]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


# ---- inputs and providers ----------------------------------------------------------------------

_INPUTS: dict = {}  # the inputs of the last (op, shape, dtype, device): an op's cases share them
_COMPILED: dict = {}  # expression -> its torch.compile: compiled once per run, shared by modes


def compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def make_inputs(op: str, shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    key = (op, tuple(shape.items()), dtype, device)
    if key in _INPUTS:
        return _INPUTS[key]
    _INPUTS.clear()
    gen = torch.Generator().manual_seed(0)

    def randn(*size, std=1.0, grad=False):
        t = (torch.randn(*size, generator=gen) * std).to(device, dtype)
        return t.requires_grad_(grad)

    n, r = shape["n"], shape["r"]
    if op == "dcft":
        d, k = shape["d"], shape["k"]
        m = subspace_size(d, k, k, "d")
        t = dict(
            x=randn(n, d, grad=True),
            W=randn(d, d, std=d**-0.5),
            b=randn(d, std=0.1),
            A=randn(r, m, std=0.02, grad=True),
            B=randn(m, r, std=0.02, grad=True),
            C=randn(k, k, std=0.02, grad=True),
            g=randn(n, d),
            stride=k,
        )
    else:
        d = shape["d"]
        t = dict(x=randn(n, d, grad=True), layer_out=randn(n, d, grad=True), g=randn(n, d))
        if op == "lor2c":
            t.update(A=randn(r, d, std=d**-0.5, grad=True), B=randn(d, r, std=0.01, grad=True))
        elif op == "share":
            L = shape["L"]
            bank = lo.ShareLoR2C(L, d, r=r, alpha=SCALE * r, dropout=P).to(device, dtype)
            torch.nn.init.normal_(bank.B_bank, std=0.01)  # not zeros: no special case
            t.update(bank=bank, index=1)  # adapter 1 of L, its A the shared row of group 0
        else:
            G = shape["G"]
            t.update(
                A=randn(G, r, d, std=d**-0.5, grad=True),
                B=randn(G, d, r, std=0.01, grad=True),
                ids=torch.randint(0, G, (n,), generator=gen).to(device),
            )
    _INPUTS[key] = t
    return t


def make_forward(case: Case, t: dict) -> tuple[Callable[[], torch.Tensor], list]:
    """(forward(), the tensors the backward differentiates for) of one case."""
    op, provider = case.op, case.provider
    fused = provider not in ("eager", "compiled", "linear")
    if op == "lor2c":
        args = (t["x"], t["layer_out"], t["A"], t["B"])
        inputs = list(args)
        if fused:
            return (
                lambda: lo.lor2c_residual(*args, scale=SCALE, dropout_p=P, backend=provider),
                inputs,
            )
        f = reference_expression if provider == "eager" else compiled(reference_expression)
        return lambda: f(*args, SCALE, P), inputs
    if op == "share":
        bank, index = t["bank"], t["index"]
        inputs = [t["x"], t["layer_out"], bank.A_bank, bank.B_bank]
        if fused:
            module = lo.ShareLoR2C(
                bank.num_adapters,
                bank.in_features,
                r=bank.r,
                alpha=bank.alpha,
                dropout=P,
                backend=provider,
                device="meta",
            )
            module.A_bank, module.B_bank = bank.A_bank, bank.B_bank  # the same parameters
            return lambda: module(index, t["x"], t["layer_out"]), inputs
        f = share_expression if provider == "eager" else compiled(share_expression)
        group = bank.groups[index]
        return (
            lambda: f(
                t["x"], t["layer_out"], bank.A_bank, bank.B_bank, group, index, bank.scaling, P
            ),
            inputs,
        )
    if op == "multi":
        args = (t["x"], t["layer_out"], t["A"], t["B"])
        inputs = list(args)
        if fused:
            return (
                lambda: lo.lor2c_residual(
                    *args, scale=SCALE, dropout_p=P, backend=provider, adapter_ids=t["ids"]
                ),
                inputs,
            )
        f = multi_expression if provider == "eager" else compiled(multi_expression)
        return lambda: f(*args, t["ids"], SCALE, P), inputs
    # dcft
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["C"])
    inputs = [t["x"]] if provider == "linear" else [t["x"], t["A"], t["B"], t["C"]]
    scale = 1.0 / dict(case.shape)["r"]
    if fused:
        return (
            lambda: lo.dcft_linear(
                *args, scale=scale, stride=t["stride"], dropout_p=P, backend=provider
            ),
            inputs,
        )
    f = {"linear": frozen_linear, "eager": dcft_published, "compiled": compiled(dcft_published)}[
        provider
    ]
    return lambda: f(*args, scale, t["stride"], P), inputs


def bytes_moved(case: Case) -> int:
    """Bytes the op must move at least in this mode (activations and the frozen weight)."""
    s = dict(case.shape)
    n, d = s["n"], s["d"]
    size = torch.empty((), dtype=case.dtype).element_size()
    if case.op == "dcft":
        # fwd: read x and W, write the output; bwd: read g, x (the dropout mask's input) and W,
        # write dx
        per_mode = {"fwd": 2 * n * d + d * d, "bwd": 3 * n * d + d * d}
    else:
        # docs/math.md section 1.2: 3 n*d elements each way (d layer_out = g: no copy)
        per_mode = {"fwd": 3 * n * d, "bwd": 3 * n * d}
    per_mode["fwd+bwd"] = per_mode["fwd"] + per_mode["bwd"]
    extra = n * 8 if case.op == "multi" else 0  # the int64 adapter ids, read each way
    return per_mode[case.mode] * size + extra * (2 if case.mode == "fwd+bwd" else 1)


_DEVICE_NAMES: dict = {}


def device_name(device: torch.device) -> str:
    if device not in _DEVICE_NAMES:
        _DEVICE_NAMES[device] = common.device_name(device)
    return _DEVICE_NAMES[device]


# ---- the benchmark -----------------------------------------------------------------------------


def run_case(benchmark, case: Case) -> None:
    t = make_inputs(case.op, dict(case.shape), case.dtype, case.device)
    forward, inputs = make_forward(case, t)
    g = t["g"]
    cuda = case.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(case.device)

    def fwd():
        out = forward()
        sync()
        return out

    def fwd_bwd():
        grads = torch.autograd.grad(forward(), inputs, g)
        sync()
        return grads

    def setup():  # untimed, before each timed backward
        return (fwd(),), {}

    def bwd(out):
        grads = torch.autograd.grad(out, inputs, g)
        sync()
        return grads

    benchmark.group = case.group
    benchmark.extra_info.update(
        op=case.op,
        provider=case.provider,
        mode=case.mode,
        shape=dict(case.shape),
        dtype=DTYPE_NAMES[case.dtype],
        device=device_name(case.device),
        dropout_p=P,
        bytes_moved=bytes_moved(case),
        threads=torch.get_num_threads(),
    )
    if not benchmark.disabled:  # (a smoke run calls each case once, untimed)
        fwd_bwd()  # compile and warm the allocator outside the timing
    if case.mode == "fwd":
        benchmark(fwd)
    elif case.mode == "fwd+bwd":
        benchmark(fwd_bwd)
    else:
        rounds = 1
        if not benchmark.disabled:
            (out,), _ = setup()
            t0 = time.perf_counter()
            bwd(out)
            once = time.perf_counter() - t0
            # as pytest-benchmark sizes a plain benchmark(...): --benchmark-max-time, at least
            # --benchmark-min-rounds
            rounds = max(
                benchmark._min_rounds, math.ceil(float(benchmark._max_time) / max(once, 1e-6))
            )
        benchmark.pedantic(
            bwd, setup=setup, rounds=rounds, warmup_rounds=0 if benchmark.disabled else 1
        )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps"] = bytes_moved(case) / stats.stats.median / 1e9


def test_lor2c(benchmark, case):
    run_case(benchmark, case)


def test_share(benchmark, case):
    run_case(benchmark, case)


def test_multi(benchmark, case):
    run_case(benchmark, case)


def test_dcft(benchmark, case):
    run_case(benchmark, case)
