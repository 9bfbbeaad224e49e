"""The op layer around the kernels, on every backend: dynamic-shape compilation, empty batches,
forward-mode AD and torch.func transforms refused clearly, scale arguments, meta tensors, the
cached backend choice. (Values against the fp64 oracle: tests/test_lor2c.py, test_share.py,
test_dcft.py.)"""

import math

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops.ops import _common

from backend_devices import skip_unless_runnable


def _lor2c_inputs(device, n=5, d=16, r=4, banked=False, G=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    layer_out = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    shape_a, shape_b = ((G, r, d), (G, d, r)) if banked else ((r, d), (d, r))
    A = (torch.randn(*shape_a, generator=gen) / math.sqrt(d)).to(device).requires_grad_()
    B = torch.randn(*shape_b, generator=gen).to(device).requires_grad_()
    return x, layer_out, A, B


def _dcft_inputs(device, n=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=gen).to(device).requires_grad_()
    W = torch.randn(16, 16, generator=gen).to(device)
    b = torch.randn(16, generator=gen).to(device)
    A = torch.randn(2, 8, generator=gen).to(device).requires_grad_()
    B = torch.randn(8, 2, generator=gen).to(device).requires_grad_()
    C = torch.randn(2, 2, generator=gen).to(device).requires_grad_()
    return x, W, b, A, B, C


def _calls(kind, backend, device):
    """(leaves, fn(x-like leaves..., scale) -> output) for each kind of call."""
    if kind == "dcft":
        x, W, b, A, B, C = _dcft_inputs(device)
        return (x, A, B, C), (
            lambda x, A, B, C, s: lo.dcft_linear(x, W, b, A, B, C, s, backend=backend)
        )
    banked = kind == "multi"
    x, layer_out, A, B = _lor2c_inputs(device, banked=banked)
    if kind == "multi":
        ids = torch.tensor([0, 2, -1, 1, 0], device=device)
        return (x, layer_out, A, B), (
            lambda x, lo_, A, B, s: lo.lor2c_residual(
                x, lo_, A, B, s, backend=backend, adapter_ids=ids[: x.shape[0]]
            )
        )
    return (x, layer_out, A, B), (
        lambda x, lo_, A, B, s: lo.lor2c_residual(x, lo_, A, B, s, backend=backend)
    )


KINDS = ["plain", "multi", "dcft"]


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_dynamic(backend, kind):
    """Variable sequence lengths: one graph with dynamic shapes, forward and backward, and a
    Python-float scale that changes between calls."""
    device = skip_unless_runnable(backend)
    torch._dynamo.reset()  # the lambdas share code objects across tests: no recompile limit
    leaves, fn = _calls(kind, backend, device)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for rows, scale in ((3, 0.5), (5, 1.5), (4, 2.0)):
        sub = [leaves[0][:rows].detach().requires_grad_()]
        rest = list(leaves[1:])
        if kind != "dcft":  # layer_out has x's rows too
            rest[0] = rest[0][:rows].detach().requires_grad_()
        got = compiled(*sub, *rest, scale)
        want = fn(*sub, *rest, scale)
        torch.testing.assert_close(got, want)
        g_got = torch.autograd.grad(got.sum(), sub + [rest[-1]])
        g_want = torch.autograd.grad(want.sum(), sub + [rest[-1]])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(backend, kind):
    device = skip_unless_runnable(backend)
    leaves, fn = _calls(kind, backend, device)
    empty = [leaves[0][:0].detach().requires_grad_()]
    rest = list(leaves[1:])
    if kind != "dcft":
        rest[0] = rest[0][:0].detach().requires_grad_()
    out = fn(*empty, *rest, 0.5)
    assert out.shape[0] == 0
    grads = torch.autograd.grad(out.sum(), empty + rest[-2:])
    assert grads[0].shape == empty[0].shape
    for g, w in zip(grads[1:], rest[-2:]):
        assert g.shape == w.shape and torch.count_nonzero(g) == 0, "weights get exact zeros"


@pytest.mark.parametrize("kind", ["plain", "dcft"])
def test_forward_mode_ad_raises(backend, kind):
    device = skip_unless_runnable(backend)
    leaves, fn = _calls(kind, backend, device)
    primal = leaves[0].detach()
    rest = [t.detach() for t in leaves[1:]]
    with pytest.raises(NotImplementedError, match="Forward-mode AD is not implemented"):
        torch.func.jvp(lambda x: fn(x, *rest, 0.5), (primal,), (torch.ones_like(primal),))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        with torch.autograd.forward_ad.dual_level():
            fn(torch.autograd.forward_ad.make_dual(primal, torch.ones_like(primal)), *rest, 0.5)


@pytest.mark.parametrize("kind", ["plain", "dcft"])
def test_torch_func_transforms_refused_clearly(backend, kind):
    device = skip_unless_runnable(backend)
    leaves, fn = _calls(kind, backend, device)
    primal = leaves[0].detach()
    rest = [t.detach() for t in leaves[1:]]
    with pytest.raises(NotImplementedError, match="torch.func transforms .* are not supported"):
        torch.func.grad(lambda x: fn(x, *rest, 0.5).sum())(primal)


def test_scale_that_requires_grad_is_refused():
    x, layer_out, A, B = _lor2c_inputs("cpu")
    with pytest.raises(TypeError, match="scale: a tensor that requires grad"):
        lo.lor2c_residual(x, layer_out, A, B, torch.tensor(2.0, requires_grad=True))
    with pytest.raises(TypeError, match="scale"):
        lo.lor2c_residual(x, layer_out, A, B, "2")
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        lo.lor2c_residual(x, layer_out, A, B, float("nan"))
    out = lo.lor2c_residual(x, layer_out, A, B, torch.tensor(2.0))  # a plain tensor is a number
    torch.testing.assert_close(out, lo.lor2c_residual(x, layer_out, A, B, 2.0))


def test_huge_scale_overflows_like_eager(backend):
    device = skip_unless_runnable(backend)
    ones = lambda *s: torch.ones(*s, device=device)
    got = lo.lor2c_residual(
        ones(3, 16), ones(3, 16), ones(4, 16), ones(16, 4), 1e38, backend=backend
    )
    want = ones(3, 16) + 1e38 * (ones(3, 16) @ ones(4, 16).T @ ones(16, 4).T)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()


def test_meta_tensors_give_meta_outputs():
    meta = torch.device("meta")
    x = torch.empty(2, 3, 16, device=meta)
    out = lo.lor2c_residual(
        x,
        torch.empty(2, 3, 32, device=meta),
        torch.empty(4, 16, device=meta),
        torch.empty(32, 4, device=meta),
        0.5,
        0.1,
    )
    assert out.device == meta and out.shape == (2, 3, 32) and out.dtype == torch.float32
    assert lo.FusedLoR2C(16, r=4, device=meta)(x, x).shape == (2, 3, 16)
    ids = torch.zeros(2, dtype=torch.int64, device=meta)
    banked = lo.lor2c_residual(
        x,
        x,
        torch.empty(3, 4, 16, device=meta),
        torch.empty(3, 16, 4, device=meta),
        adapter_ids=ids,
    )
    assert banked.device == meta and banked.shape == x.shape
    W = torch.empty(16, 16, device=meta)
    y = lo.dcft_linear(
        x,
        W,
        None,
        torch.empty(1, 8, device=meta),
        torch.empty(8, 1, device=meta),
        torch.empty(2, 2, device=meta),
        0.5,
    )
    assert y.device == meta and y.shape == (2, 3, 16)


def test_backend_choice_is_cached_and_still_explains_refusals():
    x, layer_out, A, B = _lor2c_inputs("cpu")
    lo.lor2c_residual(x, layer_out, A, B)
    assert (None, "cpu", torch.float32, "lor2c") in _common._SELECTED
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        lo.lor2c_residual(x, layer_out, A, B, backend="cuda")


# Which inputs need a gradient: every subset that reaches the kernels differently.
_NEEDS = [(1, 1, 1, 1), (0, 1, 0, 1), (1, 0, 1, 0), (0, 0, 1, 1), (1, 0, 0, 0)]


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3)], ids=lambda s: f"x{len(s) + 1}d")
@pytest.mark.parametrize("needs", _NEEDS, ids=lambda m: "".join(map(str, m)))
def test_lor2c_rows_and_gradient_subsets(backend, lead, needs):
    """N-D activations (rows are taken inside the autograd node: one node, no view nodes) and
    every subset of inputs needing a gradient give the reference backend's values."""
    device = skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(2)
    base = [
        torch.randn(*lead, 16, generator=gen),
        torch.randn(*lead, 12, generator=gen),
        torch.randn(4, 16, generator=gen) / 4,
        torch.randn(12, 4, generator=gen),
    ]
    results = {}
    for name in (backend, "reference"):
        leaves = [t.to(device).requires_grad_(bool(n)) for t, n in zip(base, needs)]
        out = lo.lor2c_residual(*leaves, 1.5, backend=name)
        assert out.shape == (*lead, 12)
        if name == backend:  # the op is the graph's only node above the leaves
            assert all(
                f is None or type(f).__name__ == "AccumulateGrad"
                for f, _ in (out.grad_fn.next_functions)
            )
        out.backward(torch.ones_like(out))
        results[name] = [out.detach().cpu()] + [
            None if t.grad is None else t.grad.cpu() for t in leaves
        ]
    for i, (got, want) in enumerate(zip(results[backend], results["reference"])):
        assert (got is None) == (want is None), i
        if got is not None:
            assert got.shape == want.shape, i
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=lambda s: f"x{len(s) + 1}d")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "needs",
    [(1, 1, 1, 1, 1, 1), (0, 1, 0, 1, 0, 1), (1, 0, 1, 0, 1, 0)],
    ids=lambda m: "".join(map(str, m)),
)
def test_dcft_rows_and_gradient_subsets(backend, lead, bias, needs):
    """The same for dcft_linear, with and without a bias (an absent bias shifts the positions of
    the tensor inputs in a C++ autograd node), the frozen weight and bias needing gradients or
    not."""
    device = skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(3)
    base = [
        torch.randn(*lead, 8, generator=gen),  # d_in = (4 - 1) * 2 + 2
        torch.randn(6, 8, generator=gen),  # d_out = (3 - 1) * 2 + 2
        torch.randn(6, generator=gen) if bias else None,
        torch.randn(2, 4, generator=gen),
        torch.randn(3, 2, generator=gen),
        torch.randn(2, 2, generator=gen),
    ]
    results = {}
    for name in (backend, "reference"):
        leaves = [
            None if t is None else t.to(device).requires_grad_(bool(n)) for t, n in zip(base, needs)
        ]
        out = lo.dcft_linear(*leaves, 1.5, 2, backend=name)
        assert out.shape == (*lead, 6)
        out.backward(torch.ones_like(out))
        results[name] = [out.detach().cpu()] + [
            None if t is None or t.grad is None else t.grad.cpu() for t in leaves
        ]
    for i, (got, want) in enumerate(zip(results[backend], results["reference"])):
        assert (got is None) == (want is None), i
        if got is not None:
            assert got.shape == want.shape, i
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_backend_none_runs_the_expression_where_the_cpu_rule_says_it_is_faster():
    """backends.cpu_loses_to_eager is applied by lor2c_residual(backend=None) on the CPU without
    dropout: the plain expression's graph, the same values; with dropout, or with a forced
    backend, the fused node. The rule fires for bfloat16 from backends.expression_min_rank (64
    with the bf16 kernels, 32 without) on CPUs that multiply bf16 natively, and nowhere else."""
    from lor2c_ops import backends

    if backends.available("cpu")["cpu"] is not None:
        pytest.skip("the cpu backend is not built here")
    gen = torch.Generator().manual_seed(4)
    # a few rows in fp32: once host-bound (sent to the expression), now the fused node
    x, layer_out = torch.randn(2, 16, generator=gen), torch.randn(2, 12, generator=gen)
    A, B = torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen)
    assert backends.cpu_loses_to_eager(4, torch.float32, 0.0) is None
    out = lo.lor2c_residual(x, layer_out, A.requires_grad_(), B, 1.5)
    assert type(out.grad_fn).__name__ != "AddBackward0"
    if not backends._bf16_products():
        pytest.skip("this CPU has no native bf16 products: the rule never fires here")
    dt = torch.bfloat16
    x, layer_out = (
        torch.randn(2, 16, generator=gen).to(dt),
        torch.randn(2, 12, generator=gen).to(dt),
    )
    k = backends.expression_min_rank(dt)
    bf16_kernels = backends.cpu_bf16_kernels() is None
    assert k == (backends._BF16_KERNELS_MIN_RANK if bf16_kernels else backends._GEMM_MIN_RANK)
    assert backends.cpu_loses_to_eager(k - 1, dt, 0.0) is None
    # scaled so that the outputs stay of order one at any k (the tolerances below are absolute)
    A = (torch.randn(k, 16, generator=gen) / 4).to(dt)
    B = (torch.randn(12, k, generator=gen) / k**0.5).to(dt)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    assert backends.cpu_loses_to_eager(k, dt, 0.0) is not None
    plain = lo.lor2c_residual(x, layer_out, A, B, 1.5)
    fused = lo.lor2c_residual(x, layer_out, A, B, 1.5, backend="cpu")
    assert type(plain.grad_fn).__name__ == "AddBackward0"
    assert type(fused.grad_fn).__name__ != "AddBackward0"
    torch.testing.assert_close(plain, fused, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(plain.float().sum(), (x, A, B))
    want = torch.autograd.grad(fused.float().sum(), (x, A, B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=5e-2)
    dropped = lo.lor2c_residual(x, layer_out, A, B, 1.5, 0.1)
    assert type(dropped.grad_fn).__name__ != "AddBackward0"
    lower = lo.lor2c_residual(x, layer_out, A[: k // 2], B[:, : k // 2], 1.5)  # the fused node
    assert backends.cpu_loses_to_eager(k // 2, dt, 0.0) is None
    assert backends.cpu_loses_to_eager(k - 1, dt, 0.0) is None
    assert type(lower.grad_fn).__name__ != "AddBackward0"


# --- the fast entry on CPU tensors (csrc/fast_entry.cpp) ---------------------------------------


def _fast_or_skip():
    if _common.FAST is None:
        pytest.skip("the compiled extension (with its fast entry) is not built here")
    return _common.FAST


def _run(fn, leaves, seed):
    torch.manual_seed(seed)
    out = fn()
    return [out.detach()] + list(torch.autograd.grad(out.sum(), leaves))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["plain", "3d", "multi", "dcft", "dcft-nobias"])
def test_fast_entry_gives_the_python_paths_results(monkeypatch, kind, p):
    """The fast entry runs (it does not decline these calls) and gives bit for bit what the
    Python path gives: the same node, kernels and dropout mask (seed drawn the same way)."""
    fast = _fast_or_skip()
    if kind in ("plain", "3d", "multi"):
        x, lo_, A, B = _lor2c_inputs("cpu", n=12, banked=kind == "multi")
        if kind == "3d":
            x, lo_ = (t.detach().view(3, 4, 16).requires_grad_() for t in (x, lo_))
        ids = torch.tensor([0, 2, -1, 1] * 3) if kind == "multi" else None
        leaves = [x, lo_, A, B]
        args = (x, lo_, A, B, 1.5, p, True, None, "cpu", ids)

        def fn():
            return lo.lor2c_residual(x, lo_, A, B, 1.5, p, backend="cpu", adapter_ids=ids)

        def direct():
            return fast._lor2c(*args)
    else:
        x, W, b, A, B, C = _dcft_inputs("cpu", n=7)
        b = None if kind == "dcft-nobias" else b
        leaves = [x, A, B, C]
        args = (x, W, b, A, B, C, 1.5, None, p, True, None, "cpu")

        def fn():
            return lo.dcft_linear(x, W, b, A, B, C, 1.5, dropout_p=p, backend="cpu")

        def direct():
            return fast._dcft(*args)

    fused = _run(fn, leaves, 7)  # the first call also lets Python allow the fast entry
    assert direct() is not None, "the fast entry declined a common call"
    fused = _run(fn, leaves, 7)
    monkeypatch.setattr(_common, "FAST", None)
    python = _run(fn, leaves, 7)
    for got, want in zip(fused, python):
        assert torch.equal(got, want)


def test_fast_entry_declines_what_the_python_path_must_see():
    """Anything but the common case comes back None (the Python path then raises, or handles
    it): bad shapes, dtypes and devices, other numbers, a generator, other backends, autocast,
    forward-mode AD, tensor subclasses, out-of-range ids."""
    fast = _fast_or_skip()
    x, lo_, A, B = _lor2c_inputs("cpu", n=6)
    lo.lor2c_residual(x, lo_, A, B, 1.0, 0.1, backend="cpu")  # Python allows the entry
    ok = (x, lo_, A, B, 1.0, 0.1, True, None, "cpu", None)
    assert fast._lor2c(*ok) is not None

    def declines(**changes):
        args = list(ok)
        names = ["x", "lo", "A", "B", "scale", "p", "training", "generator", "backend", "ids"]
        for name, value in changes.items():
            args[names.index(name)] = value
        return fast._lor2c(*args) is None

    assert declines(x=x.detach()[:, :15])  # d_in does not match A
    assert declines(lo=lo_.detach()[:5])  # layer_out's rows do not match
    assert declines(A=A.detach()[None])  # a bank without ids
    assert declines(x=x.detach().double(), lo=lo_.detach().double())
    assert declines(A=A.detach().half(), B=B.detach().half())  # fp16 weights, fp32 activations
    assert declines(scale=torch.tensor(1.0))
    assert declines(scale=True)
    assert declines(scale=float("inf"))
    assert declines(p=1.0)
    assert declines(p=-0.1)
    assert declines(training=1)
    assert declines(generator=torch.Generator())
    assert declines(backend="reference")
    assert declines(backend="cuda")
    assert declines(x=x.detach().to("meta"))
    banked = _lor2c_inputs("cpu", n=6, banked=True)
    assert declines(A=banked[2], B=banked[3], ids=torch.tensor([0, 1, 2, 0, 1, 3]))  # id 3 >= G
    assert declines(A=banked[2], B=banked[3], ids=torch.tensor([0.0] * 6))

    class Sub(torch.Tensor):
        pass

    assert declines(x=x.detach().as_subclass(Sub))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast._lor2c(*ok) is None
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        assert declines(x=dual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_entry_leaves_exactly_the_cpu_rule_to_python(dtype):
    """backend=None without dropout: the fast entry declines a call exactly where
    backends.cpu_loses_to_eager may send it to the plain expression (so that Python applies the
    rule), and serves every other one: fp32 at a few rows and rank 32 too. With dropout, with
    backend="cpu" and with a bank of adapters the rule never applies: served."""
    from lor2c_ops import backends

    fast = _fast_or_skip()
    for backend in (None, "cpu"):  # allow (backend, dtype) for one adapter and for banks
        lo.lor2c_residual(*(t.to(dtype) for t in _lor2c_inputs("cpu", n=8)), backend=backend)
        banked = [t.to(dtype) for t in _lor2c_inputs("cpu", n=2, banked=True)]
        lo.lor2c_residual(*banked, backend=backend, adapter_ids=torch.tensor([0, 1]))
    for n in (1, 2, 4, 5, 8, 40, 64, 65, 130):
        for r in (1, 4, 16, 31, 32, 33, 64):
            x = torch.randn(n, 16, dtype=dtype)
            A, B = torch.randn(r, 16, dtype=dtype), torch.randn(16, r, dtype=dtype)
            out = fast._lor2c(x, x, A, B, 1.0, 0.0, True, None, None, None)
            redirected = backends.cpu_loses_to_eager(r, dtype, 0.0) is not None
            assert (out is None) == redirected, (n, r, "declined" if out is None else "served")
            assert fast._lor2c(x, x, A, B, 1.0, 0.1, True, None, None, None) is not None, (n, r)
            assert fast._lor2c(x, x, A, B, 1.0, 0.0, True, None, "cpu", None) is not None, (n, r)
            ids = torch.zeros(n, dtype=torch.long)
            out = fast._lor2c(x, x, A[None], B[None], 1.0, 0.0, True, None, None, ids)
            assert out is not None, (n, r)


class _CountingFast:
    """The fast entry, counting the calls it served (returned an output for)."""

    def __init__(self, fast):
        self.fast, self.served = fast, 0

    def _lor2c(self, *args):
        out = self.fast._lor2c(*args)
        self.served += out is not None
        return out

    def __getattr__(self, name):
        return getattr(self.fast, name)


def test_fast_entry_serves_small_fp32_calls_and_python_runs_the_rule(monkeypatch):
    """Through lor2c_residual(backend=None, p=0): an fp32 call of 2 rows at rank 128 is served by
    the fast entry; a bf16 one at rank 128 (past the rule's rank, backends.expression_min_rank) on
    a CPU with native bf16 products is declined and runs as the plain expression (the rule),
    elsewhere served on the fused node."""
    from lor2c_ops import backends

    counting = _CountingFast(_fast_or_skip())
    monkeypatch.setattr(_common, "FAST", counting)
    for dtype in (torch.float32, torch.bfloat16):
        x, lo_, A, B = (t.to(dtype) for t in _lor2c_inputs("cpu", n=2, r=128))
        lo.lor2c_residual(x, lo_, A, B)  # the first call lets Python allow the entry
        before = counting.served
        out = lo.lor2c_residual(x, lo_, A, B)
        rule = backends.cpu_loses_to_eager(128, dtype, 0.0) is not None
        assert rule == (dtype == torch.bfloat16 and backends._bf16_products())
        assert counting.served == before + (not rule), (dtype, rule)
        assert (type(out.grad_fn).__name__ == "AddBackward0") == rule, (dtype, out.grad_fn)


def test_op_and_kernel_modules_keep_their_annotations_as_objects():
    """pyproject.toml admits torch 2.4 (with triton 3.0): its custom_op cannot infer a schema from
    annotations stored as strings, nor does triton 3.0 see a string `tl.constexpr` (the kernels
    then fail in its interpreter). So no module that defines a library op or a Triton kernel may
    use `from __future__ import annotations` (found on torch 2.4.0: the package did not import)."""
    import pathlib
    import re

    root = pathlib.Path(lo.__file__).parent
    markers = ("torch.library.custom_op", "@triton.jit")
    checked, offenders = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if any(m in text for m in markers):
            checked.append(path.relative_to(root).as_posix())
            if re.search(r"^from __future__ import .*\bannotations\b", text, re.M):
                offenders.append(path.relative_to(root).as_posix())
    assert {"ops/lor2c.py", "ops/dcft.py", "triton/lor2c.py"} <= set(checked), checked
    assert not offenders, f"string annotations in {offenders}: torch 2.4 / triton 3.0 break"
