"""Every op's forward + backward can be captured in a CUDA graph and replayed: no host
synchronisation on the path, results equal to eager, and a fresh dropout mask on each replay
when the seed comes from the CUDA generator. Needs a GPU (skipped without one)."""

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ("triton", "cuda")


def _runnable(backend, op):
    reason = backends.BACKENDS[backend].refuses(torch.device("cuda"), torch.bfloat16, op)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _calls(kind, backend):
    torch.manual_seed(0)
    dev = "cuda"
    dt = torch.bfloat16
    n, d, r, G = 96, 128, 8, 3
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    layer_out = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    if kind == "plain":
        _runnable(backend, "lor2c")
        A = torch.randn(r, d, device=dev, requires_grad=True)
        B = torch.randn(d, r, device=dev, requires_grad=True)
        leaves = (x, layer_out, A, B)
        fn = lambda p: lo.lor2c_residual(x, layer_out, A, B, 0.5, p, backend=backend)
    elif kind == "banked":
        _runnable(backend, "lor2c")
        share = lo.ShareLoR2C(G, d, r=r, dropout=0.0).to(dev)
        torch.nn.init.normal_(share.B_bank)
        leaves = (x, layer_out, share.A_bank, share.B_bank)
        fn = lambda p: lo.lor2c_residual(
            x, layer_out, share.A_bank[0], share.B_bank[1], 0.5, p, backend=backend
        )
    elif kind == "multi":
        _runnable(backend, "lor2c_multi")
        A = torch.randn(G, r, d, device=dev, requires_grad=True)
        B = torch.randn(G, d, r, device=dev, requires_grad=True)
        ids = (torch.arange(n, device=dev) % (G + 1)) - 1
        leaves = (x, layer_out, A, B)
        fn = lambda p: lo.lor2c_residual(
            x, layer_out, A, B, 0.5, p, backend=backend, adapter_ids=ids
        )
    else:
        _runnable(backend, "dcft")
        W = torch.randn(d, d, device=dev, dtype=dt)
        b = torch.randn(d, device=dev, dtype=dt)
        A = torch.randn(1, d // 2, device=dev, requires_grad=True)
        B = torch.randn(d // 2, 1, device=dev, requires_grad=True)
        C = torch.randn(2, 2, device=dev, requires_grad=True)
        leaves = (x, A, B, C)
        fn = lambda p: lo.dcft_linear(x, W, b, A, B, C, 0.5, dropout_p=p, backend=backend)
    return leaves, fn


def _step(fn, leaves, g, p):
    out = fn(p)
    grads = torch.autograd.grad(out, leaves, g)
    return (out,) + tuple(grads)


@pytest.mark.parametrize("kind", ["plain", "banked", "multi", "dcft"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capture_and_replay(backend, kind):
    leaves, fn = _calls(kind, backend)
    g = torch.randn(leaves[0].shape, device="cuda", dtype=torch.bfloat16)  # d_in == d_out
    for p in (0.0, 0.2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: compile kernels, fill caches
                _step(fn, leaves, g, p)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = _step(fn, leaves, g, p)
        graph.replay()
        torch.cuda.synchronize()
        first = [t.clone() for t in static]
        if p == 0.0:
            eager = _step(fn, leaves, g, p)
            for got, want in zip(first, eager):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            graph.replay()
            torch.cuda.synchronize()
            assert not torch.equal(first[0], static[0]), "each replay draws a fresh mask"
