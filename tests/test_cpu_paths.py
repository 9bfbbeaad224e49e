"""The CPU kernels' instruction-set paths (csrc/cpu/isa.h) and plans (fused or GEMM,
csrc/cpu/lor2c.cpp): each path this machine runs, forced with LOR2C_CPU_ISA in a subprocess,
passes the fp64 oracle tests of the LoR2C, multi-adapter and DCFT ops on the fused kernel, and
the default path on the GEMM plan; shapes at the edges of the register tiles and vector widths of
every path; half-precision rows convert as torch does; the path in use is the one asked for and
`python -m lor2c_ops.info` names it."""

import math
import os
import subprocess
import sys

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops import backends, info

from backend_devices import skip_unless_runnable
from oracle import assert_within_twice_torch, expected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("avx512", "avx2", "baseline")


def _runnable() -> list:
    skip_unless_runnable("cpu")
    return list(torch.ops.lor2c_ops_ext.cpu_isa_runnable())


def _run_python(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process at the repository root, with `env` added to this
    process's environment (the paths and plans are read when the library loads)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, **env),
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def _forced() -> str | None:
    value = os.environ.get("LOR2C_CPU_ISA", "").lower()
    return None if value in ("", "auto") else value


# (n, d_in, d_out, r): ranks and widths on both sides of every path's vector width (4, 8, 16
# floats), of its register tiles (rows x ranks, rows x vectors, ranks x vectors) and of their
# remainders; fewer rows than a block, and a ragged last block; wide rows (below).
EDGE_SHAPES = [
    (1, 1, 1, 1),
    (5, 7, 9, 2),
    (8, 15, 17, 3),
    (13, 16, 33, 5),
    (9, 31, 48, 6),
    (17, 47, 49, 7),
    (16, 64, 63, 9),
    (11, 65, 95, 13),
    (21, 96, 97, 16),
    (7, 130, 47, 17),
    (19, 200, 129, 25),
    (10, 33, 200, 33),
    (12, 97, 64, 64),
    (9, 48, 113, 70),
    # wide rows: the bf16 dot products take them in 1024-column chunks (a ragged last one), and
    # the bf16 kernels' weight and scratch rows of 2048 get a padded stride (bf16_row_stride)
    (12, 1283, 512, 5),
    (10, 2048, 256, 19),
    # rank >= 32 with fewer than r rows runs the GEMM path (csrc/cpu/lor2c.cpp plan_for): these
    # keep the fused kernel's large ranks in the default run
    (40, 33, 200, 33),
    (70, 97, 64, 64),
    (83, 48, 113, 70),
]
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "n{}-{}-{}-r{}".format(*s))
def test_cpu_tile_edges_match_fp64_oracle(shape, dtypes, p):
    """On the path in use (the subprocesses of test_cpu_every_path run the others)."""
    skip_unless_runnable("cpu")
    n, d_in, d_out, r = shape
    dtype, wdtype = dtypes
    gen = torch.Generator().manual_seed(n * 1000 + r)
    x = torch.randn(n, d_in, generator=gen).to(dtype)
    layer_out = torch.randn(n, d_out, generator=gen).to(dtype)
    A = (torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)).to(wdtype)
    B = torch.randn(d_out, r, generator=gen).to(wdtype)
    g = torch.randn(n, d_out, generator=gen).to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer_out, A, B)]
    out = lo.lor2c_residual(
        *leaves, scale=0.7, dropout_p=p, backend="cpu", generator=torch.Generator().manual_seed(3)
    )
    out.backward(g)
    (o64, g64), (o_lp, g_lp) = expected(x, layer_out, A, B, 0.7, p, 3, g)
    assert_within_twice_torch("out", out, o64, o_lp)
    for name, got, want, plain in zip(
        ("dx", "dlayer_out", "dA", "dB"), [t.grad for t in leaves], g64, g_lp
    ):
        assert_within_twice_torch(name, got, want, plain)


def test_cpu_path_in_use_is_the_one_asked_for():
    runnable = _runnable()
    assert runnable and runnable[-1] == "baseline" and set(runnable) <= set(PATHS), runnable
    want = _forced() or runnable[0]
    assert torch.ops.lor2c_ops_ext.cpu_isa() == want
    assert info.cpu_isa()[0] == want
    assert f"instruction-set path: {want} (" in info.report()


# The oracle tests of the three ops, run again in a subprocess per forced path.
_ORACLE_TESTS = [
    "tests/test_cpu_paths.py",
    "tests/test_lor2c.py::test_matches_fp64_oracle",
    "tests/test_lor2c.py::test_noncontiguous_inputs",
    "tests/test_lor2c.py::test_forward_and_backward_masks_agree",
    "tests/test_share.py::test_multi_adapter_matches_loop",
    "tests/test_share.py::test_multi_adapter_shapes",
    "tests/test_dcft.py::test_matches_conv_transpose_fp64",
    "tests/test_dcft.py::test_mask_is_lor2c_mask_in_forward_and_backward",
]


# (path, plan): every path this CPU runs with every plain call on the fused kernel, and the
# default path with every one on the GEMM path and on the blocked plan (LOR2C_CPU_PLAN,
# csrc/cpu/lor2c.cpp); the default run mixes them by the number of rows.
@pytest.mark.parametrize(
    "path, plan",
    [(path, "fused") for path in PATHS] + [(None, "gemm"), (None, "blocked")],
    ids=str,
)
def test_cpu_every_path(path, plan):
    """Forced with LOR2C_CPU_ISA and LOR2C_CPU_PLAN in a fresh process: both are read when the
    library loads."""
    runnable = _runnable()
    if path is not None and path not in runnable:
        pytest.skip(f"this CPU does not run the {path} path (it runs {', '.join(runnable)})")
    if plan == "blocked" and backends.cpu_blas() is not None:
        pytest.skip(f"no blocked plan here: {backends.cpu_blas()}")
    env = {"LOR2C_CPU_PLAN": plan}
    if path is not None:
        env["LOR2C_CPU_ISA"] = path
    args = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not every_path")
    res = _run_python(*args, *_ORACLE_TESTS, timeout=900, **env)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"LOR2C_CPU_ISA={path} LOR2C_CPU_PLAN={plan}:\n{tail}"
    assert " passed" in res.stdout and " failed" not in res.stdout, tail


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_gradient_subsets(dtype, p):
    """Every subset of x, A and B needing a gradient (the kernels skip the products of the others:
    dx, dA and dB each have their own branch, and dropout's mask is drawn for dx and dA alone),
    plain and banked, against the reference backend. test_cpu_every_path reruns it with each
    path and plan forced."""
    skip_unless_runnable("cpu")
    gen = torch.Generator().manual_seed(11)
    n, d_in, d_out, r, G = 300, 70, 45, 17, 3
    ids = torch.randint(-1, G, (n,), generator=gen)
    for banked in (False, True):
        shape_a = (G, r, d_in) if banked else (r, d_in)
        shape_b = (G, d_out, r) if banked else (d_out, r)
        x0 = torch.randn(n, d_in, generator=gen).to(dtype)
        lo0 = torch.randn(n, d_out, generator=gen).to(dtype)
        A0 = (torch.randn(*shape_a, generator=gen) / d_in**0.5).to(dtype)
        B0 = (torch.randn(*shape_b, generator=gen) * 0.1).to(dtype)
        g = torch.randn(n, d_out, generator=gen).to(dtype)
        for need in range(1, 8):  # bits: x, A, B (layer_out always)
            results = []
            for backend in ("cpu", "reference"):
                leaves = [
                    x0.clone().requires_grad_(bool(need & 1)),
                    lo0.clone().requires_grad_(),
                    A0.clone().requires_grad_(bool(need & 2)),
                    B0.clone().requires_grad_(bool(need & 4)),
                ]
                out = lo.lor2c_residual(
                    *leaves,
                    scale=1.5,
                    dropout_p=p,
                    adapter_ids=ids if banked else None,
                    generator=torch.Generator().manual_seed(2),
                    backend=backend,
                )
                wanted = [t for t in leaves if t.requires_grad]
                results.append((out, *torch.autograd.grad(out, wanted, g)))
            for got, want in zip(*results):
                tol = (1e-4 if dtype == torch.float32 else 3e-2) * want.abs().max().item()
                torch.testing.assert_close(
                    got.float(), want.float(), rtol=0, atol=tol, msg=lambda m: f"{need=} {m}"
                )


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpu_streamed_outputs(p):
    """Outputs of 16 MiB or more are written with non-temporal stores (csrc/cpu/lor2c.cpp
    streams): a ragged last block (n not a multiple of the 8-row block, nor of the blocked plan's
    128 rows when test_cpu_every_path forces that plan) and a row width that is
    not a multiple of the vector, against the reference backend."""
    skip_unless_runnable("cpu")
    gen = torch.Generator().manual_seed(5)
    for n, d in ((5463, 768), (4099, 1030)):
        assert n * d * 4 >= 16 << 20
        x = torch.randn(n, d, generator=gen, requires_grad=True)
        layer_out = torch.randn(n, d, generator=gen, requires_grad=True)
        A = (torch.randn(8, d, generator=gen) / d**0.5).requires_grad_()
        B = (torch.randn(d, 8, generator=gen) * 0.1).requires_grad_()
        g = torch.randn(n, d, generator=gen)
        results = []
        for backend in ("cpu", "reference"):
            out = lo.lor2c_residual(
                x,
                layer_out,
                A,
                B,
                scale=2.0,
                dropout_p=p,
                generator=torch.Generator().manual_seed(1),
                backend=backend,
            )
            results.append((out, *torch.autograd.grad(out, (x, layer_out, A, B), g)))
        for got, want in zip(*results):  # sums over thousands of rows in another order
            tol = 1e-3 * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=tol)


def _plan_cases(path: str) -> dict:
    """(n, r) -> the plan csrc/cpu/lor2c.cpp plan_for picks on instruction-set path `path`."""
    # The blocked plan from rank 16 on on the baseline path (without a BLAS: the GEMM plan),
    # from rank 64 on on the AVX2 path (without a BLAS: fused); the fused kernel on AVX-512.
    has_blas = backends.cpu_blas() is None
    r16 = {"baseline": "blocked" if has_blas else "gemm"}.get(path, "fused")
    r64 = {"baseline": r16, "avx2": "blocked" if has_blas else "fused"}.get(path, "fused")
    banked = "blocked" if has_blas and path == "baseline" else "fused"
    return {
        (1, 8): "gemm",
        (2, 8): "fused",
        (8192, 8): "fused",
        (31, 32): "gemm",
        (32, 32): r16,
        (63, 64): "gemm",
        (64, 64): r64,
        (8192, 64): r64,
        (8192, 128): r64,
        (2, 16): r16,
        (8192, 16): r16,
        # multi-adapter batches (n, r, G): blocked on the baseline path from rank 16 with 16
        # rows per adapter or more, else fused
        (128, 16, 8): banked,
        (127, 16, 8): "fused",
        (8192, 8, 8): "fused",
        (8192, 64, 8): banked,
    }


def test_cpu_plan_rule():
    """backend="cpu" runs one row, and fewer rows than the rank from rank 32 on, on the GEMM
    path; the other calls on the blocked plan from rank 16 on on the baseline instruction-set
    path and from rank 64 on on the AVX2 path, else on the fused kernel. lor2c_ops.backends
    reports the same plan. Checked in this process for its path and again in a fresh process
    with each other path this CPU runs forced."""
    skip_unless_runnable("cpu")
    if os.environ.get("LOR2C_CPU_PLAN", "auto") != "auto":
        pytest.skip("LOR2C_CPU_PLAN forces the plan in this process")
    here = info.cpu_isa()[0]
    for case, want in _plan_cases(here).items():
        assert backends.cpu_plan(*case) == want, (here, case)
    for path in _runnable():
        if path == here:
            continue
        cases = _plan_cases(path)
        code = (
            "from lor2c_ops import backends\n"
            f"print([backends.cpu_plan(*case) for case in {list(cases)}])\n"
        )
        res = _run_python("-c", code, LOR2C_CPU_ISA=path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == str(list(cases.values())), (path, res.stdout)


def test_cpu_info_names_a_forced_path_and_refuses_a_bad_one():
    runnable = _runnable()
    path = runnable[-1]
    res = _run_python("-m", "lor2c_ops.info", LOR2C_CPU_ISA=path)
    assert res.returncode == 0, res.stderr
    assert f"instruction-set path: {path} (forced by LOR2C_CPU_ISA={path}" in res.stdout
    code = (
        "import torch, lor2c_ops as lo\n"
        "try:\n"
        "    lo.lor2c_residual(torch.ones(2, 3), torch.ones(2, 3), torch.ones(1, 3),"
        " torch.ones(3, 1), backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    res = _run_python("-c", code, LOR2C_CPU_ISA="sse9")
    assert "refused: LOR2C_CPU_ISA=sse9: expected avx512, avx2, baseline or auto" in res.stdout, (
        res.stdout + res.stderr
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_rows_round_as_torch(dtype):
    """The vectorised widening and narrowing of half-precision rows (csrc/cpu/convert.cpp) are
    bit-identical to torch's conversions (NaN and infinities included): with A = B = I every
    product is exact, so out = narrow(layer_out + s * x) and dx = narrow(s * g) in fp32."""
    skip_unless_runnable("cpu")
    n, d, s = 256, 64, 0.7
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(n, d, generator=gen) * 3).to(dtype)
    layer_out = (
        torch.randn(n, d, generator=gen) * 2 ** torch.randint(-8, 8, (n, d), generator=gen)
    ).to(dtype)
    g = torch.randn(n, d, generator=gen).to(dtype)
    # NaN and infinities in layer_out only: in x or g they would spread along the row through
    # the products (0 * NaN), as they do in the expression
    layer_out[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0])
    eye = torch.eye(d, dtype=torch.float32)
    xr = x.clone().requires_grad_()
    out = lo.lor2c_residual(xr, layer_out, eye, eye, scale=s, backend="cpu")
    out.backward(g)
    want = (layer_out.float() + x.float() * s).to(dtype)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    want_dx = (g.float() * s).to(dtype)
    assert torch.equal(xr.grad.isnan(), want_dx.isnan())
    assert torch.equal(xr.grad.nan_to_num(), want_dx.nan_to_num())


def _bf16_kernels_run() -> bool:
    return backends.cpu_bf16_kernels() is None


def test_cpu_bf16_kernels_run_where_the_cpu_multiplies_bf16():
    """The bf16 product kernels run on the AVX-512 path of a CPU with AVX512-BF16 unless
    LOR2C_CPU_BF16_DOT=0, and info says which products bf16 calls use."""
    skip_unless_runnable("cpu")
    has = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    path = torch.ops.lor2c_ops_ext.cpu_isa()
    off = os.environ.get("LOR2C_CPU_BF16_DOT") == "0"
    assert _bf16_kernels_run() == (has and path == "avx512" and not off), (
        backends.cpu_bf16_kernels()
    )
    assert ("cpu bf16 products: bf16 kernels" in info.report()) == _bf16_kernels_run()


# (n, d_in, d_out, r, fraction of x and g not zero): odd widths, and wide rows that the dot
# products take in 1024-column chunks (2100 = 2 * 1024 + 52) and whose weight copies get a
# padded row stride (1536, a multiple of 512: cpu::bf16_row_stride); sparse there, so that t and
# u stay small integers.
_BF16_EXACT_SHAPES = [(37, 40, 50, 3, 1.0), (21, 2100, 1536, 5, 0.03)]


@pytest.mark.parametrize("n,d_in,d_out,r,dense", _BF16_EXACT_SHAPES)
def test_cpu_bf16_results_rounded_as_torch_rounds(n, d_in, d_out, r, dense):
    """Integer-valued operands small enough that every product and sum is exact in fp32 (and t
    and u fit bf16), layer_out fractional: out, dx, dA and dB must equal the exact result rounded
    to bf16 as torch rounds, bit for bit (the kernels' one rounding, to nearest even), on odd
    widths (masked column tails) and an odd rank (a half-empty rank pair). A NaN in layer_out
    stays a NaN in its place, and denormal layer_out values where the products are zero (a row of
    x of zeros) come out as they went in (vdpbf16ps flushes denormal sums: the bf16 kernels must
    not carry layer_out through it)."""
    skip_unless_runnable("cpu")
    gen = torch.Generator().manual_seed(5)
    s = 0.5

    def sparse(shape):
        keep = torch.rand(shape, generator=gen) < dense
        return (torch.randint(-2, 3, shape, generator=gen) * keep).to(torch.bfloat16)

    x = sparse((n, d_in))
    A = torch.randint(-1, 2, (r, d_in), generator=gen).to(torch.bfloat16)
    B = torch.randint(-1, 2, (d_out, r), generator=gen).to(torch.bfloat16)
    g = sparse((n, d_out))
    layer_out = (torch.randn(n, d_out, generator=gen) * 50).to(torch.bfloat16)
    layer_out[3, 7] = float("nan")
    x[5] = 0
    layer_out[5] = torch.linspace(-3e-39, 3e-39, d_out).to(torch.bfloat16)  # denormals and zero
    assert (layer_out[5].float().abs() < torch.finfo(torch.float32).tiny).all()
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer_out, A, B)]
    out = lo.lor2c_residual(*leaves, scale=s, dropout_p=0.0, backend="cpu")
    out.backward(g)
    x64, l64, A64, B64, g64 = (t.double() for t in (x, layer_out, A, B, g))
    t64 = x64 @ A64.T
    u64 = g64 @ B64
    assert t64.abs().max() <= 256 and u64.abs().max() <= 256  # integers bf16 holds exactly
    want = {
        "out": l64 + s * t64 @ B64.T,
        "dx": s * u64 @ A64,
        "dA": s * u64.T @ x64,
        "dB": s * g64.T @ t64,
    }
    got = {"out": out, "dx": leaves[0].grad, "dA": leaves[2].grad, "dB": leaves[3].grad}
    for name, w in want.items():
        w = w.float().to(torch.bfloat16)  # exact in fp32, so one rounding: torch's
        nan = torch.isnan(w)
        assert torch.equal(torch.isnan(got[name]), nan), name
        assert torch.equal(got[name][~nan], w[~nan]), (
            name,
            (got[name].float() - w.float()).abs().max(),
        )


def test_cpu_every_path_bf16_kernels_off():
    """LOR2C_CPU_BF16_DOT=0 in a fresh process (named *every_path* so that the forced-path runs,
    which select "not every_path", do not nest it): bf16 calls take the fp32 kernels of the AVX-512
    path, which the default run no longer reaches on a CPU where the bf16 kernels run."""
    if not _bf16_kernels_run():
        pytest.skip(f"the bf16 kernels do not run here: {backends.cpu_bf16_kernels()}")
    args = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not every_path")
    res = _run_python(
        *args,
        "tests/test_cpu_paths.py",
        "tests/test_lor2c.py::test_matches_fp64_oracle",
        "tests/test_share.py::test_multi_adapter_matches_loop",
        timeout=900,
        LOR2C_CPU_BF16_DOT="0",
    )
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0 and " passed" in res.stdout, tail
