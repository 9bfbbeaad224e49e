"""ShareLoR2C weight banks and multi-adapter batches on every backend (docs/math.md section 2)."""

import math

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops import backends
from lor2c_ops.modules.share import ShareLoR2C
from lor2c_ops.ops import lor2c as op

from backend_devices import skip_unless_runnable
from oracle import assert_within_twice_torch, seed_for
from lor2c_ops.ref.philox import dropout_mask


def _stack(device, dtype, d, layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [
        (torch.randn(d, d, generator=gen) / math.sqrt(d)).to(device, dtype) for _ in range(layers)
    ]
    h0 = torch.randn(6, 5, d, generator=gen).to(device, dtype)
    return weights, h0


def _run_stack(weights, h0, adapter_call):
    """h_{i+1} = tanh(h_i W_i) + adapter_i(h_i, .), then a scalar loss."""
    h = h0
    for i, w in enumerate(weights):
        h = adapter_call(i, h, torch.tanh(h @ w))
    return h.float().square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_banks_match_separate_weights(backend, dtype):
    device = skip_unless_runnable(backend)
    d, r, layers = 48, 4, 4
    share = ShareLoR2C(layers, d, r=r, dropout=0.0, backend=backend).to(device, dtype)
    torch.nn.init.normal_(share.B_bank)
    A = torch.nn.Parameter(share.A_bank.detach()[0].clone())
    Bs = [torch.nn.Parameter(share.B_bank.detach()[i].clone()) for i in range(layers)]
    weights, h0 = _stack(device, dtype, d, layers)

    loss_bank = _run_stack(weights, h0, lambda i, h, out: share(i, h, out))
    loss_bank.backward()
    loss_sep = _run_stack(
        weights,
        h0,
        lambda i, h, out: lo.lor2c_residual(h, out, A, Bs[i], share.scaling, backend=backend),
    )
    loss_sep.backward()

    assert torch.equal(loss_bank, loss_sep)
    assert torch.equal(share.A_bank.grad[0], A.grad), "shared A: the sum of every layer's share"
    for i in range(layers):
        assert torch.equal(share.B_bank.grad[i], Bs[i].grad)


def test_parameter_count_and_initialisation():
    L, d_in, d_out, r = 12, 64, 48, 8
    share = ShareLoR2C(L, d_in, d_out, r=r, alpha=16)
    assert share.A_bank.shape == (1, r, d_in) and share.B_bank.shape == (L, d_out, r)
    trainable = sum(p.numel() for p in share.parameters() if p.requires_grad)
    assert trainable == r * d_in + L * d_out * r
    assert torch.count_nonzero(share.B_bank) == 0
    assert share.A_bank.abs().max() <= 1 / math.sqrt(d_in)
    x, out = torch.randn(3, d_in), torch.randn(3, d_out)
    assert torch.equal(share(5, x, out), out), "a fresh adapter changes nothing"
    assert "num_adapters=12" in repr(share)


def test_several_groups(backend):
    device = skip_unless_runnable(backend)
    groups = [0, 0, 1, 1, 2]
    share = ShareLoR2C(5, 24, 16, r=3, groups=groups, backend=backend).to(device)
    torch.nn.init.normal_(share.B_bank)
    assert share.A_bank.shape == (3, 3, 24)
    x = torch.randn(7, 24, device=device)
    for index, group in enumerate(groups):
        share.zero_grad()
        out = share(index, x, torch.zeros(7, 16, device=device))
        want = x @ share.A_bank[group].T @ share.B_bank[index].T * share.scaling
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        used = torch.zeros(3, dtype=torch.bool)
        used[group] = True
        assert torch.count_nonzero(share.A_bank.grad[~used]) == 0
        assert torch.count_nonzero(share.A_bank.grad[group]) > 0
        assert torch.count_nonzero(share.B_bank.grad[torch.arange(5) != index]) == 0


# --- multi-adapter batches ---------------------------------------------------------------------


def _multi_inputs(device, dtype, wdtype, n=53, d_in=40, d_out=36, r=5, G=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen).to(device, dtype)
    layer_out = torch.randn(n, d_out, generator=gen).to(device, dtype)
    A = (torch.randn(G, r, d_in, generator=gen) / math.sqrt(d_in)).to(device, wdtype)
    B = torch.randn(G, d_out, r, generator=gen).to(device, wdtype)
    g = torch.randn(n, d_out, generator=gen).to(device, dtype)
    # unsorted, with gaps (adapters 1 and 4 absent) and rows without an adapter
    ids = torch.tensor([5, 0, -1, 3, 2, 0, 5, -1, 3] * 6, device=device)[:n]
    return x, layer_out, A, B, g, ids


def _loop_over_adapters(x, layer_out, A, B, ids, scale, mask, g, dtype):
    """The multi-adapter batch as a Python loop over adapters, in `dtype`, by autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, layer_out, A, B)]
    xx, ll, AA, BB = leaves
    xd = xx if mask is None else xx * mask.to(dtype)
    out = ll.clone()
    for a in ids.unique().tolist():
        if a < 0:
            continue
        rows = (ids == a).nonzero().squeeze(1)
        out = out.index_add(0, rows, scale * (xd[rows] @ AA[a].T @ BB[a].T))
    out.backward(g.to(dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["fp32", "bf16", "bf16-fp32w"],
)
def test_multi_adapter_matches_loop(backend, dtypes, p):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, g, ids = _multi_inputs(device, *dtypes)
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer_out, A, B)]
    out = lo.lor2c_residual(
        *leaves,
        scale=0.5,
        dropout_p=p,
        adapter_ids=ids,
        backend=backend,
        generator=torch.Generator().manual_seed(8),
    )
    out.backward(g)
    mask = dropout_mask(seed_for(8, device), *x.shape, p, dtype=torch.float64) if p else None
    o64, g64 = _loop_over_adapters(x, layer_out, A, B, ids, 0.5, mask, g, torch.float64)
    o_lp, g_lp = _loop_over_adapters(x, layer_out, A, B, ids, 0.5, mask, g, x.dtype)
    assert_within_twice_torch("out", out, o64, o_lp)
    for name, got, want, plain in zip(
        ("dx", "dlayer_out", "dA_bank", "dB_bank"), [t.grad for t in leaves], g64, g_lp
    ):
        assert_within_twice_torch(name, got, want, plain)
    unused = torch.tensor([1, 4], device=device)
    assert torch.count_nonzero(leaves[2].grad[unused]) == 0
    assert torch.count_nonzero(leaves[3].grad[unused]) == 0
    none_rows = ids == -1
    assert torch.equal(out[none_rows], layer_out[none_rows])
    assert torch.count_nonzero(leaves[0].grad[none_rows]) == 0
    assert leaves[2].grad.dtype == dtypes[1]


@pytest.mark.parametrize(
    "n, d_in, d_out, r, G, ids",
    [
        (150, 70, 37, 70, 3, [2, 2, 0, -1, 2, 0, 2]),  # r > 64: rank chunks; one adapter absent
        (70, 33, 20, 8, 1, [0, 0, -1]),  # G = 1, more rows than a block
        (9, 12, 10, 4, 4, [-1]),  # no row has an adapter
    ],
    ids=["r70", "G1", "all-none"],
)
def test_multi_adapter_shapes(backend, n, d_in, d_out, r, G, ids):
    device = skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(5)
    # rows of x and layer_out with a stride larger than their width
    x = torch.randn(n, d_in + 3, generator=gen).to(device)[:, :d_in]
    layer_out = torch.randn(n, d_out + 1, generator=gen).to(device)[:, :d_out]
    A = (torch.randn(G, r, d_in, generator=gen) / math.sqrt(d_in)).to(device)
    B = torch.randn(G, d_out, r, generator=gen).to(device)
    g = torch.randn(n, d_out, generator=gen).to(device)
    ids = torch.tensor(ids, device=device).repeat(n)[:n]
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer_out, A, B)]
    out = lo.lor2c_residual(
        *leaves,
        scale=0.7,
        dropout_p=0.2,
        adapter_ids=ids,
        backend=backend,
        generator=torch.Generator().manual_seed(4),
    )
    out.backward(g)
    mask = dropout_mask(seed_for(4, device), n, d_in, 0.2, dtype=torch.float64)
    o64, g64 = _loop_over_adapters(x, layer_out, A, B, ids, 0.7, mask, g, torch.float64)
    o32, g32 = _loop_over_adapters(x, layer_out, A, B, ids, 0.7, mask, g, torch.float32)
    # without any adapter row, autograd leaves x, A and B without a gradient: zeros
    g64 = [
        torch.zeros_like(t, dtype=torch.float64) if gr is None else gr
        for t, gr in zip((x, layer_out, A, B), g64)
    ]
    g32 = [torch.zeros_like(t) if gr is None else gr for t, gr in zip((x, layer_out, A, B), g32)]
    assert_within_twice_torch("out", out, o64, o32)
    for name, got, want, plain in zip(
        ("dx", "dlayer_out", "dA_bank", "dB_bank"), [t.grad for t in leaves], g64, g32
    ):
        assert_within_twice_torch(name, got, want, plain)
    used = torch.zeros(G, dtype=torch.bool, device=device)
    used[ids[ids >= 0]] = True
    assert torch.count_nonzero(leaves[2].grad[~used]) == 0
    assert torch.count_nonzero(leaves[3].grad[~used]) == 0


def test_multi_adapter_per_sequence_ids(backend):
    device = skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 16, generator=gen).to(device)
    layer_out = torch.randn(4, 7, 12, generator=gen).to(device)
    A = torch.randn(3, 2, 16, generator=gen).to(device)
    B = torch.randn(3, 12, 2, generator=gen).to(device)
    seq_ids = torch.tensor([2, -1, 0, 2], device=device)
    out = lo.lor2c_residual(x, layer_out, A, B, adapter_ids=seq_ids, backend=backend)
    for s, a in enumerate(seq_ids.tolist()):
        want = layer_out[s] if a < 0 else layer_out[s] + x[s] @ A[a].T @ B[a].T
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-5)


def test_multi_adapter_mask_is_the_plain_ops_mask(backend):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, _, _ = _multi_inputs(device, torch.float32, torch.float32)
    ids = torch.full((x.shape[0],), 2, device=device)
    kw = dict(scale=1.0, dropout_p=0.4, backend=backend)
    multi = lo.lor2c_residual(
        x, layer_out, A, B, adapter_ids=ids, generator=torch.Generator().manual_seed(3), **kw
    )
    plain = lo.lor2c_residual(
        x, layer_out, A[2], B[2], generator=torch.Generator().manual_seed(3), **kw
    )
    torch.testing.assert_close(multi, plain, rtol=1e-6, atol=1e-6)


def test_share_module_multi_adapter_batch():
    share = ShareLoR2C(3, 10, groups=[0, 1, 2])
    torch.nn.init.normal_(share.B_bank)
    x = torch.randn(5, 10)
    ids = torch.tensor([2, 0, -1, 1, 2])
    out = share(ids, x, torch.zeros(5, 10))
    for i, a in enumerate(ids.tolist()):
        want = (
            torch.zeros(10)
            if a < 0
            else share.scaling * x[i] @ share.A_bank[a].T @ share.B_bank[a].T
        )
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one A per adapter"):
        ShareLoR2C(3, 10)(ids, x, torch.zeros(5, 10))


def test_opcheck_multi(backend):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, g, ids = _multi_inputs(device, torch.float32, torch.float32, n=20)
    seed = seed_for(2, device)
    args = [t.detach().requires_grad_() for t in (x, layer_out, A, B)]
    for p in (0.0, 0.2):
        torch.library.opcheck(op.lor2c_fwd, (*args, ids, 0.7, p, seed, backend))
        _, t = op.lor2c_fwd(x, layer_out, A, B, ids, 0.7, p, seed, backend)
        torch.library.opcheck(
            op.lor2c_bwd, (g, x, t, A, B, ids, 0.7, p, seed, backend, True, True, True)
        )


def test_compile_fullgraph_banked_and_multi(backend):
    device = skip_unless_runnable(backend)
    share = ShareLoR2C(3, 16, groups=[0, 1, 2], backend=backend).to(device)
    torch.nn.init.normal_(share.B_bank)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    ids = torch.tensor([1, -1], device=device)

    def f(x):
        h = share(0, x, torch.tanh(x))
        return share(ids, h, h)

    torch._dynamo.reset()
    y_c = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    y_c.sum().backward()
    grads_c = (x.grad.clone(), share.A_bank.grad.clone(), share.B_bank.grad.clone())
    x.grad = None
    share.zero_grad()
    y = f(x)
    y.sum().backward()
    torch.testing.assert_close(y_c, y)
    for a, b in zip(grads_c, (x.grad, share.A_bank.grad, share.B_bank.grad)):
        torch.testing.assert_close(a, b)


def test_cuda_backend_has_the_multi_kernels():
    """A CUDA build registers the multi-adapter kernels: the cuda backend accepts the op."""
    device = skip_unless_runnable("cuda")
    assert backends.BACKENDS["cuda"].refuses(device, torch.float32, "lor2c_multi") is None


def test_compiled_backend_names_missing_kernels(monkeypatch):
    """An extension without one op's kernels for a device is refused for that op, saying so."""
    present = {("lor2c_fwd", "CUDA"), ("lor2c_bwd", "CUDA"), ("lor2c_multi_fwd", "CUDA")}
    monkeypatch.setattr(backends._ext, "has_kernel", lambda op, key: (op, key) in present)
    cuda = backends.Backend("cuda", (torch.float32,), lambda: None, lambda device: None)
    device = torch.device("cuda")
    assert cuda.refuses(device, torch.float32, "lor2c") is None
    reason = cuda.refuses(device, torch.float32, "lor2c_multi")
    assert reason is not None and "no CUDA kernel for lor2c_multi" in reason
    assert "lor2c_multi_bwd" in reason and "lor2c_multi_fwd" not in reason


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.tensor([0, 1, 6, 2]), ValueError, r"adapter_ids: expected values in \[-1, 6\)"),
        (torch.tensor([0, -2, 1, 2]), ValueError, r"adapter_ids: expected values in \[-1, 6\)"),
        (
            torch.tensor([0.0, 1.0, 2.0, 3.0]),
            ValueError,
            r"adapter_ids: expected an integer tensor",
        ),
        (torch.tensor([0, 1, 2]), ValueError, r"adapter_ids: expected shape \(4,\)"),
        ([0, 1, 2, 3], TypeError, r"adapter_ids: expected an integer torch.Tensor"),
    ],
)
def test_bad_adapter_ids(no_kernel, ids, error, match):
    x, layer_out = torch.randn(4, 8), torch.randn(4, 6)
    A, B = torch.randn(6, 2, 8), torch.randn(6, 6, 2)
    with pytest.raises(error, match=match):
        lo.lor2c_residual(x, layer_out, A, B, adapter_ids=ids)


def test_bad_banks_and_indices(no_kernel):
    x, layer_out = torch.randn(4, 8), torch.randn(4, 6)
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"B: expected a bank of 6 adapters"):
        lo.lor2c_residual(x, layer_out, torch.randn(6, 2, 8), torch.randn(5, 6, 2), adapter_ids=ids)
    with pytest.raises(ValueError, match=r"A: expected a 3-D tensor"):
        lo.lor2c_residual(x, layer_out, torch.randn(2, 8), torch.randn(6, 6, 2), adapter_ids=ids)
    share = ShareLoR2C(3, 8, 6, r=2)
    with pytest.raises(ValueError, match=r"index: expected 0 <= index < 3, got 3"):
        share(3, x, layer_out)
    with pytest.raises(TypeError, match=r"index: expected an int"):
        share(1.0, x, layer_out)
    with pytest.raises(ValueError, match=r"groups: expected one group id per adapter"):
        ShareLoR2C(3, 8, groups=[0, 1])
    with pytest.raises(ValueError, match=r"groups: expected group ids 0..G-1"):
        ShareLoR2C(3, 8, groups=[0, 2, 2])
