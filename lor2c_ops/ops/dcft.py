"""The DCFT op (docs/math.md section 4): registration (schemas, fake kernels, autograd) and public
functions.

    dcft_linear(x, W, b, A, B, C, s, stride, p) = F.linear(x, W, b) + s * dropout(x) @ D,
    D = conv_transpose2d(A.T @ B.T, C, stride)                      (d_in x d_out, never formed)

Two custom ops, `lor2c_ops::dcft_fwd` and `lor2c_ops::dcft_bwd`, each taking the backend by name
(the pattern of ops/lor2c.py). The forward returns the layer's whole output: the kernels write
b + s * dropout(x) @ D into the output buffer and the base linear's GEMM accumulates x @ W.T onto
it (beta = 1), so there is no separate n x d_out delta tensor. The backward likewise returns dx
with g @ W accumulated onto the adapter's part, plus dA, dB, dC; dW = g.T @ x and db = sum(g)
are computed here when the frozen weight or bias do require grad.

Saved for backward: x and the weights by reference, T = A @ windows(dropout(x)) (n x r*k, fp32)
and the 2-element seed; the dropout mask is regenerated from the seed with the convention of
csrc/philox.h on x viewed as (n, d_in), so a seed gives the same mask as lor2c_residual's.
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the ops' schemas
# from these annotations, and torch before 2.5 cannot read them as strings.
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._dispatch import kernels
from .. import _checks
from ..ref import dcft as ref


def _kernels(backend: str):
    return kernels(backend, "dcft", _Compiled)


class _Compiled:
    @staticmethod
    def forward(x, weight, bias, A, B, C, scale, stride, p, seed):
        return torch.ops.lor2c_ops_ext.dcft_fwd(x, weight, bias, A, B, C, scale, stride, p, seed)

    @staticmethod
    def backward(
        grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB, need_dC
    ):
        return torch.ops.lor2c_ops_ext.dcft_bwd(
            grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB, need_dC
        )


def _t_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("lor2c_ops::dcft_fwd", mutates_args=())
def dcft_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    C: Tensor,
    scale: float,
    stride: int,
    p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, T) for 2-D x (n, d_in): out = x @ W.T + b + s * dropout(x) @ D, T (n, r * k)."""
    return tuple(_run_forward(_kernels(backend), x, weight, bias, A, B, C, scale, stride, p, seed))


@dcft_fwd.register_fake
def _(x, weight, bias, A, B, C, scale, stride, p, seed, backend):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], A.shape[0] * C.shape[0]), dtype=_t_dtype(x)),
    )


@torch.library.custom_op("lor2c_ops::dcft_bwd", mutates_args=())
def dcft_bwd(
    grad: Tensor,
    x: Tensor,
    t: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    scale: float,
    stride: int,
    p: float,
    seed: Tensor,
    backend: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dC: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dC), dx including g @ W; a gradient not asked for is an empty tensor."""
    return tuple(
        _kernels(backend).backward(
            grad, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB, need_dC
        )
    )


@dcft_bwd.register_fake
def _(
    grad, x, t, weight, A, B, C, scale, stride, p, seed, backend, need_dx, need_dA, need_dB, need_dC
):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        A.new_empty(A.shape if need_dA else (0,)),
        B.new_empty(B.shape if need_dB else (0,)),
        C.new_empty(C.shape if need_dC else (0,)),
    )


_FWD_ARGS = 11  # x, weight, bias, A, B, C, scale, stride, p, seed, backend


def _run_forward(k, x, weight, bias, A, B, C, scale, stride, p, seed):
    if x.shape[0] == 0:
        return (
            x.new_empty((0, weight.shape[0])),
            x.new_empty((0, A.shape[0] * C.shape[0]), dtype=_t_dtype(x)),
        )
    return k.forward(x, weight, bias, A, B, C, scale, stride, p, seed)


def _grads(bwd, needs, grad_out, x, t, weight, A, B, C, seed, x_shape=None):
    """The gradient tuple of the forward's inputs; bwd(g, need_x, need_A, need_B, need_C) runs
    the backward kernels on rows (x, g as (n, d)); dx comes back in x_shape when given."""
    need_x, need_w, need_b, need_A, need_B, need_C = needs[:6]
    if grad_out is None:
        return _common.none_grads(_FWD_ARGS)
    g = _common.rows(grad_out, grad_out.shape[-1])
    dx = dA = dB = dC = dW = db = None
    if x.shape[0] == 0:
        dx = x.new_empty(x.shape)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    elif need_x or need_A or need_B or need_C:
        dx, dA, dB, dC = bwd(g, need_x, need_A, need_B, need_C)
    if need_x and x_shape is not None and len(x_shape) != 2:
        dx = dx.view(x_shape)
    if need_w:  # the base weight and bias get gradients only when they require them
        dW = g.t().mm(x).to(weight.dtype)
    if need_b:
        db = g.sum(0, dtype=_t_dtype(g)).to(g.dtype)
    return (
        dx if need_x else None,
        dW,
        db,
        dA if need_A else None,
        dB if need_B else None,
        dC if need_C else None,
    ) + _common.none_grads(_FWD_ARGS - 6)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, C, scale, stride, p, seed, backend = inputs
    ctx.save_for_backward(x, output[1], weight, A, B, C, seed)
    ctx.scale, ctx.stride, ctx.p, ctx.backend = scale, stride, p, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_t):
    x, t, weight, A, B, C, seed = ctx.saved_tensors
    return _grads(
        lambda g, nx, nA, nB, nC: dcft_bwd(
            g,
            x,
            t,
            weight,
            A,
            B,
            C,
            ctx.scale,
            ctx.stride,
            ctx.p,
            seed,
            ctx.backend,
            nx,
            nA,
            nB,
            nC,
        ),
        ctx.needs_input_grad,
        grad_out,
        x,
        t,
        weight,
        A,
        B,
        C,
        seed,
    )


dcft_fwd.register_autograd(_backward, setup_context=_setup_context)


class _DCFTFunction(torch.autograd.Function):
    """The eager path: the library ops' forward and backward without their dispatch cost."""

    @staticmethod
    def forward(ctx, x_in, weight, bias, A, B, C, scale, stride, p, seed, k):
        # Rows are taken here, inside the node, so that N-D activations add no view nodes.
        x = _common.rows(x_in, weight.shape[1])
        out, t = _run_forward(k, x, weight, bias, A, B, C, scale, stride, p, seed)
        ctx.save_for_backward(x, t, weight, A, B, C, seed)
        ctx.scale, ctx.stride, ctx.p, ctx.k, ctx.x_shape = scale, stride, p, k, x_in.shape
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(t)
        if x_in.dim() != 2:
            out = out.view(*x_in.shape[:-1], weight.shape[0])
        return out, t

    @staticmethod
    def backward(ctx, grad_out, _grad_t):
        x, t, weight, A, B, C, seed = ctx.saved_tensors
        return _grads(
            lambda g, nx, nA, nB, nC: ctx.k.backward(
                g, x, t, weight, A, B, C, ctx.scale, ctx.stride, ctx.p, seed, nx, nA, nB, nC
            ),
            ctx.needs_input_grad,
            grad_out,
            x,
            t,
            weight,
            A,
            B,
            C,
            seed,
            ctx.x_shape,
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_common.NO_FORWARD_AD.format(op="dcft_linear"))


# --- argument checks -----------------------------------------------------------------------------


def _stride(stride, k: int) -> int:
    if stride is None:
        return k
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(
            f"stride: expected an int in 1..{k} (the kernel size) or None, got {stride!r}"
        )
    if not 1 <= stride <= k:
        raise ValueError(f"stride: expected an int in 1..{k} (C is {k} x {k}), got {stride}")
    return stride


def fitting_sizes(d: int, k: int, stride: int) -> str:
    """The sizes next to d that satisfy d = (m - 1) * stride + k, as 'd (m = ...)' phrases."""
    if d >= k and (d - k) % stride == 0:
        return f"{d} (m = {(d - k) // stride + 1})"
    below = (d - k) // stride + 1 if d >= k else None  # the largest m whose size is below d
    above = below + 1 if below is not None else 1
    sizes = []
    if below is not None:
        sizes.append(f"{(below - 1) * stride + k} (m = {below})")
    sizes.append(f"{(above - 1) * stride + k} (m = {above})")
    return " or ".join(sizes)


def subspace_size(d: int, k: int, stride: int, name: str) -> int:
    """m with d = (m - 1) * stride + k, or a ValueError naming the sizes that would fit."""
    if d < k or (d - k) % stride != 0:
        raise ValueError(
            f"{name} = {d} does not fit kernel size k = {k} and stride = {stride}: DCFT needs "
            f"{name} = (m - 1) * stride + k for a whole number m >= 1; sizes that fit: "
            f"{fitting_sizes(d, k, stride)}"
        )
    return (d - k) // stride + 1


def _check_factors(A, B, C, stride, d_in: Optional[int] = None, d_out: Optional[int] = None):
    """(stride, m_in, m_out) after checking A (r, m_in), B (m_out, r), C (k, k) and the sizes."""
    _checks.tensor(A, "A", dim=2)
    _checks.tensor(B, "B", dim=2)
    _checks.tensor(C, "C", dim=2)
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"A: expected rank r >= 1, got A of shape {tuple(A.shape)}")
    if B.shape[1] != r:
        raise ValueError(
            f"B: expected shape (m_out, {r}) to match the rank of A "
            f"{tuple(A.shape)}, got {tuple(B.shape)}"
        )
    k = C.shape[0]
    if C.shape[1] != k or k < 1:
        raise ValueError(
            f"C: expected a square (k, k) kernel with k >= 1, got shape {tuple(C.shape)}"
        )
    stride = _stride(stride, k)
    for name, d, factor, dim, what in (("d_in", d_in, A, 1, "A"), ("d_out", d_out, B, 0, "B")):
        m = factor.shape[dim]
        form = "(r, m_in)" if what == "A" else "(m_out, r)"
        if m < 1:
            raise ValueError(
                f"{what}: expected shape {form} with m >= 1, got {tuple(factor.shape)}"
            )
        if d is None:
            continue
        want = subspace_size(d, k, stride, name)
        if m != want:
            shape = (r, want) if what == "A" else (want, r)
            raise ValueError(
                f"{what}: expected shape {shape} for {name} = {d} = ({want} - 1) * "
                f"{stride} + {k} (stride {stride}, kernel size {k}), got "
                f"{tuple(factor.shape)}"
            )
    return stride, A.shape[1], B.shape[0]


_FLOATS = frozenset(_checks.FLOAT_DTYPES)


def _check(x, weight, bias, A, B, C, stride) -> int:
    """The stride, after checking every argument. The common case costs one expression of
    attribute reads; on any doubt _explain finds the bad argument and raises."""
    try:
        k = C.shape[0]
        s = k if stride is None else stride
        dev = x.device
        ok = (
            (type(s) is int and 1 <= s <= k)
            and weight.dim() == 2
            and A.dim() == 2
            and B.dim() == 2
            and C.dim() == 2
            and x.dtype in _FLOATS
            and weight.dtype in _FLOATS
            and A.dtype in _FLOATS
            and B.dtype in _FLOATS
            and C.dtype in _FLOATS
            and x.shape[-1] == weight.shape[1]
            and A.shape[0] >= 1
            and B.shape[1] == A.shape[0]
            and C.shape[1] == k
            and A.shape[1] >= 1
            and B.shape[0] >= 1
            and (A.shape[1] - 1) * s + k == weight.shape[1]
            and (B.shape[0] - 1) * s + k == weight.shape[0]
            and dev == weight.device
            and dev == A.device
            and dev == B.device
            and dev == C.device
            and (
                bias is None
                or (
                    bias.dtype in _FLOATS
                    and bias.dim() == 1
                    and bias.shape[0] == weight.shape[0]
                    and dev == bias.device
                )
            )
        )
    except (AttributeError, TypeError, IndexError):  # not tensors, or 0-d ones
        ok = False
    return s if ok else _explain(x, weight, bias, A, B, C, stride)


def _explain(x, weight, bias, A, B, C, stride) -> int:
    """The detailed checks: raise the error naming the bad argument (else return the stride)."""
    _checks.tensor(x, "x", min_dim=1)
    _checks.tensor(weight, "weight", dim=2)
    if bias is not None:
        _checks.tensor(bias, "bias", dim=1)
    named = {"x": x, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    for name, t in (("A", A), ("B", B), ("C", C)):
        _checks.tensor(t, name, dim=2)
        named[name] = t
    _checks.same_device(named)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x: expected last dimension {d_in} (weight is (d_out, d_in) = "
            f"{tuple(weight.shape)}), got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(
            f"bias: expected shape ({d_out},) (d_out of weight "
            f"{tuple(weight.shape)}), got {tuple(bias.shape)}"
        )
    return _check_factors(A, B, C, stride, d_in, d_out)[0]


# --- public functions ----------------------------------------------------------------------------


def dcft_delta(A: Tensor, B: Tensor, C: Tensor, stride: Optional[int] = None) -> Tensor:
    """The materialised DCFT delta weight D = conv_transpose2d(A.T @ B.T, C, stride): (d_in, d_out).

    For folding into a base weight (W.T + s * D, i.e. W + s * D.T) and for tests; training goes
    through dcft_linear, which never forms D. Differentiable. A (r, m_in), B (m_out, r), C (k, k)
    of one dtype and device; stride in 1..k, default k; d = (m - 1) * stride + k.
    """
    stride, _, _ = _check_factors(A, B, C, stride)
    _checks.same_device({"A": A, "B": B, "C": C})
    _checks.same_dtype(A, "A", B, "B")
    _checks.same_dtype(A, "A", C, "C")
    return ref.dcft_delta(A, B, C, stride)


def dcft_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    C: Tensor,
    scale: float = 1.0,
    stride: Optional[int] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """F.linear(x, weight, bias) + scale * dropout(x) @ D, fused, without ever forming D.

    x: (..., d_in); weight (d_out, d_in) and bias (d_out,) or None in x's dtype (they get
    gradients when they require grad); A (r, m_in), B (m_out, r), C (k, k) in x's dtype or
    float32 (mixed precision), with d_in = (m_in - 1) * stride + k and d_out = (m_out - 1) *
    stride + k; stride in 1..k, default k (the paper's setting, and the fast path). Dropout
    applies to x on the adapter path only, when training and dropout_p > 0; its mask is drawn
    from `generator` (or the default generator of x's device), with the convention of
    lor2c_residual, and never stored. backend: None picks the fastest for the inputs; "reference",
    "cpu", "triton" or "cuda" forces one, and raises if it cannot run here, saying why.
    """
    fast = _common.FAST  # the common case in one call (csrc/fast_entry.cpp); None: not taken
    if fast is not None and not torch.compiler.is_compiling():
        out = fast._dcft(
            x, weight, bias, A, B, C, scale, stride, dropout_p, training, generator, backend
        )
        if out is not None:
            return out
    stride = _check(x, weight, bias, A, B, C, stride)
    p = _common.probability(dropout_p, "dropout_p") if training else 0.0
    scale = _common.scale_value(scale)
    device = x.device
    eager = _common.eager_path(device)
    autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)
    if autocast and x.dtype != torch.float64:
        # What the expression does under autocast: the linear and the matmul with D in the
        # autocast dtype. The adapter factors stay as they are (float32 is allowed).
        low = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
        if A.dtype not in (low, torch.float32):
            A, B, C = A.float(), B.float(), C.float()
    if (
        x.dtype is not weight.dtype
        or (bias is not None and bias.dtype is not x.dtype)
        or A.dtype is not B.dtype
        or A.dtype is not C.dtype
        or A.dtype is not x.dtype
    ):
        _checks.same_dtype(x, "x", weight, "weight")
        if bias is not None:
            _checks.same_dtype(x, "x", bias, "bias")
        _checks.same_dtype(A, "A", B, "B")
        _checks.same_dtype(A, "A", C, "C")
        _checks.weight_dtype(A, "A", x.dtype)
    name = _common.select(backend, device, x.dtype, "dcft")
    d_out, d_in = weight.shape
    _common.check_rows(x, d_in)
    seed = _common.seed_for(p, generator, device)
    args = (x, weight, bias, A, B, C, scale, stride, p, seed)
    if autocast:
        with torch.autocast(device.type, enabled=False):
            return _apply(args, name, eager)
    return _apply(args, name, eager)


def _apply(args, name: str, eager: bool) -> Tensor:
    """Run the op on checked arguments: eagerly through an autograd node that takes the rows
    itself (N-D activations add no view nodes), or through the library op (torch.compile)."""
    x, weight = args[0], args[1]
    if eager:
        _common.refuse_functorch("dcft_linear")
        if name in _common.COMPILED and _common.compiled_autograd("dcft"):
            _common.refuse_forward_ad(x, *args[3:6], op="dcft_linear")
            return torch.ops.lor2c_ops_ext.dcft(*args)  # a C++ autograd node, no Python
        return _DCFTFunction.apply(*args, _kernels(name))[0]
    d_out, d_in = weight.shape
    out, _ = dcft_fwd(_common.rows(x, d_in), *args[1:], name)
    return out.view(*x.shape[:-1], d_out)
