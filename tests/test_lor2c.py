"""The LoR2C residual op on every backend: values and gradients against the fp64 oracle,
dropout, registration (opcheck, torch.compile), memory saved for backward, and bad input."""

import math
import os
import subprocess
import sys

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops.ops import lor2c as op
from lor2c_ops.ref import philox as ref_philox
from lor2c_ops.ref.philox import dropout_mask

from backend_devices import backend_device, skip_unless_runnable
from oracle import assert_within_twice_torch, expected, seed_for

# (leading dims, d_in, d_out, r): d not a multiple of any block size, r = 1 and 7, 3-D input,
# d_in != d_out both ways, and the ranks the issue names (8, 16, 64).
SHAPES = [
    ((37,), 100, 77, 7),
    ((2, 3, 5), 64, 64, 1),
    ((17,), 33, 129, 8),
    ((40,), 96, 48, 16),
    ((5,), 40, 70, 64),
]
# (activation dtype, weight dtype): plain, and fp32 weights with half activations.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def make(lead, d_in, d_out, r, dtype, wdtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen).to(device, dtype)
    layer_out = torch.randn(*lead, d_out, generator=gen).to(device, dtype)
    A = (torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)).to(device, wdtype)
    B = torch.randn(d_out, r, generator=gen).to(device, wdtype)
    g = torch.randn(*lead, d_out, generator=gen).to(device, dtype)
    return x, layer_out, A, B, g


def run(backend, x, layer_out, A, B, g, scale, p, generator_seed):
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer_out, A, B)]
    out = lo.lor2c_residual(
        *leaves,
        scale=scale,
        dropout_p=p,
        generator=torch.Generator().manual_seed(generator_seed),
        backend=backend,
    )
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}"
)
def test_matches_fp64_oracle(backend, shape, dtypes, p):
    device = skip_unless_runnable(backend)
    lead, d_in, d_out, r = shape
    x, layer_out, A, B, g = make(lead, d_in, d_out, r, *dtypes, device)
    out, grads = run(backend, x, layer_out, A, B, g, 0.75, p, generator_seed=123)
    (o64, g64), (o_plain, g_plain) = expected(x, layer_out, A, B, 0.75, p, 123, g)
    assert out.dtype == x.dtype and out.shape == layer_out.shape
    assert_within_twice_torch("out", out, o64, o_plain)
    for name, got, want, plain in zip(("dx", "dlayer_out", "dA", "dB"), grads, g64, g_plain):
        assert_within_twice_torch(name, got, want, plain)
    assert grads[0].dtype == x.dtype and grads[1].dtype == x.dtype
    assert grads[2].dtype == dtypes[1] and grads[3].dtype == dtypes[1], (
        "weight grads keep the weights' dtype"
    )
    assert torch.equal(grads[1], g), "d layer_out is the output gradient itself"


def test_noncontiguous_inputs(backend):
    device = skip_unless_runnable(backend)
    x_full, lo_full, A, B, g = make((24,), 150, 90, 7, torch.float32, torch.float32, device)
    x = x_full[:, 10:110]  # row stride 150, a view
    xt = torch.randn(100, 24, device=device).t()  # column stride 24: must be handled too
    layer_out = lo_full[::2].repeat(2, 1)  # ordinary
    A = A[:, :100].t().contiguous().t()  # a transposed (column-major) weight
    for xin in (x, xt):
        out, grads = run(backend, xin, layer_out, A, B, g, 1.5, 0.1, generator_seed=7)
        (o64, g64), (o_plain, g_plain) = expected(xin, layer_out, A, B, 1.5, 0.1, 7, g)
        assert_within_twice_torch("out", out, o64, o_plain)
        for name, got, want, plain in zip(("dx", "dlayer_out", "dA", "dB"), grads, g64, g_plain):
            assert_within_twice_torch(name, got, want, plain)


def test_empty_batch(backend):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, g = make((0,), 20, 30, 4, torch.float32, torch.float32, device)
    out, grads = run(backend, x, layer_out, A, B, g, 1.0, 0.5, generator_seed=1)
    assert out.shape == (0, 30)
    assert torch.count_nonzero(grads[2]) == 0 and torch.count_nonzero(grads[3]) == 0


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64(p):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    layer_out = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(3, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(x, layer_out, A, B):  # a fixed generator seed: the same mask at every evaluation
        return lo.lor2c_residual(
            x,
            layer_out,
            A,
            B,
            scale=0.5,
            dropout_p=p,
            generator=torch.Generator().manual_seed(3),
            backend="reference",
        )

    assert torch.autograd.gradcheck(f, (x, layer_out, A, B))


# --- dropout -----------------------------------------------------------------------------------


def _dropped(backend, device, p, generator_seed, n=64, d=96):
    """The forward's mask and the backward's mask of one call, read through identity weights."""
    x = torch.ones(n, d, device=device, requires_grad=True)
    eye = torch.eye(d, device=device)
    layer_out = torch.zeros(n, d, device=device)
    out = lo.lor2c_residual(
        x,
        layer_out,
        eye,
        eye,
        dropout_p=p,
        backend=backend,
        generator=torch.Generator().manual_seed(generator_seed),
    )
    out.backward(torch.ones_like(out))
    return out.detach() == 0, x.grad == 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate(backend, p):
    device = skip_unless_runnable(backend)
    x = torch.ones(4096, 64, device=device)
    eye = torch.eye(64, device=device)
    out = lo.lor2c_residual(x, torch.zeros_like(x), eye, eye, dropout_p=p, backend=backend)
    rate = (out == 0).float().mean().item()
    assert abs(rate - p) <= 0.02 * p, f"drop rate {rate:.4f} not within 2% of p = {p}"
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p))), "kept values scale by 1/(1-p)"


def test_forward_and_backward_masks_agree(backend):
    device = skip_unless_runnable(backend)
    fwd, bwd = _dropped(backend, device, 0.3, generator_seed=11)
    assert 0 < fwd.sum() < fwd.numel()
    assert torch.equal(fwd, bwd)


def test_same_seed_same_mask_other_seed_other_mask(backend):
    device = skip_unless_runnable(backend)
    a, _ = _dropped(backend, device, 0.3, generator_seed=5)
    b, _ = _dropped(backend, device, 0.3, generator_seed=5)
    c, _ = _dropped(backend, device, 0.3, generator_seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_default_generator_follows_manual_seed(backend):
    device = skip_unless_runnable(backend)
    x = torch.ones(32, 64, device=device)
    eye = torch.eye(64, device=device)
    masks = []
    for _ in range(2):
        torch.manual_seed(1234)
        masks.append(
            lo.lor2c_residual(x, torch.zeros_like(x), eye, eye, dropout_p=0.4, backend=backend) == 0
        )
    assert torch.equal(masks[0], masks[1])


def test_masks_equal_across_backends():
    from lor2c_ops import backends

    masks = {}
    for name in backends.NAMES:
        device = backend_device(name)
        if backends.BACKENDS[name].refuses(device, torch.float32) is not None:
            continue
        masks[name] = _dropped(name, device, 0.3, generator_seed=99)[0].cpu()
    assert {"reference", "cpu", "triton"} <= set(masks), f"compared only {sorted(masks)}"
    expect = dropout_mask(seed_for(99, "cpu"), 64, 96, 0.3) == 0
    for name, mask in masks.items():
        assert torch.equal(mask, expect), f"{name} mask differs from the Philox reference"


# ---- the mask convention (csrc/philox.h) ---------------------------------------------------
# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints, written out from the paper (independent of lor2c_ops)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            (p1 >> 32) ^ c1 ^ k0,
            p1 & 0xFFFFFFFF,
            (p0 >> 32) ^ c3 ^ k1,
            p0 & 0xFFFFFFFF,
        )
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _draw_scalar(seed, offset, i, j):
    """The 16-bit draw of element (i, j), straight from the convention's text."""
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    out = _philox_scalar((j >> 3, i, o & 0xFFFFFFFF, o >> 32), (s & 0xFFFFFFFF, s >> 32))
    return (out[(j >> 1) & 3] >> (16 * (j & 1))) & 0xFFFF


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT)
def test_philox_known_answers(ctr, key, want):
    assert _philox_scalar(ctr, key) == want
    words = ref_philox.philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(w) for w in words) == want


def test_threshold_is_16_bit():
    for p in [0.0, 1e-6, 0.1, 0.25, 0.3, 0.5, 0.9, 1 - 1e-9]:
        assert ref_philox.dropout_threshold(p) == min(math.floor(p * 65536), 65535)
    assert ref_philox.dropout_threshold(1 - 1e-9) == 65535


def test_mask_layout_matches_scalar_definition():
    """8 columns per Philox call, 16-bit halves in column order: odd columns, 6 | 7 | 8 | 9."""
    seed = torch.tensor([-0x123456789ABCDEF, 0x1_0000_0007], dtype=torch.int64)
    n, d, p = 5, 300, 0.3
    draws = ref_philox.dropout_draws(seed, n, d)
    mask = dropout_mask(seed, n, d, p)
    thr = ref_philox.dropout_threshold(p)
    kept = torch.tensor(1 / (1 - p), dtype=torch.float32).item()  # the fp32 scale
    elements = [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 6),
        (0, 7),
        (0, 8),
        (0, 9),
        (1, 6),
        (1, 7),
        (2, 8),
        (2, 9),
        (3, 15),
        (3, 16),
        (4, 255),
        (4, 299),
    ]
    for i, j in elements:
        want = _draw_scalar(int(seed[0]), int(seed[1]), i, j)
        assert int(draws[i, j]) == want, f"draw of ({i}, {j})"
        assert float(mask[i, j]) == (kept if want >= thr else 0.0), f"mask of ({i}, {j})"
    # ... and every backend's mask is the reference's at those elements
    seed99 = seed_for(99, "cpu")
    ref96 = dropout_mask(seed99, 64, 96, 0.3) == 0
    for i, j in [(0, 6), (0, 7), (0, 8), (0, 9), (63, 95), (17, 33)]:
        assert bool(ref96[i, j]) == (
            _draw_scalar(int(seed99[0]), int(seed99[1]), i, j) < ref_philox.dropout_threshold(0.3)
        )


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keep_rate_within_a_few_sigma(p):
    n, d = 1024, 1000
    keep = (dropout_mask(seed_for(7, "cpu"), n, d, p) != 0).double()
    rate, sigma = keep.mean().item(), math.sqrt(p * (1 - p) / (n * d))
    assert abs(rate - (1 - p)) <= 5 * sigma, f"keep rate {rate:.5f}, 1 - p = {1 - p}"
    # the 8 positions inside a Philox call are alike (no half or word is biased)
    by_lane = keep[:, : d // 8 * 8].reshape(n, -1, 8).mean(dim=(0, 1))
    sigma_lane = math.sqrt(p * (1 - p) / (n * (d // 8)))
    assert (by_lane - (1 - p)).abs().max().item() <= 5 * sigma_lane, f"per lane {by_lane}"


_FORCED_PATH_CHECK = """
import torch, lor2c_ops as lo
from lor2c_ops.ops.lor2c import draw_seed
from lor2c_ops.ref.philox import dropout_mask
for d in (1, 9, 63, 64, 65, 127, 128, 129, 192, 200):
    x = torch.ones(6, d)
    eye = torch.eye(d)
    out = lo.lor2c_residual(x, torch.zeros(6, d), eye, eye, dropout_p=0.4, backend="cpu",
                            generator=torch.Generator().manual_seed(d))
    seed = draw_seed(torch.Generator().manual_seed(d), "cpu")
    assert torch.equal(out == 0, dropout_mask(seed, 6, d, 0.4) == 0), d
"""


@pytest.mark.parametrize("path", ["scalar", "avx2"])
def test_cpu_mask_fallback_paths(path):
    """The CPU mask's scalar and AVX2 code (the default is the widest the CPU has)."""
    skip_unless_runnable("cpu")
    env = dict(os.environ, LOR2C_CPU_MASK_PATH=path)
    res = subprocess.run(
        [sys.executable, "-c", _FORCED_PATH_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]


# Every CPU mask path against the scalar code, bit for bit. A process dumps the multipliers its
# mask code draws: dx of a rank-1 backward with A = B = g = 1 and scale 1 is 1 * m, exact on the
# fused and the GEMM plan. Widths on both sides of the 32-column SSE2 step and the 64-column
# kMaskStep, and ones that end each path's steps every way (AVX-512: 256 columns per step, then
# 128 and 64; AVX2: 96 per step, then 32: 447 pads to 448 = 256 + 128 + 64 = 4 * 96 + 2 * 32);
# a column's draw does not depend on d, so the padding columns a narrow row draws (up to
# mask_padded(d)) are real columns of the wide rows. Rates: thresholds 0 (p > 0 but
# below 2^-16), 1, 0x7FFF, 0x8000 (the signed 16-bit edge), 0x8001 and 0xFFFF, besides 0.1 and
# 0.999.
# A keep flag hides most bits of its draw, so draws are also pinned exactly, each at threshold
# == draw (kept) and draw + 1 (dropped): Random123's first Philox4x32-10 vector (seed (0, 0):
# row 0's first call has counter and key 0), and the 128 columns of row 2 (every lane of every
# path's step) for _MASK_SEED.
_MASK_WIDTHS = (1, 7, 31, 33, 63, 64, 65, 127, 191, 447, 768, 1000)
_MASK_RATES = (2.0**-17, 1 / 65536, 0x7FFF / 65536, 0.5, 0x8001 / 65536, 0xFFFF / 65536, 0.1, 0.999)
_MASK_SEED = (-0x123456789ABCDEF, 0x1_0000_0007)
_MASK_ROWS = 37
_KAT_DRAWS = [(w >> (16 * h)) & 0xFFFF for w in PHILOX_KAT[0][2] for h in (0, 1)]  # row 0, 0..7
_MASK_DUMP = """
import sys, torch
import lor2c_ops  # noqa: F401

def mask(n, d, p, seed):
    ones = torch.ones
    return torch.ops.lor2c_ops_ext.lor2c_bwd(
        ones(n, 1), ones(n, d), torch.zeros(n, 1), ones(1, d), ones(1, 1), 1.0, p,
        torch.tensor(seed, dtype=torch.int64), True, False, False)[0]

widths, rates, seed, rows, edges = eval(sys.argv[2])
masks = {(d, p): mask(rows, d, p, seed) for d in widths for p in rates}
edges = [{t: mask(n, d, t / 65536, s)[row] for t in ts} for s, n, row, d, ts in edges]
torch.save({"isa": torch.ops.lor2c_ops_ext.cpu_isa(), "masks": masks, "edges": edges}, sys.argv[1])
"""
_MASK_DUMPS: dict = {}


def _edge_draws() -> list:
    """(seed, n, row, d, draws of the row): the draws pinned exactly (see above)."""
    row2 = ref_philox.dropout_draws(torch.tensor(_MASK_SEED, dtype=torch.int64), 3, 128)[2]
    return [((0, 0), 1, 0, 8, _KAT_DRAWS), (_MASK_SEED, 3, 2, 128, row2.tolist())]


def _mask_dump(path: str, tmp_path) -> dict:
    """The masks one process draws: "scalar" forces the scalar code (LOR2C_CPU_MASK_PATH=scalar,
    on the baseline kernels), the others force that instruction-set path (LOR2C_CPU_ISA)."""
    if path not in _MASK_DUMPS:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOR2C_CPU_")}
        env["LOR2C_CPU_ISA"] = "baseline" if path == "scalar" else path
        if path == "scalar":
            env["LOR2C_CPU_MASK_PATH"] = "scalar"
        edges = [
            (s, n, row, d, sorted({t for x in draws for t in (x, x + 1) if 0 < t < 65536}))
            for s, n, row, d, draws in _edge_draws()
        ]
        out = str(tmp_path / f"masks-{path}.pt")
        args = repr((_MASK_WIDTHS, _MASK_RATES, _MASK_SEED, _MASK_ROWS, edges))
        res = subprocess.run(
            [sys.executable, "-c", _MASK_DUMP, out, args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, f"{path}: {res.stderr[-2000:]}"
        _MASK_DUMPS[path] = torch.load(out)
        assert _MASK_DUMPS[path]["isa"] == env["LOR2C_CPU_ISA"], _MASK_DUMPS[path]["isa"]
    return _MASK_DUMPS[path]


def _cpu_mask_path(path: str) -> None:
    skip_unless_runnable("cpu")
    runnable = torch.ops.lor2c_ops_ext.cpu_isa_runnable()
    if path != "scalar" and path not in runnable:
        pytest.skip(f"this CPU does not run the {path} path (it runs {', '.join(runnable)})")


@pytest.mark.parametrize("path", ["baseline", "avx2", "avx512"])
def test_cpu_mask_paths_match_scalar_bit_for_bit(path, tmp_path):
    """The vector mask code of each instruction-set path (SSE2 on the baseline path) against
    the scalar code, every bit of every multiplier, and the keep flags against the reference."""
    _cpu_mask_path(path)
    want, got = _mask_dump("scalar", tmp_path), _mask_dump(path, tmp_path)
    seed = torch.tensor(_MASK_SEED, dtype=torch.int64)
    for (d, p), m in want["masks"].items():
        ref_dropped = dropout_mask(seed, _MASK_ROWS, d, p) == 0
        assert torch.equal(m == 0, ref_dropped), f"scalar mask, d={d} p={p}"
        bits_want = m.view(torch.int32)
        bits_got = got["masks"][(d, p)].view(torch.int32)
        bad = (bits_want != bits_got).nonzero()
        assert bad.numel() == 0, (
            f"{path} vs scalar, d={d} p={p}: {bad.shape[0]} multipliers differ, first at "
            f"(row, col) = {tuple(bad[0].tolist())}"
        )


@pytest.mark.parametrize("path", ["scalar", "baseline", "avx2", "avx512"])
def test_cpu_mask_exact_draws_per_path(path, tmp_path):
    """Random123's first vector, then 128 columns of one row, through each CPU mask path: each
    column is kept at threshold == its draw and dropped at draw + 1, so every bit counts."""
    _cpu_mask_path(path)
    dumped = _mask_dump(path, tmp_path)["edges"]
    for (seed, _, row, _, draws), masks in zip(_edge_draws(), dumped):
        for j, draw in enumerate(draws):
            where = f"{path}: seed {seed} row {row} column {j} (draw {draw:#06x})"
            assert draw == 0 or masks[draw][j] != 0, f"{where} dropped at threshold == draw"
            assert draw == 0xFFFF or masks[draw + 1][j] == 0, f"{where} kept at draw + 1"


def test_eval_mode_and_p_zero_need_no_mask(backend):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, _ = make((9,), 20, 20, 2, torch.float32, torch.float32, device)
    off = lo.lor2c_residual(x, layer_out, A, B, dropout_p=0.9, training=False, backend=backend)
    zero = lo.lor2c_residual(x, layer_out, A, B, dropout_p=0.0, backend=backend)
    assert torch.equal(off, zero)


# --- memory ------------------------------------------------------------------------------------


def test_saved_for_backward_is_x_and_t_only(backend):
    device = skip_unless_runnable(backend)
    n, d, r = 256, 96, 8
    x = torch.randn(n, d, device=device, requires_grad=True)
    layer_out = torch.randn(n, d, device=device, requires_grad=True)
    adapter = lo.FusedLoR2C(d, r=r, dropout=0.2, device=device, backend=backend)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = adapter(x, layer_out)
    params = {adapter.lora_A.data_ptr(), adapter.lora_B.data_ptr()}
    activation_bytes = 0
    for t in saved:
        if t.data_ptr() in params:
            continue
        if t.data_ptr() == x.data_ptr():
            assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            continue  # x itself, by reference
        activation_bytes += t.numel() * t.element_size()
    seed_bytes = 16
    assert activation_bytes <= n * r * 4 + seed_bytes, f"saved {activation_bytes} bytes besides x"
    assert not any(t.data_ptr() == layer_out.data_ptr() for t in saved), "layer_out is not saved"
    out.sum().backward()


# --- registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, g = make((13,), 24, 40, 3, torch.float32, torch.float32, device)
    seed = seed_for(4, device)
    for t in (x, layer_out, A, B):
        t.requires_grad_()
    torch.library.opcheck(op.lor2c_fwd, (x, layer_out, A, B, None, 0.5, p, seed, backend))
    _, t = op.lor2c_fwd(
        x.detach(), layer_out.detach(), A.detach(), B.detach(), None, 0.5, p, seed, backend
    )
    torch.library.opcheck(
        op.lor2c_bwd,
        (g, x.detach(), t, A.detach(), B.detach(), None, 0.5, p, seed, backend, True, True, True),
    )
    torch.library.opcheck(
        op.lor2c_bwd,
        (g, x.detach(), t, A.detach(), B.detach(), None, 0.5, p, seed, backend, False, True, False),
    )


class _Block(torch.nn.Module):
    def __init__(self, d, backend):
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        self.adapter = lo.FusedLoR2C(d, r=4, backend=backend)
        torch.nn.init.normal_(self.adapter.lora_B)

    def forward(self, h):
        return self.adapter(h, torch.tanh(self.linear(h)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compiler):
    device = skip_unless_runnable(backend)
    torch.manual_seed(0)
    model = _Block(24, backend).to(device)
    h = torch.randn(3, 5, 24, device=device, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    y_c = compiled(h)
    y_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()] + [h.grad.clone()]
    model.zero_grad()
    h.grad = None
    y = model(h)
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters()] + [h.grad]
    torch.testing.assert_close(y_c, y)
    # Inductor compiles the layers around the op its own way (its tanh, the order of the fp32
    # sums): with torch 2.4 one element of a weight gradient was off by 1.9e-6 relative and one of
    # h's by 1.5e-5 absolute (values of order 1), against assert_close's 1.3e-6 and 1e-5. So
    # the gradients are compared to 1e-5 of their largest element.
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_compile_with_dropout_traces_without_graph_break(backend):
    device = skip_unless_runnable(backend)
    model = lo.FusedLoR2C(16, r=2, dropout=0.5, backend=backend).to(device)
    x = torch.randn(8, 16, device=device, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x, torch.zeros_like(x))
    out.sum().backward()
    assert x.grad is not None and out.shape == x.shape


# --- autocast and mixed precision --------------------------------------------------------------


def test_autocast_matches_expression(backend):
    device = skip_unless_runnable(backend)
    x, layer_out, A, B, g = make((30,), 48, 40, 4, torch.float32, torch.float32, device)
    cases = [
        (x, layer_out),
        (x.to(torch.bfloat16), layer_out),
        (x, layer_out.to(torch.bfloat16)),
        (x.to(torch.bfloat16), layer_out.to(torch.bfloat16)),
    ]
    for xi, li in cases:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            want = li + 0.5 * (xi @ A.T @ B.T)
            got = lo.lor2c_residual(xi, li, A, B, scale=0.5, backend=backend)
        assert got.dtype == want.dtype, (xi.dtype, li.dtype)
        exact = li.double() + 0.5 * (xi.double() @ A.double().T @ B.double().T)
        assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 1e-6


def test_mixed_precision_weight_grads_in_weight_dtype(backend):
    device = skip_unless_runnable(backend)
    adapter = lo.FusedLoR2C(32, 48, r=4, backend=backend).to(device)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(10, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = adapter(x, torch.zeros(10, 48, device=device, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert adapter.lora_A.grad.dtype == torch.float32 and adapter.lora_B.grad.dtype == torch.float32


# --- the module --------------------------------------------------------------------------------


def test_fresh_module_is_identity_and_reset():
    adapter = lo.FusedLoR2C(20, 30, r=5, alpha=10)
    assert adapter.lora_A.shape == (5, 20) and adapter.lora_B.shape == (30, 5)
    assert adapter.scaling == 2.0
    x, layer_out = torch.randn(4, 20), torch.randn(4, 30)
    assert torch.equal(adapter(x, layer_out), layer_out)
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in 20
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.std() > 0.3 * bound
    torch.nn.init.ones_(adapter.lora_B)
    adapter.reset_parameters()
    assert torch.count_nonzero(adapter.lora_B) == 0
    text = repr(adapter)
    assert "in_features=20" in text and "out_features=30" in text and "r=5" in text
    assert lo.FusedLoR2C(8).lora_B.shape == (8, 8)
    half = lo.FusedLoR2C(8, dtype=torch.float16)
    assert half.lora_A.dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_features": 0}, "in_features"),
        ({"in_features": 4, "r": 0}, "r"),
        ({"in_features": 4, "dropout": 1.0}, "dropout"),
        ({"in_features": 4, "out_features": -1}, "out_features"),
        ({"in_features": True}, "in_features"),
    ],
)
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.FusedLoR2C(**kwargs)


# --- bad input ---------------------------------------------------------------------------------


def _good():
    return torch.randn(6, 10), torch.randn(6, 12), torch.randn(3, 10), torch.randn(12, 3)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: {"x": torch.randn(6, 11)}, ValueError, r"x: expected last dimension 10"),
        (lambda a: {"A": torch.randn(3, 10, 1)}, ValueError, r"A: expected a 2-D tensor"),
        (lambda a: {"B": torch.randn(12, 4)}, ValueError, r"B: expected shape \(d_out, 3\)"),
        (
            lambda a: {"layer_out": torch.randn(5, 12)},
            ValueError,
            r"layer_out: expected shape \(6, 12\)",
        ),
        (
            lambda a: {"layer_out": torch.randn(6, 13)},
            ValueError,
            r"layer_out: expected shape \(6, 12\)",
        ),
        (lambda a: {"layer_out": torch.randn(1, 12)}, ValueError, r"layer_out: expected shape"),
        (
            lambda a: {"layer_out": torch.randn(6, 12, dtype=torch.float64)},
            ValueError,
            r"layer_out: expected dtype float32",
        ),
        (
            lambda a: {
                "A": torch.randn(3, 10, dtype=torch.float16),
                "B": torch.randn(12, 3, dtype=torch.float16),
            },
            ValueError,
            r"A: expected dtype float32",
        ),
        (
            lambda a: {"B": torch.randn(12, 3, dtype=torch.float64)},
            ValueError,
            r"B: expected dtype float32",
        ),
        (
            lambda a: {"x": torch.randint(0, 3, (6, 10))},
            ValueError,
            r"x: expected a floating-point",
        ),
        (lambda a: {"x": [[1.0]]}, TypeError, r"x: expected a torch.Tensor"),
        (
            lambda a: {"A": torch.randn(0, 10), "B": torch.randn(12, 0)},
            ValueError,
            r"A: expected rank r >= 1",
        ),
        (
            lambda a: {"dropout_p": 1.0},
            ValueError,
            r"dropout_p: expected a probability in \[0, 1\)",
        ),
        (lambda a: {"dropout_p": -0.1}, ValueError, r"dropout_p"),
        (lambda a: {"dropout_p": "x"}, TypeError, r"dropout_p"),
        (lambda a: {"scale": float("nan")}, ValueError, r"scale: expected a finite number"),
        (
            lambda a: {"backend": "fastest"},
            ValueError,
            r"backend: expected one of reference, cpu, triton, cuda",
        ),
        (lambda a: {"backend": "cuda"}, RuntimeError, r"backend='cuda' cannot run here: "),
        (lambda a: {"generator": 5}, TypeError, r"generator: expected a torch.Generator"),
        (
            lambda a: {"A": torch.randn(3, 10, device="meta")},
            ValueError,
            r"A: expected a tensor on cpu",
        ),
    ],
)
def test_bad_input_raises_before_any_kernel(no_kernel, mutate, error, match):
    x, layer_out, A, B = _good()
    args = {"x": x, "layer_out": layer_out, "A": A, "B": B, "dropout_p": 0.1}
    args.update(mutate(args))
    with pytest.raises(error, match=match):
        lo.lor2c_residual(**args)


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    pytest.importorskip("triton")  # without it the refusal names that instead
    import lor2c_ops.triton
    from lor2c_ops.ops import _common

    monkeypatch.setattr(lor2c_ops.triton, "INTERPRET", False)
    monkeypatch.setattr(_common, "_SELECTED", {})  # the backend choice is cached per process
    x, layer_out, A, B = _good()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lo.lor2c_residual(x, layer_out, A, B, backend="triton")


def test_triton_refuses_hopper_under_a_triton_that_crashes_there(monkeypatch):
    """Triton 3.0 and 3.1 segfault compiling _grad_pass for sm_90 (backends.TRITON_MIN_FOR_SM90):
    the backend says so, for that GPU only, before anything is compiled."""
    triton = pytest.importorskip("triton")
    from lor2c_ops import backends

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    backends._triton_cuda_device.cache_clear()
    try:
        monkeypatch.setattr(triton, "__version__", "3.1.0")
        reason = backends.BACKENDS["triton"].device_refusal(torch.device("cuda", 0))
        assert reason is not None and "3.1.0" in reason and "sm_90" in reason
        assert "Triton 3.2" in reason and "backend='cuda'" in reason
        assert backends.triton_refuses_capability((10, 0)) is not None
        assert backends.triton_refuses_capability((8, 0)) is None  # it compiles for sm_80
        for version in ("3.2.0", "3.2.0+git8f1c0f9", "3.10.1"):
            monkeypatch.setattr(triton, "__version__", version)
            assert backends.triton_refuses_capability((9, 0)) is None, version
    finally:
        backends._triton_cuda_device.cache_clear()


def test_default_backend_on_cpu_is_the_compiled_one():
    from lor2c_ops import backends

    assert backends.select(None, torch.device("cpu"), torch.float32) == "cpu"
    assert backends.select(None, torch.device("cpu"), torch.float64) == "reference"


# --- 64-bit offsets ----------------------------------------------------------------------------


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """Row offsets past 2^31 elements: the output and layer_out rows past the boundary."""
    n, d_in, d_out, r = (2**31) // 16 + 3, 4, 16, 1
    x = torch.ones(1, d_in, dtype=torch.bfloat16).expand(n, d_in)  # stride-0 rows: no memory
    layer_out = torch.arange(16, dtype=torch.bfloat16).expand(n, d_out)
    A = torch.ones(r, d_in)
    B = torch.ones(d_out, r)
    out = lo.lor2c_residual(x, layer_out, A, B, scale=0.5, backend="cpu")
    assert out.numel() > 2**31
    tail = out[-3:].float()
    assert torch.equal(tail, (torch.arange(16.0) + 2.0).expand(3, 16))
    assert torch.equal(out[:2].float(), (torch.arange(16.0) + 2.0).expand(2, 16))
