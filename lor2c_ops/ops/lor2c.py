"""The LoR2C residual op: registration (schema, fake kernel, autograd) and the public function.

    lor2c_residual(x, layer_out, A, B, scale, dropout_p) = layer_out + scale * dropout(x) @ A.T @ B.T

Two custom ops, `lor2c_ops::lor2c_fwd` and `lor2c_ops::lor2c_bwd`, each taking the backend by
name, so that torch.compile traces them as opaque nodes (fullgraph) and opcheck can test every
backend. Saved for backward: x (the caller's tensor, not a copy), t = dropout(x) @ A.T (n x r,
fp32), the weights and the 2-element seed. The dropout mask is regenerated from the seed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import kernels
from .. import _checks, backends


def _kernels(backend: str):
    return kernels(backend, "lor2c", _Compiled)


class _Compiled:
    @staticmethod
    def forward(x, layer_out, A, B, scale, p, seed):
        return torch.ops.lor2c_ops_ext.lor2c_fwd(x, layer_out, A, B, scale, p, seed)

    @staticmethod
    def backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB):
        return torch.ops.lor2c_ops_ext.lor2c_bwd(grad, x, t, A, B, scale, p, seed, need_dx,
                                                 need_dA, need_dB)

    @staticmethod
    def multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p, seed):
        return torch.ops.lor2c_ops_ext.lor2c_multi_fwd(x, layer_out, A_bank, B_bank, ids, scale,
                                                       p, seed)

    @staticmethod
    def multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p, seed, need_dx, need_dA,
                       need_dB):
        return torch.ops.lor2c_ops_ext.lor2c_multi_bwd(grad, x, t, A_bank, B_bank, ids, scale, p,
                                                       seed, need_dx, need_dA, need_dB)


def _t_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("lor2c_ops::lor2c_fwd", mutates_args=())
def lor2c_fwd(x: Tensor, layer_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
              seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(out, t) for 2-D x (n, d_in) and layer_out (n, d_out); t = dropout(x) @ A.T."""
    return tuple(_kernels(backend).forward(x, layer_out, A, B, scale, p, seed))


@lor2c_fwd.register_fake
def _(x, layer_out, A, B, scale, p, seed, backend):
    return (layer_out.new_empty(layer_out.shape),
            x.new_empty((x.shape[0], A.shape[0]), dtype=_t_dtype(x)))


@torch.library.custom_op("lor2c_ops::lor2c_bwd", mutates_args=())
def lor2c_bwd(grad: Tensor, x: Tensor, t: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
              seed: Tensor, backend: str, need_dx: bool, need_dA: bool,
              need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient not asked for comes back as an empty tensor."""
    return tuple(_kernels(backend).backward(grad, x, t, A, B, scale, p, seed, need_dx, need_dA,
                                            need_dB))


@lor2c_bwd.register_fake
def _(grad, x, t, A, B, scale, p, seed, backend, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if need_dx else (0,)),
            A.new_empty(A.shape if need_dA else (0,)),
            B.new_empty(B.shape if need_dB else (0,)))


def _setup_context(ctx, inputs, output):
    x, _layer_out, A, B, scale, p, seed, backend = inputs
    ctx.save_for_backward(x, output[1], A, B, seed)
    ctx.scale, ctx.p, ctx.backend = scale, p, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_t):
    need_x, need_lo, need_A, need_B = ctx.needs_input_grad[:4]
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    x, t, A, B, seed = ctx.saved_tensors
    dx = dA = dB = None
    if need_x or need_A or need_B:
        g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dx, dA, dB = lor2c_bwd(g, x, t, A, B, ctx.scale, ctx.p, seed, ctx.backend, need_x,
                               need_A, need_B)
    return (dx if need_x else None, grad_out if need_lo else None, dA if need_A else None,
            dB if need_B else None, None, None, None, None)


lor2c_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lor2c_ops::lor2c_multi_fwd", mutates_args=())
def lor2c_multi_fwd(x: Tensor, layer_out: Tensor, A_bank: Tensor, B_bank: Tensor, ids: Tensor,
                    scale: float, p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(out, t) for a multi-adapter batch: row i uses A_bank[ids[i]], B_bank[ids[i]]."""
    return tuple(_kernels(backend).multi_forward(x, layer_out, A_bank, B_bank, ids, scale, p,
                                                 seed))


@lor2c_multi_fwd.register_fake
def _(x, layer_out, A_bank, B_bank, ids, scale, p, seed, backend):
    return (layer_out.new_empty(layer_out.shape),
            x.new_empty((x.shape[0], A_bank.shape[1]), dtype=_t_dtype(x)))


@torch.library.custom_op("lor2c_ops::lor2c_multi_bwd", mutates_args=())
def lor2c_multi_bwd(grad: Tensor, x: Tensor, t: Tensor, A_bank: Tensor, B_bank: Tensor,
                    ids: Tensor, scale: float, p: float, seed: Tensor, backend: str,
                    need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA_bank, dB_bank): bank-shaped, nonzero only in the rows the batch used."""
    return tuple(_kernels(backend).multi_backward(grad, x, t, A_bank, B_bank, ids, scale, p,
                                                  seed, need_dx, need_dA, need_dB))


@lor2c_multi_bwd.register_fake
def _(grad, x, t, A_bank, B_bank, ids, scale, p, seed, backend, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if need_dx else (0,)),
            A_bank.new_empty(A_bank.shape if need_dA else (0,)),
            B_bank.new_empty(B_bank.shape if need_dB else (0,)))


def _multi_setup_context(ctx, inputs, output):
    x, _layer_out, A_bank, B_bank, ids, scale, p, seed, backend = inputs
    ctx.save_for_backward(x, output[1], A_bank, B_bank, ids, seed)
    ctx.scale, ctx.p, ctx.backend = scale, p, backend
    ctx.set_materialize_grads(False)


def _multi_backward(ctx, grad_out, _grad_t):
    need_x, need_lo, need_A, need_B = ctx.needs_input_grad[:4]
    nothing = (None,) * 9
    if grad_out is None:
        return nothing
    x, t, A_bank, B_bank, ids, seed = ctx.saved_tensors
    dx = dA = dB = None
    if need_x or need_A or need_B:
        g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dx, dA, dB = lor2c_multi_bwd(g, x, t, A_bank, B_bank, ids, ctx.scale, ctx.p, seed,
                                     ctx.backend, need_x, need_A, need_B)
    return (dx if need_x else None, grad_out if need_lo else None, dA if need_A else None,
            dB if need_B else None) + nothing[4:]


lor2c_multi_fwd.register_autograd(_multi_backward, setup_context=_multi_setup_context)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(seed, offset) for one call's dropout mask, drawn from `generator` or the default one.

    With generator=None the default generator of x's device is used (torch.manual_seed seeds
    it); a CPU generator with CUDA inputs gives the same mask as with CPU inputs.
    """
    if generator is None:
        return torch.randint(2**62, (2,), dtype=torch.int64, device=device)
    seed = torch.randint(2**62, (2,), dtype=torch.int64, device=generator.device,
                         generator=generator)
    return seed.to(device)


def _rows(t: Tensor, width: int) -> Tensor:
    """t as (n, width) with unit column stride: a view whenever the layout allows one."""
    t2 = t.reshape(-1, width)
    if t2.shape[0] > 1 and width > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x, layer_out, A, B, banked=False):
    _checks.tensor(x, "x", min_dim=1)
    _checks.tensor(layer_out, "layer_out", min_dim=1)
    _checks.tensor(A, "A", dim=3 if banked else 2)
    _checks.tensor(B, "B", dim=3 if banked else 2)
    _checks.same_device({"x": x, "layer_out": layer_out, "A": A, "B": B})
    if banked:
        if A.shape[0] != B.shape[0]:
            raise ValueError(f"B: expected a bank of {A.shape[0]} adapters (as A, "
                             f"{tuple(A.shape)}), got {tuple(B.shape)}")
        A, B = A[0], B[0]
    r, d_in = A.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dimension {d_in} (A is (r, d_in) = {tuple(A.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if B.shape[1] != r:
        raise ValueError(f"B: expected shape (d_out, {r}) to match the rank of A {tuple(A.shape)},"
                         f" got {tuple(B.shape)}")
    if r < 1:
        raise ValueError(f"A: expected rank r >= 1, got A of shape {tuple(A.shape)}")
    expected = (*x.shape[:-1], B.shape[0])
    if tuple(layer_out.shape) != expected:
        raise ValueError(f"layer_out: expected shape {expected} (x's leading dimensions, then "
                         f"d_out = B.shape[0]), got {tuple(layer_out.shape)}")


def _row_ids(adapter_ids, x: Tensor, adapters: int) -> Tensor:
    """adapter_ids as int64 (n,) per row: given per row (x.shape[:-1]) or per sequence
    (x.shape[0],) for inputs with a sequence dimension."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected an integer torch.Tensor, got "
                        f"{type(adapter_ids).__name__}")
    if adapter_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"adapter_ids: expected an integer tensor, got dtype "
                         f"{str(adapter_ids.dtype).replace('torch.', '')}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids: expected a tensor on {x.device} (as x), got "
                         f"{adapter_ids.device}")
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
    if torch.compiler.is_compiling():  # a traced graph checks on the device instead
        torch._assert_async(((ids >= -1) & (ids < adapters)).all(), expected)
    elif ids.numel():
        low, high = int(ids.min()), int(ids.max())  # one device sync: bad ids must not reach a kernel
        if low < -1 or high >= adapters:
            raise ValueError(f"{expected}, got values in [{low}, {high}]")
    return ids


def lor2c_residual(x: Tensor, layer_out: Tensor, A: Tensor, B: Tensor, scale: float = 1.0,
                   dropout_p: float = 0.0, training: bool = True,
                   generator: Optional[torch.Generator] = None,
                   backend: Optional[str] = None, *,
                   adapter_ids: Optional[Tensor] = None) -> Tensor:
    """layer_out + scale * dropout(x) @ A.T @ B.T, fused, with its backward.

    x: (..., d_in); layer_out: (..., d_out) with the same leading dimensions; A: (r, d_in);
    B: (d_out, r). Activations float32, float16 or bfloat16 (float64 on the reference backend);
    the weights either in the activations' dtype or float32 (mixed precision: their gradients
    come back in their own dtype). Dropout applies when training and dropout_p > 0; its mask
    is drawn from `generator` (or the default generator of x's device) and never stored.
    backend: None picks the fastest for the inputs; "reference", "cpu", "triton" or "cuda"
    forces one, and raises if it cannot run here, saying why.

    Multi-adapter batches: with A a bank (G, r, d_in), B a bank (G, d_out, r) and adapter_ids
    (one per row, or one per sequence), row i uses A[ids[i]] and B[ids[i]] inside one kernel
    launch; rows with id -1 get layer_out unchanged. Gradients land in the used bank rows.
    """
    banked = adapter_ids is not None
    _check(x, layer_out, A, B, banked)
    p = _checks.probability(dropout_p, "dropout_p") if training else 0.0
    scale = _checks.finite(scale, "scale")
    if torch.is_autocast_enabled(x.device.type):
        # What the expression does under autocast: matmuls in low precision, then the residual
        # add in layer_out's precision. Computing in fp32 is at least as accurate.
        if x.dtype != layer_out.dtype:
            x = x.to(layer_out.dtype)
        if A.dtype not in (x.dtype, torch.float32):
            A, B = A.float(), B.float()
    _checks.same_dtype(x, "x", layer_out, "layer_out")
    _checks.same_dtype(A, "A", B, "B")
    _checks.weight_dtype(A, "A", x.dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    name = backends.select(backend, x.device, x.dtype, op="lor2c_multi" if banked else "lor2c")
    d_in, d_out = A.shape[-1], B.shape[-2]
    if x.numel() // max(d_in, 1) >= 2**32:
        raise ValueError(f"x: at most 2^32 - 1 rows are supported, got {x.numel() // d_in}")
    ids = _row_ids(adapter_ids, x, A.shape[0]) if banked else None
    seed = (draw_seed(generator, x.device) if p > 0.0
            else torch.zeros(2, dtype=torch.int64, device=x.device))
    with torch.autocast(x.device.type, enabled=False):
        if banked:
            out, _ = lor2c_multi_fwd(_rows(x, d_in), _rows(layer_out, d_out), A, B, ids, scale, p,
                                     seed, name)
        else:
            out, _ = lor2c_fwd(_rows(x, d_in), _rows(layer_out, d_out), A, B, scale, p, seed,
                               name)
    return out.view(*layer_out.shape[:-1], d_out)
