"""The fp64 oracle and the error rule used by the op tests.

A backend's error against the fp64 oracle must be at most twice the error of plain PyTorch
computing the same expression in the same precision (plus a tiny floor for exact cases).
"""

import torch

from lor2c_ops.ops.lor2c import draw_seed
from lor2c_ops.ref import lor2c as ref
from lor2c_ops.ref.philox import dropout_mask


def seed_for(generator_seed: int, device) -> torch.Tensor:
    """The (seed, offset) tensor that lor2c_residual draws from Generator().manual_seed(s)."""
    return draw_seed(torch.Generator().manual_seed(generator_seed), device)


def eager_with_grads(x, layer_out, A, B, scale, mask, g, dtype):
    """Output and (dx, dlo, dA, dB) of the plain expression, computed by autograd in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, layer_out, A, B)]
    m = None if mask is None else mask.to(dtype)
    out = ref.eager(*leaves, scale, m)
    out.backward(g.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def expected(x, layer_out, A, B, scale, p, generator_seed, g):
    """(fp64 oracle, plain-PyTorch-in-x.dtype) outputs and gradients for a call with dropout p
    drawn from Generator().manual_seed(generator_seed)."""
    n, d = x.reshape(-1, x.shape[-1]).shape
    mask = None
    if p > 0:
        mask = dropout_mask(
            seed_for(generator_seed, x.device), n, d, p, dtype=torch.float64
        ).reshape(x.shape)
    oracle = eager_with_grads(x, layer_out, A, B, scale, mask, g, torch.float64)
    plain = eager_with_grads(x, layer_out, A, B, scale, mask, g, x.dtype)
    return oracle, plain


def assert_within_twice_torch(name, actual, oracle, plain):
    actual, oracle, plain = actual.double(), oracle.double(), plain.double()
    assert actual.shape == oracle.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    )
    err = (actual - oracle).abs().max().item() if actual.numel() else 0.0
    torch_err = (plain - oracle).abs().max().item() if actual.numel() else 0.0
    floor = 1e-6 * (oracle.abs().max().item() if oracle.numel() else 0.0) + 1e-7
    assert err <= 2 * torch_err + floor, (
        f"{name}: max error {err:.3g} vs fp64 exceeds twice plain PyTorch's {torch_err:.3g} "
        f"(+ floor {floor:.2g})"
    )
