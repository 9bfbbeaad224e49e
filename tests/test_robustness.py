"""What held under the new-user and hostile-input probes of issue 13 stays held: 4 threads give
bit-identical results, 1000 calls leak nothing. (Interrupted saves, path traversal and pickle
refusal are in test_adapters_io.py.)"""

import gc
import os
import threading

import pytest
import torch

import lor2c_ops as lo


def _inputs(n=64, d=32, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    layer_out = torch.randn(n, d, generator=g)
    A = torch.randn(r, d, generator=g) * 0.1
    B = torch.randn(d, r, generator=g) * 0.1
    return x, layer_out, A, B


def _step(x, layer_out, A, B, seed):
    """Forward + backward with dropout (seeded): output and every gradient."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    gen = torch.Generator().manual_seed(seed)
    y = lo.lor2c_residual(x, layer_out, A, B, scale=2.0, dropout_p=0.1, generator=gen)
    y.backward(torch.cos(y.detach()))
    return [y.detach(), x.grad, A.grad, B.grad]


def test_four_threads_give_bit_identical_results():
    inputs = _inputs(n=256)
    expected = {seed: _step(*inputs, seed) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = [_step(*inputs, seed) for _ in range(5)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for seed, runs in results.items():
        for run in runs:
            assert all(torch.equal(a, b) for a, b in zip(run, expected[seed])), seed
    assert len(results) == 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_a_thousand_calls_leak_nothing():
    import tracemalloc

    inputs = _inputs()
    for seed in range(50):  # warm up: caches, the allocator, autograd's first graphs
        _step(*inputs, seed)
    gc.collect()
    tracemalloc.start()
    rss0 = _rss_bytes()
    py0 = tracemalloc.get_traced_memory()[0]
    for seed in range(1000):
        _step(*inputs, seed)
    gc.collect()
    py1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss1 = _rss_bytes()
    # one call's tensors are ~10 KB: a leak of one per call would be ~10 MB of RSS
    assert py1 - py0 < 256 * 1024, f"Python objects grew by {py1 - py0} bytes"
    assert rss1 - rss0 < 8 * 1024 * 1024, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MB"
