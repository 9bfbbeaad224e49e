"""The LoR2C residual op: registration (schema, fake kernel, autograd) and the public function.

    lor2c_residual(x, layer_out, A, B, scale, p) = layer_out + scale * dropout(x) @ A.T @ B.T

One op per direction, `lor2c_ops::lor2c_fwd` and `lor2c_ops::lor2c_bwd`, taking `Tensor? ids`:
without ids A (r, d_in) and B (d_out, r) are one adapter; with ids they are banks (G, r, d_in),
(G, d_out, r) and row i uses adapter ids[i] (-1: none). Each op takes the backend by name, so
that torch.compile traces it as an opaque node (fullgraph) and opcheck tests every backend.

Two ways in, one set of kernels:
  eager (the common case): the extension's C++ autograd op lor2c_ops_ext::lor2c on the compiled
      backends (reached in one C call from the fast entry, csrc/fast_entry.cpp, for common CPU
      calls), else `_LoR2CFunction`, a torch.autograd.Function calling the backend's kernels
      directly: no custom-op dispatch on the host path (tens of microseconds saved);
  torch.compile, and meta tensors: the library ops, with fake kernels and register_autograd.
Saved for backward: x (the caller's tensor, not a copy), t = dropout(x) @ A.T (n x r, fp32),
the weights, ids and the 2-element seed. The dropout mask is regenerated from the seed.
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the ops' schemas
# from these annotations, and torch before 2.5 cannot read them as strings.
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._dispatch import kernels
from .. import _checks, backends

draw_seed = _common.draw_seed  # public for tests and the DCFT op: the seed a generator gives
_rows = _common.rows


class _Compiled:
    """The extension's kernels (CPU and CUDA share the schema; the dispatcher picks the device)."""

    @staticmethod
    def forward(x, layer_out, A, B, scale, p, seed):
        return torch.ops.lor2c_ops_ext.lor2c_fwd(x, layer_out, A, B, scale, p, seed)

    @staticmethod
    def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
        return torch.ops.lor2c_ops_ext.lor2c_bwd(
            grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB
        )

    @staticmethod
    def multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p, seed):
        return torch.ops.lor2c_ops_ext.lor2c_multi_fwd(
            x, layer_out, A_bank, B_bank, ids, scale, p, seed
        )

    @staticmethod
    def multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB):
        return torch.ops.lor2c_ops_ext.lor2c_multi_bwd(
            grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA, need_dB
        )


def _kernels(backend: str):
    return kernels(backend, "lor2c", _Compiled)


def _t_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _run_forward(k, x, layer_out, A, B, ids, scale, p, seed):
    if x.shape[0] == 0:
        return (
            layer_out.new_empty(layer_out.shape),
            x.new_empty((0, A.shape[-2]), dtype=_t_dtype(x)),
        )
    if ids is None:
        return k.forward(x, layer_out, A, B, scale, p, seed)
    return k.multi_forward(x, layer_out, A, B, ids, scale, p, seed)


def _run_backward(k, grad, x, t, A, B, ids, scale, p, seed, need_dx, need_dA, need_dB):
    if x.shape[0] == 0:  # an empty batch: the weights get exact zeros
        return (
            x.new_empty(x.shape if need_dx else (0,)),
            torch.zeros_like(A) if need_dA else A.new_empty((0,)),
            torch.zeros_like(B) if need_dB else B.new_empty((0,)),
        )
    if ids is None:
        return k.backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB)
    return k.multi_backward(grad, x, t, A, B, ids, scale, p, seed, need_dx, need_dA, need_dB)


# --- the library ops (torch.compile, opcheck, meta tensors) ------------------------------------


@torch.library.custom_op("lor2c_ops::lor2c_fwd", mutates_args=())
def lor2c_fwd(
    x: Tensor,
    layer_out: Tensor,
    A: Tensor,
    B: Tensor,
    ids: Optional[Tensor],
    scale: float,
    p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, t) for 2-D x (n, d_in) and layer_out (n, d_out); t = dropout(x) @ A.T."""
    return tuple(_run_forward(_kernels(backend), x, layer_out, A, B, ids, scale, p, seed))


@lor2c_fwd.register_fake
def _(x, layer_out, A, B, ids, scale, p, seed, backend):
    return (
        layer_out.new_empty(layer_out.shape),
        x.new_empty((x.shape[0], A.shape[-2]), dtype=_t_dtype(x)),
    )


@torch.library.custom_op("lor2c_ops::lor2c_bwd", mutates_args=())
def lor2c_bwd(
    grad: Tensor,
    x: Tensor,
    t: Tensor,
    A: Tensor,
    B: Tensor,
    ids: Optional[Tensor],
    scale: float,
    p: float,
    seed: Tensor,
    backend: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB), bank-shaped with ids; a gradient not asked for is an empty tensor."""
    return tuple(
        _run_backward(
            _kernels(backend), grad, x, t, A, B, ids, scale, p, seed, need_dx, need_dA, need_dB
        )
    )


@lor2c_bwd.register_fake
def _(grad, x, t, A, B, ids, scale, p, seed, backend, need_dx, need_dA, need_dB):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        A.new_empty(A.shape if need_dA else (0,)),
        B.new_empty(B.shape if need_dB else (0,)),
    )


_FWD_ARGS = 9  # x, layer_out, A, B, ids, scale, p, seed, backend: the None-tuple derives from it


def _setup_context(ctx, inputs, output):
    x, _layer_out, A, B, ids, scale, p, seed, backend = inputs
    ctx.save_for_backward(x, output[1], A, B, ids, seed)
    ctx.scale, ctx.p, ctx.backend, ctx.x_shape = scale, p, backend, x.shape
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_out, bwd):
    """The gradient tuple of the forward's inputs; bwd(g, x, t, A, B, ids, seed, need_x,
    need_A, need_B) -> (dx, dA, dB) runs the backward kernels on rows (g as (n, d_out));
    dx comes back in the forward's x shape (ctx.x_shape)."""
    need_x, need_lo, need_A, need_B = ctx.needs_input_grad[:4]
    if grad_out is None:
        return _common.none_grads(_FWD_ARGS)
    x, t, A, B, ids, seed = ctx.saved_tensors
    dx = dA = dB = None
    if need_x or need_A or need_B:
        g = _rows(grad_out, grad_out.shape[-1])
        dx, dA, dB = bwd(g, x, t, A, B, ids, seed, need_x, need_A, need_B)
        if need_x and dx.dim() != len(ctx.x_shape):
            dx = dx.view(ctx.x_shape)
    return (
        dx if need_x else None,
        grad_out if need_lo else None,
        dA if need_A else None,
        dB if need_B else None,
    ) + _common.none_grads(_FWD_ARGS - 4)


def _library_backward(ctx, grad_out, _grad_t):
    return _grads(
        ctx,
        grad_out,
        lambda g, x, t, A, B, ids, seed, nx, nA, nB: lor2c_bwd(
            g, x, t, A, B, ids, ctx.scale, ctx.p, seed, ctx.backend, nx, nA, nB
        ),
    )


lor2c_fwd.register_autograd(_library_backward, setup_context=_setup_context)


# --- the eager path ------------------------------------------------------------------------------


class _LoR2CFunction(torch.autograd.Function):
    """The same forward and backward as the library ops, without their dispatch cost (the
    ctx-in-forward form: the setup_context form binds arguments with inspect on every call)."""

    @staticmethod
    def forward(ctx, x_in, layer_out, A, B, ids, scale, p, seed, k):
        # Rows are taken here, inside the node, so that N-D activations add no view nodes.
        x = _rows(x_in, A.shape[-1])
        out, t = _run_forward(k, x, _rows(layer_out, B.shape[-2]), A, B, ids, scale, p, seed)
        ctx.save_for_backward(x, t, A, B, ids, seed)
        ctx.scale, ctx.p, ctx.k, ctx.x_shape = scale, p, k, x_in.shape
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(t)
        if layer_out.dim() != 2:
            out = out.view(layer_out.shape)
        return out, t

    @staticmethod
    def backward(ctx, grad_out, _grad_t):
        return _grads(
            ctx,
            grad_out,
            lambda g, x, t, A, B, ids, seed, nx, nA, nB: _run_backward(
                ctx.k, g, x, t, A, B, ids, ctx.scale, ctx.p, seed, nx, nA, nB
            ),
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_common.NO_FORWARD_AD.format(op="lor2c_residual"))


# --- the public function -------------------------------------------------------------------------


_FLOATS = frozenset(_checks.FLOAT_DTYPES)


def _check(x, layer_out, A, B, banked=False):
    """Shapes, dtypes and devices of the tensor arguments. The common case costs one expression
    of attribute reads; on any doubt _explain finds the bad argument and raises."""
    wd = 3 if banked else 2
    try:
        dev = x.device
        ok = (
            A.dim() == wd
            and B.dim() == wd
            and x.dtype in _FLOATS
            and layer_out.dtype in _FLOATS
            and A.dtype in _FLOATS
            and B.dtype in _FLOATS
            and x.shape[-1] == A.shape[-1]
            and B.shape[-1] == A.shape[-2]
            and A.shape[-2] >= 1
            and layer_out.shape[-1] == B.shape[-2]
            and layer_out.shape[:-1] == x.shape[:-1]
            and (not banked or A.shape[0] == B.shape[0])
            and dev == layer_out.device
            and dev == A.device
            and dev == B.device
        )
    except (AttributeError, TypeError, IndexError):  # not tensors, or 0-d ones
        ok = False
    if not ok:
        _explain(x, layer_out, A, B, banked)


def _explain(x, layer_out, A, B, banked):
    """The detailed checks: raise the error naming the bad argument."""
    _checks.tensor(x, "x", min_dim=1)
    _checks.tensor(layer_out, "layer_out", min_dim=1)
    _checks.tensor(A, "A", dim=3 if banked else 2)
    _checks.tensor(B, "B", dim=3 if banked else 2)
    _checks.same_device({"x": x, "layer_out": layer_out, "A": A, "B": B})
    if banked:
        if A.shape[0] != B.shape[0]:
            raise ValueError(
                f"B: expected a bank of {A.shape[0]} adapters (as A, "
                f"{tuple(A.shape)}), got {tuple(B.shape)}"
            )
        A, B = A[0], B[0]
    r, d_in = A.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x: expected last dimension {d_in} (A is (r, d_in) = {tuple(A.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    if B.shape[1] != r:
        raise ValueError(
            f"B: expected shape (d_out, {r}) to match the rank of A {tuple(A.shape)},"
            f" got {tuple(B.shape)}"
        )
    if r < 1:
        raise ValueError(f"A: expected rank r >= 1, got A of shape {tuple(A.shape)}")
    expected = (*x.shape[:-1], B.shape[0])
    if tuple(layer_out.shape) != expected:
        raise ValueError(
            f"layer_out: expected shape {expected} (x's leading dimensions, then "
            f"d_out = B.shape[0]), got {tuple(layer_out.shape)}"
        )


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _row_ids(adapter_ids, x: Tensor, adapters: int) -> Tensor:
    """adapter_ids as int64 (n,) per row: given per row (x.shape[:-1]) or per sequence
    (x.shape[0],) for inputs with a sequence dimension. Values are checked on the host for CPU
    tensors; on a GPU, on the device (an asynchronous assert): no host synchronisation."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(
            f"adapter_ids: expected an integer torch.Tensor, got {type(adapter_ids).__name__}"
        )
    if adapter_ids.dtype not in _ID_DTYPES:
        raise ValueError(
            f"adapter_ids: expected an integer tensor, got dtype "
            f"{str(adapter_ids.dtype).replace('torch.', '')}"
        )
    if adapter_ids.device != x.device:
        raise ValueError(
            f"adapter_ids: expected a tensor on {x.device} (as x), got {adapter_ids.device}"
        )
    lead = tuple(x.shape[:-1])
    shape = tuple(adapter_ids.shape)
    if shape == lead:
        ids = adapter_ids.reshape(-1)
    elif x.dim() >= 3 and shape == lead[:1]:
        ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    else:
        per_seq = f" or {lead[:1]} (one per sequence)" if x.dim() >= 3 else ""
        raise ValueError(f"adapter_ids: expected shape {lead} (one per row){per_seq}, got {shape}")
    ids = ids.to(torch.int64)
    expected = f"adapter_ids: expected values in [-1, {adapters}) (-1: no adapter)"
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        if x.device.type != "meta":
            torch._assert_async(((ids >= -1) & (ids < adapters)).all(), expected)
    elif ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= adapters:
            raise ValueError(f"{expected}, got values in [{low}, {high}]")
    return ids


def lor2c_residual(
    x: Tensor,
    layer_out: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    *,
    adapter_ids: Optional[Tensor] = None,
) -> Tensor:
    """layer_out + scale * dropout(x) @ A.T @ B.T, fused, with its backward.

    x: (..., d_in); layer_out: (..., d_out) with the same leading dimensions; A: (r, d_in);
    B: (d_out, r). Activations float32, float16 or bfloat16 (float64 on the reference backend);
    the weights either in the activations' dtype or float32 (mixed precision: their gradients
    come back in their own dtype). Dropout applies when training and dropout_p > 0; its mask
    is drawn from `generator` (or the default generator of x's device) and never stored.
    backend: None picks the fastest for the inputs; "reference", "cpu", "triton" or "cuda"
    forces one, and raises if it cannot run here, saying why. scale: a Python number (a tensor
    that requires grad is refused: its gradient is not computed).

    Multi-adapter batches: with A a bank (G, r, d_in), B a bank (G, d_out, r) and adapter_ids
    (one per row, or one per sequence), row i uses A[ids[i]] and B[ids[i]] inside one kernel
    launch; rows with id -1 get layer_out unchanged. Gradients land in the used bank rows.
    Forward-mode AD is not supported (it raises).
    """
    fast = _common.FAST  # the common case in one call (csrc/fast_entry.cpp); None: not taken
    if fast is not None and not torch.compiler.is_compiling():
        out = fast._lor2c(
            x, layer_out, A, B, scale, dropout_p, training, generator, backend, adapter_ids
        )
        if out is not None:
            return out
    banked = adapter_ids is not None
    _check(x, layer_out, A, B, banked)
    p = _common.probability(dropout_p, "dropout_p") if training else 0.0
    scale = _common.scale_value(scale)
    device = x.device
    eager = _common.eager_path(device)
    autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)
    if autocast:
        # What the expression does under autocast: matmuls in low precision, then the residual
        # add in layer_out's precision. Computing in fp32 is at least as accurate.
        if x.dtype != layer_out.dtype:
            x = x.to(layer_out.dtype)
        if A.dtype not in (x.dtype, torch.float32):
            A, B = A.float(), B.float()
    if x.dtype is not layer_out.dtype or A.dtype is not B.dtype or A.dtype is not x.dtype:
        _checks.same_dtype(x, "x", layer_out, "layer_out")
        _checks.same_dtype(A, "A", B, "B")
        _checks.weight_dtype(A, "A", x.dtype)
    name = _common.select(backend, device, x.dtype, "lor2c_multi" if banked else "lor2c")
    d_in, d_out = A.shape[-1], B.shape[-2]
    _common.check_rows(x, d_in)
    if name == "cpu" and backend is None and p == 0.0 and not banked and A.dtype is x.dtype:
        if backends.cpu_loses_to_eager(A.shape[0], x.dtype, 0.0) is not None:
            # the measured rule: the expression is faster. (With dropout the fused kernel stays:
            # the expression would need this library's mask, and drawing it outside the kernels
            # costs more than the kernels lose; the benchmarks' PASS/MISS lines show where.)
            with _common.no_autocast(device, autocast):
                return layer_out + scale * (x @ A.T @ B.T)
    ids = _row_ids(adapter_ids, x, A.shape[0]) if banked else None
    seed = _common.seed_for(p, generator, device)
    args = (x, layer_out, A, B, ids, scale, p, seed)
    if autocast:
        with torch.autocast(device.type, enabled=False):
            return _apply(args, name, eager, d_in, d_out)
    return _apply(args, name, eager, d_in, d_out)


def _apply(args, name: str, eager: bool, d_in: int, d_out: int) -> Tensor:
    """Run the op on checked arguments: eagerly through an autograd node that takes the rows
    itself (N-D activations add no view nodes), or through the library op (torch.compile)."""
    x, layer_out, A, B, ids, scale, p, seed = args
    if eager:
        _common.refuse_functorch("lor2c_residual")
        if name in _common.COMPILED and _common.compiled_autograd("lor2c"):
            _common.refuse_forward_ad(x, layer_out, A, B, op="lor2c_residual")
            return torch.ops.lor2c_ops_ext.lor2c(*args)  # a C++ autograd node, no Python
        return _LoR2CFunction.apply(*args, _kernels(name))[0]
    out, _ = lor2c_fwd(_rows(x, d_in), _rows(layer_out, d_out), A, B, ids, scale, p, seed, name)
    return out.view(*layer_out.shape[:-1], d_out)
