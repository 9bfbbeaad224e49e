"""DCFT (docs/math.md section 4) on every backend: the fused op against conv_transpose2d in fp64
for the output and all six gradients, dropout, registration (opcheck, torch.compile), a memory
probe proving D is never formed, bad sizes, and the DCFTLinear module (merging, parameters)."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F

import lor2c_ops as lo
from lor2c_ops.ops import dcft as op
from lor2c_ops.ref import dcft as ref
from lor2c_ops.ref.philox import dropout_mask

from backend_devices import skip_unless_runnable
from oracle import assert_within_twice_torch, seed_for

# (leading dims, k, stride, r, m_in, m_out, p): kernel sizes 2, 3, 4, 8, 12; stride == k (the
# fast path) and stride < k (overlapping windows, dividing k or not, stride 1); ranks 1..4;
# d_in != d_out both ways; d past the 16-lane vectors with ragged tails; a 3-D input.
CASES = [
    ((2, 3), 2, 2, 1, 40, 27, 0.0),
    ((37,), 3, 3, 2, 23, 35, 0.25),
    ((29,), 4, 2, 3, 30, 20, 0.0),
    ((19,), 8, 8, 4, 9, 6, 0.25),
    ((17,), 8, 3, 2, 20, 13, 0.0),
    ((13,), 12, 12, 1, 6, 4, 0.25),
    ((11,), 12, 5, 2, 11, 8, 0.1),
    ((23,), 3, 1, 4, 50, 33, 0.0),
]
# (activation dtype, adapter dtype)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}-k{c[1]}-s{c[2]}-r{c[3]}-p{c[6]}"


def make(lead, k, st, r, m_in, m_out, dtype, wdtype, device, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = (m_in - 1) * st + k, (m_out - 1) * st + k
    x = torch.randn(*lead, d_in, generator=gen).to(device, dtype)
    W = (torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)).to(device, dtype)
    b = torch.randn(d_out, generator=gen).to(device, dtype) if bias else None
    A = (torch.randn(r, m_in, generator=gen) / math.sqrt(m_in)).to(device, wdtype)
    B = torch.randn(m_out, r, generator=gen).to(device, wdtype)
    C = torch.randn(k, k, generator=gen).to(device, wdtype)
    g = torch.randn(*lead, d_out, generator=gen).to(device, dtype)
    return x, W, b, A, B, C, g


def run(backend, x, W, b, A, B, C, g, scale, st, p, generator_seed):
    leaves = [
        None if t is None else t.detach().clone().requires_grad_() for t in (x, W, b, A, B, C)
    ]
    out = lo.dcft_linear(
        *leaves,
        scale=scale,
        stride=st,
        dropout_p=p,
        generator=torch.Generator().manual_seed(generator_seed),
        backend=backend,
    )
    out.backward(g)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def published(x, W, b, A, B, C, g, scale, st, mask, dtype):
    """The published approach (D by conv_transpose2d, then x @ D) by autograd, in `dtype`."""
    leaves = [
        None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, W, b, A, B, C)
    ]
    out = ref.eager(*leaves, scale, st, None if mask is None else mask.to(dtype))
    out.backward(g.to(dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def expected(x, W, b, A, B, C, g, scale, st, p, generator_seed):
    mask = None
    if p > 0:
        n, d = x.reshape(-1, x.shape[-1]).shape
        mask = dropout_mask(
            seed_for(generator_seed, x.device), n, d, p, dtype=torch.float64
        ).reshape(x.shape)
    return (
        published(x, W, b, A, B, C, g, scale, st, mask, torch.float64),
        published(x, W, b, A, B, C, g, scale, st, mask, x.dtype),
    )


NAMES = ("dx", "dweight", "dbias", "dA", "dB", "dC")


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_conv_transpose_fp64(backend, case, dtypes):
    device = skip_unless_runnable(backend)
    lead, k, st, r, m_in, m_out, p = case
    x, W, b, A, B, C, g = make(lead, k, st, r, m_in, m_out, *dtypes, device)
    out, grads = run(backend, x, W, b, A, B, C, g, 0.75, st, p, generator_seed=123)
    (o64, g64), (o_plain, g_plain) = expected(x, W, b, A, B, C, g, 0.75, st, p, 123)
    assert out.dtype == x.dtype and out.shape == (*lead, W.shape[0])
    assert_within_twice_torch("out", out, o64, o_plain)
    for name, got, want, plain in zip(NAMES, grads, g64, g_plain):
        assert_within_twice_torch(name, got, want, plain)
    assert [t.dtype for t in grads] == [x.dtype] * 3 + [dtypes[1]] * 3


def test_no_bias_frozen_base_and_noncontiguous_input(backend):
    device = skip_unless_runnable(backend)
    x_full, W, _, A, B, C, g = make(
        (24,), 3, 2, 2, 15, 10, torch.float32, torch.float32, device, bias=False
    )
    x = torch.cat([x_full, x_full[:, :5]], 1)[:, :31]  # a row-strided view (stride 36)
    assert x.stride(0) != x.shape[1]
    xl, Al, Bl, Cl = (t.detach().clone().requires_grad_() for t in (x, A, B, C))
    out = lo.dcft_linear(xl, W, None, Al, Bl, Cl, scale=2.0, stride=2, backend=backend)
    out.backward(g)
    (o64, g64), (o_plain, g_plain) = expected(x, W, None, A, B, C, g, 2.0, 2, 0.0, 0)
    assert_within_twice_torch("out", out.detach(), o64, o_plain)
    for name, got, i in (
        ("dx", xl.grad, 0),
        ("dA", Al.grad, 3),
        ("dB", Bl.grad, 4),
        ("dC", Cl.grad, 5),
    ):
        assert_within_twice_torch(name, got, g64[i], g_plain[i])
    assert W.grad is None


def test_empty_batch(backend):
    device = skip_unless_runnable(backend)
    x, W, b, A, B, C, g = make((0,), 2, 2, 1, 8, 8, torch.float32, torch.float32, device)
    out, grads = run(backend, x, W, b, A, B, C, g, 1.0, 2, 0.5, generator_seed=1)
    assert out.shape == (0, 16)
    assert all(torch.count_nonzero(t) == 0 for t in grads[1:])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64(p):
    gen = torch.Generator().manual_seed(0)
    k, st, r, m_in, m_out = 3, 2, 2, 4, 3
    shapes = [
        (2, 3, (m_in - 1) * st + k),
        ((m_out - 1) * st + k, (m_in - 1) * st + k),
        ((m_out - 1) * st + k,),
        (r, m_in),
        (m_out, r),
        (k, k),
    ]
    args = [torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True) for s in shapes]

    def f(*a):  # a fixed generator seed: the same mask at every evaluation
        return lo.dcft_linear(
            *a,
            scale=0.5,
            stride=st,
            dropout_p=p,
            backend="reference",
            generator=torch.Generator().manual_seed(3),
        )

    assert torch.autograd.gradcheck(f, args)


# --- the delta weight --------------------------------------------------------------------------


@pytest.mark.parametrize("k, st", [(2, 2), (3, 3), (4, 2), (12, 5), (3, 1)])
def test_dcft_delta_is_conv_transpose_and_kron(k, st):
    gen = torch.Generator().manual_seed(k * 10 + st)
    A = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    B = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    C = torch.randn(k, k, dtype=torch.float64, generator=gen)
    D = lo.dcft_delta(A, B, C, stride=st)
    want = F.conv_transpose2d((A.T @ B.T)[None, None], C[None, None], stride=st)[0, 0]
    assert D.shape == ((7 - 1) * st + k, (5 - 1) * st + k)
    torch.testing.assert_close(D, want)
    if st == k:
        torch.testing.assert_close(D, torch.kron(A.T @ B.T, C))
    # the fused op is x @ D on top of the linear
    x = torch.randn(4, D.shape[0], dtype=torch.float64, generator=gen)
    W = torch.zeros(D.shape[1], D.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        lo.dcft_linear(x, W, None, A, B, C, stride=st, backend="reference"), x @ D
    )


def test_default_stride_is_kernel_size():
    A, B, C = torch.randn(2, 5), torch.randn(4, 2), torch.randn(3, 3)
    assert lo.dcft_delta(A, B, C).shape == (15, 12)
    torch.testing.assert_close(lo.dcft_delta(A, B, C), lo.dcft_delta(A, B, C, stride=3))


# --- dropout -----------------------------------------------------------------------------------


def _identity_adapter(d, k, device):
    """A, B, C with D = I (stride k, r = m = d / k, M = I, C = I) and a zero base weight."""
    m = d // k
    eye = torch.eye(m, device=device)
    return torch.zeros(d, d, device=device), eye, eye.clone(), torch.eye(k, device=device)


def test_mask_is_lor2c_mask_in_forward_and_backward(backend):
    device = skip_unless_runnable(backend)
    n, d, k, p = 64, 96, 2, 0.3
    W, A, B, C = _identity_adapter(d, k, device)
    x = torch.ones(n, d, device=device, requires_grad=True)
    out = lo.dcft_linear(
        x,
        W,
        None,
        A,
        B,
        C,
        dropout_p=p,
        backend=backend,
        generator=torch.Generator().manual_seed(99),
    )
    out.backward(torch.ones_like(out))
    eye = torch.eye(d, device=device)
    lor2c = lo.lor2c_residual(
        torch.ones(n, d, device=device),
        torch.zeros(n, d, device=device),
        eye,
        eye,
        dropout_p=p,
        generator=torch.Generator().manual_seed(99),
    )
    expect = dropout_mask(seed_for(99, "cpu"), n, d, p) == 0
    assert 0 < expect.sum() < expect.numel()
    assert torch.equal((out.detach() == 0).cpu(), expect), "forward mask differs from Philox's"
    assert torch.equal((x.grad == 0).cpu(), expect), "backward mask differs from the forward's"
    assert torch.equal((lor2c == 0).cpu(), expect), "the same seed gives LoR2C the same mask"
    kept = out.detach()[out.detach() != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))


def test_eval_mode_needs_no_mask(backend):
    device = skip_unless_runnable(backend)
    x, W, b, A, B, C, _ = make((9,), 2, 2, 2, 10, 10, torch.float32, torch.float32, device)
    off = lo.dcft_linear(x, W, b, A, B, C, dropout_p=0.9, training=False, backend=backend)
    zero = lo.dcft_linear(x, W, b, A, B, C, dropout_p=0.0, backend=backend)
    assert torch.equal(off, zero)


# --- memory: D (d_in x d_out) is never saved nor allocated --------------------------------------


def _allocations(fn, device):
    """The sizes (bytes) of the allocations made while fn runs, kernels' own included."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    sizes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None and size > 0:
            sizes.append(size)
    return sizes


def test_memory_probe_no_d_in_x_d_out_tensor(backend):
    device = skip_unless_runnable(backend)
    n, d, k, r = 32, 512, 2, 1
    m = (d - k) // k + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    W = (torch.randn(d, d, generator=gen) / 32).to(device)  # frozen
    b = torch.randn(d, generator=gen).to(device)
    A, B = (torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((r, m), (m, r)))
    C = torch.randn(k, k, generator=gen).to(device).requires_grad_()
    g = torch.randn(n, d, generator=gen).to(device)
    d_bytes = d * d * 4

    def step(fn, *inputs):
        return lambda: torch.autograd.grad(fn(), inputs or (x, A, B, C), g)

    fused = step(lambda: lo.dcft_linear(x, W, b, A, B, C, dropout_p=0.1, backend=backend))
    naive = step(lambda: ref.eager(x, W, b, A, B, C, 1.0, k))
    linear = step(lambda: F.linear(x, W, b), x)  # the frozen layer alone
    fused(), naive(), linear()  # warm up (allocator caches, library workspaces)

    def large(fn):
        return collections.Counter(s for s in _allocations(fn, device) if s >= d_bytes // 4)

    assert max(_allocations(naive, device)) >= d_bytes, "the probe must see the published D"
    # Some BLAS builds pack the frozen W (d_in x d_out) into a workspace of its size inside
    # addmm (seen: torch 2.9.1 on aarch64, oneDNN), whoever calls it: the op may make the
    # allocations the frozen layer alone makes, and no other of a quarter of D or more.
    extra = large(fused) - large(linear)
    assert not extra, f"allocations of D / 4 or more (D: {d_bytes} bytes): {dict(extra)}"

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lo.dcft_linear(x, W, b, A, B, C, dropout_p=0.1, backend=backend)
    by_reference = {t.data_ptr() for t in (x, W, A, B, C)}
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in by_reference)
    assert extra <= n * r * k * 4 + 16, f"saved {extra} bytes besides x and the weights"
    out.sum().backward()


# --- registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(backend, p, with_bias):
    device = skip_unless_runnable(backend)
    x, W, b, A, B, C, g = make(
        (13,), 3, 2, 2, 9, 6, torch.float32, torch.float32, device, bias=with_bias
    )
    seed = seed_for(4, device)
    for t in (x, A, B, C):
        t.requires_grad_()
    torch.library.opcheck(op.dcft_fwd, (x, W, b, A, B, C, 0.5, 2, p, seed, backend))
    _, t = op.dcft_fwd(
        x.detach(), W, b, A.detach(), B.detach(), C.detach(), 0.5, 2, p, seed, backend
    )
    plain = (x.detach(), t, W, A.detach(), B.detach(), C.detach(), 0.5, 2, p, seed, backend)
    torch.library.opcheck(op.dcft_bwd, (g, *plain[:10], backend, True, True, True, True))
    torch.library.opcheck(op.dcft_bwd, (g, *plain[:10], backend, False, True, False, True))


class _Block(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.pre = torch.nn.Linear(12, 24)
        self.dcft = lo.DCFTLinear(
            24, 16, r=2, kernel_size=4, stride=2, alpha=4, dropout=0.1, backend=backend
        )

    def forward(self, h):
        return torch.tanh(self.dcft(torch.relu(self.pre(h))))


def test_torch_compile_fullgraph(backend):
    device = skip_unless_runnable(backend)
    torch.manual_seed(0)
    model = _Block(backend).to(device)
    h = torch.randn(3, 5, 12, device=device, requires_grad=True)
    params = [h] + [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        torch.manual_seed(7)  # the same dropout mask in both runs
        y = fn(h)
        return [y] + list(torch.autograd.grad(y.square().sum(), params))

    torch._dynamo.reset()
    compiler = "inductor" if backend == "cpu" else "aot_eager"
    # fallback_random: inductor draws the dropout seed with eager's RNG, so masks compare equal
    with torch._inductor.config.patch(fallback_random=True):
        compiled = grads(torch.compile(model, backend=compiler, fullgraph=True))
    for a, b in zip(compiled, grads(model)):
        torch.testing.assert_close(a, b)


# --- autocast ----------------------------------------------------------------------------------


def test_autocast_matches_expression(backend):
    device = skip_unless_runnable(backend)
    x, W, b, A, B, C, _ = make((30,), 2, 2, 2, 24, 20, torch.float32, torch.float32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want = ref.eager(x, W, b, A, B, C, 0.5, 2)
        got = lo.dcft_linear(x, W, b, A, B, C, scale=0.5, backend=backend)
    assert got.dtype == want.dtype == torch.bfloat16
    exact = ref.eager(*(t.double() for t in (x, W, b, A, B, C)), 0.5, 2)
    assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 1e-6


# --- bad input ---------------------------------------------------------------------------------


def _good():  # d_in = 10 = (5 - 1) * 2 + 2, d_out = 8 = (4 - 1) * 2 + 2
    return {
        "x": torch.randn(6, 10),
        "weight": torch.randn(8, 10),
        "bias": torch.randn(8),
        "A": torch.randn(3, 5),
        "B": torch.randn(4, 3),
        "C": torch.randn(2, 2),
    }


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        # sizes that do not satisfy d = (m - 1) * stride + k name the sizes that would fit
        (
            {"x": torch.randn(6, 11), "weight": torch.randn(8, 11)},
            ValueError,
            r"d_in = 11 does not fit kernel size k = 2 and stride = 2.*sizes that fit: "
            r"10 \(m = 5\) or 12 \(m = 6\)",
        ),
        (
            {"weight": torch.randn(9, 10), "bias": torch.randn(9)},
            ValueError,
            r"d_out = 9 does not fit .*sizes that fit: 8 \(m = 4\) or 10 \(m = 5\)",
        ),
        (
            {"x": torch.randn(6, 1), "weight": torch.randn(8, 1)},
            ValueError,
            r"d_in = 1 does not fit .*sizes that fit: 2 \(m = 1\)",
        ),
        (
            {"C": torch.randn(3, 3)},
            ValueError,
            r"d_in = 10 does not fit kernel size k = 3 and stride = 3.*9 \(m = 3\) or 12 \(m = 4\)",
        ),
        (
            {"stride": 1},
            ValueError,
            r"A: expected shape \(3, 9\) for d_in = 10 = \(9 - 1\) \* 1 \+ 2",
        ),
        ({"A": torch.randn(3, 6)}, ValueError, r"A: expected shape \(3, 5\) for d_in = 10"),
        ({"B": torch.randn(5, 3)}, ValueError, r"B: expected shape \(4, 3\) for d_out = 8"),
        ({"stride": 3}, ValueError, r"stride: expected an int in 1..2"),
        ({"stride": 0}, ValueError, r"stride: expected an int in 1..2"),
        ({"stride": 2.0}, TypeError, r"stride: expected an int"),
        ({"C": torch.randn(2, 3)}, ValueError, r"C: expected a square \(k, k\) kernel"),
        ({"B": torch.randn(4, 2)}, ValueError, r"B: expected shape \(m_out, 3\)"),
        ({"A": torch.randn(0, 5), "B": torch.randn(4, 0)}, ValueError, r"A: expected rank r >= 1"),
        ({"x": torch.randn(6, 12)}, ValueError, r"x: expected last dimension 10"),
        ({"bias": torch.randn(9)}, ValueError, r"bias: expected shape \(8,\)"),
        (
            {"weight": torch.randn(8, 10, dtype=torch.float64)},
            ValueError,
            r"weight: expected dtype float32",
        ),
        ({"C": torch.randn(2, 2, dtype=torch.float64)}, ValueError, r"C: expected dtype float32"),
        ({"A": torch.randn(3, 5, device="meta")}, ValueError, r"A: expected a tensor on cpu"),
        ({"x": torch.randint(0, 3, (6, 10))}, ValueError, r"x: expected a floating-point"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p: expected a probability"),
        ({"scale": float("inf")}, ValueError, r"scale: expected a finite number"),
        ({"backend": "fastest"}, ValueError, r"backend: expected one of"),
        ({"backend": "cuda"}, RuntimeError, r"backend='cuda' cannot run here: "),
        ({"generator": 3}, TypeError, r"generator: expected a torch.Generator"),
    ],
)
def test_bad_input_raises_before_any_kernel(no_kernel, mutate, error, match):
    args = {**_good(), "dropout_p": 0.1, **mutate}
    with pytest.raises(error, match=match):
        lo.dcft_linear(**args)


def test_dcft_delta_bad_sizes():
    with pytest.raises(ValueError, match=r"B: expected shape \(m_out, 2\)"):
        lo.dcft_delta(torch.randn(2, 5), torch.randn(4, 3), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"stride: expected an int in 1..2"):
        lo.dcft_delta(torch.randn(2, 5), torch.randn(4, 2), torch.randn(2, 2), stride=5)


def test_default_backend_on_cpu_is_the_compiled_one():
    from lor2c_ops import backends

    assert backends.select(None, torch.device("cpu"), torch.float32, op="dcft") == "cpu"
    assert backends.select(None, torch.device("cpu"), torch.float64, op="dcft") == "reference"


# --- the module --------------------------------------------------------------------------------


def test_module_shapes_parameters_and_init():
    torch.manual_seed(0)
    m = lo.DCFTLinear(64, 48, r=3, kernel_size=4, stride=2, alpha=6)
    m_in, m_out = (64 - 4) // 2 + 1, (48 - 4) // 2 + 1
    assert m.lora_A.shape == (3, m_in) and m.lora_B.shape == (m_out, 3) and m.lora_C.shape == (4, 4)
    assert m.weight.shape == (48, 64) and m.bias.shape == (48,) and m.scaling == 2.0
    assert not m.weight.requires_grad and not m.bias.requires_grad
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 3 * (m_in + m_out) + 4 * 4 == 178
    big = lo.DCFTLinear(2048, 2048, r=4)
    for p in (big.lora_A, big.lora_B):
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    assert lo.DCFTLinear(16, 16).stride == 2 and lo.DCFTLinear(16, 16, bias=False).bias is None
    text = repr(m)
    assert "kernel_size=4" in text and "stride=2" in text and "r=3" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"in_features": 11, "out_features": 8},
            r"in_features = 11 does not fit .* 10 \(m = 5\) or 12 \(m = 6\)",
        ),
        (
            {"in_features": 10, "out_features": 9, "kernel_size": 3},
            r"in_features = 10 does not fit",
        ),
        ({"in_features": 10, "out_features": 8, "stride": 3}, r"stride: expected an int in 1..2"),
        ({"in_features": 10, "out_features": 8, "r": 0}, r"r: expected a positive int"),
        ({"in_features": 10, "out_features": 8, "dropout": 1.0}, r"dropout"),
    ],
)
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.DCFTLinear(**kwargs)


def test_module_forward_is_the_op_and_from_linear_keeps_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 30)
    W0 = linear.weight.detach().clone()
    m = lo.DCFTLinear.from_linear(linear, r=2, kernel_size=2, alpha=3, dropout=0.2)
    assert m.weight is linear.weight and m.bias is linear.bias
    assert not linear.weight.requires_grad
    x = torch.randn(4, 7, 20)
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    want = lo.dcft_linear(
        x, linear.weight, linear.bias, m.lora_A, m.lora_B, m.lora_C, scale=1.5, dropout_p=0.2
    )
    assert torch.equal(y, want)
    m.eval()  # merges into the shared weight: the wrapped linear now computes the adapted layer
    merged = F.linear(x, W0, linear.bias) + 1.5 * x @ lo.dcft_delta(m.lora_A, m.lora_B, m.lora_C)
    torch.testing.assert_close(m(x), merged)
    torch.testing.assert_close(linear(x), merged)
    m.train()
    assert torch.equal(linear.weight, W0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_on_eval_and_exact_unmerge(dtype):
    torch.manual_seed(0)
    m = lo.DCFTLinear(48, 40, r=2, kernel_size=4, stride=4, alpha=8, dtype=dtype)
    original = m.weight.detach().clone()
    x = torch.randn(5, 48, dtype=dtype)
    y_train = m(x).detach()
    for _ in range(2):
        m.eval()
        assert m.merged and not torch.equal(m.weight, original)
        y_eval = m(x)
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(y_eval, y_train, atol=tol, rtol=tol)
        m.train()
        assert not m.merged and torch.equal(m.weight, original), "unmerge must be exact"
        assert torch.equal(m(x), y_train)


def test_changing_the_adapter_while_merged_remerges():
    torch.manual_seed(0)
    m = lo.DCFTLinear(24, 16, r=2, kernel_size=2, alpha=2)
    original = m.weight.detach().clone()
    x = torch.randn(3, 24)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m.eval()
    with torch.no_grad():
        m.lora_C.add_(1.0)  # an in-place edit
    torch.testing.assert_close(
        m(x),
        F.linear(x, original, m.bias) + x @ lo.dcft_delta(m.lora_A, m.lora_B, m.lora_C).detach(),
    )
    m.lora_B.grad = torch.ones_like(m.lora_B)
    opt.step()  # an optimizer step while merged
    m.scaling = 0.25  # a new scaling
    torch.testing.assert_close(
        m(x),
        F.linear(x, original, m.bias)
        + 0.25 * x @ lo.dcft_delta(m.lora_A, m.lora_B, m.lora_C).detach(),
    )
    m.train()
    assert torch.equal(m.weight, original)


def test_state_dict_holds_unmerged_weight_and_loads_while_merged():
    torch.manual_seed(0)
    m = lo.DCFTLinear(24, 16, r=2).eval()
    other = lo.DCFTLinear(24, 16, r=2).eval()
    state = m.state_dict()
    assert torch.equal(state["weight"], m._original) and "_original" not in state
    other.load_state_dict(state)
    x = torch.randn(3, 24)
    torch.testing.assert_close(other(x), m(x))
    assert torch.equal(other.train().weight, m.train().weight)


def test_editing_the_weight_while_merged_is_refused():
    m = lo.DCFTLinear(8, 8).eval()
    with torch.no_grad():
        m.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="weight was modified while the adapter was merged"):
        m.train()


def test_orthogonal_penalty():
    torch.manual_seed(0)
    m = lo.DCFTLinear(40, 30, r=3, kernel_size=2)
    A, B = m.lora_A, m.lora_B
    want = torch.linalg.norm(A @ A.T - torch.eye(3)) + torch.linalg.norm(B.T @ B - torch.eye(3))
    penalty = m.orthogonal_penalty()
    torch.testing.assert_close(penalty, want)
    penalty.backward()
    assert A.grad is not None and B.grad is not None
    with torch.no_grad():
        A.copy_(torch.linalg.qr(torch.randn(m.m_in, 3)).Q.T)
        B.copy_(torch.linalg.qr(torch.randn(m.m_out, 3)).Q)
    assert m.orthogonal_penalty().item() < 1e-5
