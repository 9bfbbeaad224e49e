"""Compiles the Triton kernels for a GPU architecture on a machine without a GPU, and reports
what the compiled code does: shared memory, registers and spill stores (ptxas -v), whether the rank
products run on tensor cores (mma / wgmma in the PTX) and whether the streams use 128-bit
loads and stores.

    python scripts/check_triton_compile.py [--arch 90] [--quick]

The launchers are run on meta tensors with the kernels swapped for recorders, so exactly the
arguments, constexprs, warps and stages a real launch would use are compiled, for each tile
configuration the launchers would pick (lor2c_ops/triton/lor2c.py config_for) and the dtype and
rank variants. Fails (exit 1) if a kernel does not compile, spills registers, or a bf16/fp16
variant has no tensor-core instruction.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU, even here

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lor2c_ops.triton import lor2c as tk  # noqa: E402

_PTR = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


class _Recorder:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))

        return record


def _record(call):
    launches = []
    saved = {}
    for name in ("_fwd", "_grad_pass", "_sum_chunks", "_input_pass", "_reduce_parts"):
        saved[name] = getattr(tk, name)
        setattr(tk, name, _Recorder(saved[name], launches))
    try:
        call()
    finally:
        for name, fn in saved.items():
            setattr(tk, name, fn)
    return launches


def _signature(fn, args, kwargs):
    sig, consts, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        # what the JIT specialises a real launch on: 16-byte aligned pointers and integers
        # divisible by 16 (row strides, sizes) are marked so
        if isinstance(value, torch.Tensor) or (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value % 16 == 0
            and value != 0
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: {type(value)}")
    options = {}
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
        else:
            sig[name] = "constexpr"
            consts[(fn.arg_names.index(name),)] = value
    return sig, consts, attrs, options


def _source(fn, sig, consts, attrs):
    """The ASTSource of one launch, in the form of the Triton at hand: 3.3 and later take names,
    constexprs and attrs by index tuple; 3.2 names and an AttrsDescriptor from hints; 3.0-3.1
    (torch 2.4-2.5) argument indices and an AttrsDescriptor of divisible indices."""
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    divisible = sorted(key[0] for key, spec in attrs.items() if ["tt.divisibility", 16] in spec)
    runtime = {n: t for n, t in sig.items() if t != "constexpr"}
    try:  # 3.2
        from triton.backends.compiler import AttrsDescriptor

        return ASTSource(
            fn,
            runtime,
            {fn.arg_names[key[0]]: value for key, value in consts.items()},
            AttrsDescriptor.from_hints({i: 16 for i in divisible}),
        )
    except ImportError:  # 3.0, 3.1
        from triton.compiler.compiler import AttrsDescriptor

        index = {name: i for i, name in enumerate(fn.arg_names)}
        return ASTSource(
            fn,
            {index[n]: t for n, t in runtime.items()},
            {key[0]: value for key, value in consts.items()},
            AttrsDescriptor(divisible_by_16=tuple(divisible)),
        )


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (its PTX version needs that one)."""
    from triton.backends.nvidia import compiler

    if not hasattr(compiler, "get_ptxas"):  # 3.0-3.2
        return compiler._path_to_binary("ptxas")[0]
    params = inspect.signature(compiler.get_ptxas).parameters
    tool = compiler.get_ptxas(arch) if params else compiler.get_ptxas()  # 3.4: no argument
    return tool.path if hasattr(tool, "path") else tool[0]  # 3.3: a (path, version) tuple


def _resources(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        text = subprocess.run(
            [
                _ptxas(arch),
                f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}",
                "-v",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return dict(
        regs=int(regs.group(1)) if regs else -1,
        spill=int(spill.group(1)) if spill else (0 if regs else -1),
    )


def _variants(quick: bool):
    """(label, call) pairs: every launcher path at the configurations it would pick."""
    dev = torch.device("meta")
    cases = []
    for dtype, wdtype in (
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
    ):
        for r in (16,) if quick else (16, 64):
            for p in (0.0, 0.1):
                for grouped in (False,) if quick else (False, True):
                    cases.append((dtype, wdtype, r, p, grouped, 16384, 4096))
    # tiny: one row split, so the passes write dA and dB themselves (DIRECT)
    cases += [(torch.bfloat16, torch.float32, 16, p, False, 8, 64) for p in (0.0, 0.1)]
    out = []
    for dtype, wdtype, r, p, grouped, n, d in cases:
        G = 8 if grouped else 1
        fp32 = dtype == torch.float32
        cfg = tk.config_for(torch.device("cuda"), d, tk.rank_pad(r), fp32)
        x = torch.empty(n, d, device=dev, dtype=dtype)
        A = torch.empty(G, r, d, device=dev, dtype=wdtype)
        B = torch.empty(G, d, r, device=dev, dtype=wdtype)
        t = torch.empty(n, r, device=dev, dtype=torch.float32)
        seed = torch.empty(2, device=dev, dtype=torch.int64)
        order = torch.empty(n, device=dev, dtype=torch.int64) if grouped else None
        counts = torch.empty(G + 1, device=dev, dtype=torch.int32) if grouped else None
        label = (
            f"{str(dtype)[6:]}/{str(wdtype)[6:]} r={r} p={p}"
            f"{' multi' if grouped else ''}{' tiny' if n < 1024 else ''}"
        )

        def call(x=x, A=A, B=B, t=t, seed=seed, order=order, counts=counts, p=p, cfg=cfg):
            tk._forward_impl(x, x, A, B, order, counts, 0.5, p, seed, cfg=cfg)
            tk._backward_impl(x, x, t, A, B, order, counts, 0.5, p, seed, True, True, True, cfg=cfg)

        out.append((label, call))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="variants whose label contains this")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 64)
    failures = 0
    seen = set()
    print(
        f"{'variant':34s} {'kernel':14s} {'warps':>5s} {'stg':>3s} {'smem KB':>8s} "
        f"{'regs':>5s} {'spill':>5s} {'mma':>5s} {'v4 ld/st':>9s}"
    )
    for label, call in _variants(args.quick):
        if args.only not in label:
            continue
        for fn, fargs, kwargs in _record(call):
            sig, consts, attrs, options = _signature(fn, fargs, kwargs)
            key = (
                fn.__name__,
                tuple(sorted(sig.items())),
                tuple(sorted(consts.items())),
                tuple(sorted(options.items())),
            )
            if key in seen:
                continue
            seen.add(key)
            name = fn.__name__
            try:
                k = triton.compile(
                    _source(fn, sig, consts, attrs),
                    target=target,
                    options=options,
                )
            except Exception as exc:  # noqa: BLE001 - reported, counted as a failure
                failures += 1
                print(f"{label:34s} {name:14s} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            ptx = k.asm["ptx"]
            mma = len(re.findall(r"\b(?:wgmma|mma)\.", ptx))
            v4 = len(re.findall(r"\b(?:ld|st)\.global[.\w]*\.v4\.", ptx))
            res = _resources(ptx, args.arch)
            half = "float32/float32" not in label
            needs_mma = half and name in ("_fwd", "_grad_pass", "_input_pass")
            bad = res["spill"] != 0 or (needs_mma and mma == 0)
            failures += bad
            print(
                f"{label:34s} {name:14s} {options.get('num_warps', 4):5d} "
                f"{options.get('num_stages', 3):3d} {k.metadata.shared / 1024:8.1f} "
                f"{res['regs']:5d} {res['spill']:5d} {mma:5d} {v4:9d}"
                f"{'  <- spills or no tensor cores' if bad else ''}"
            )
    print(f"{len(seen)} kernels compiled for sm_{args.arch}; {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
