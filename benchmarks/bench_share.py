"""Benchmark of ShareLoR2C weight banks and multi-adapter batches (DESIGN.md 2.2).

    python benchmarks/bench_share.py                 # CPU: 12 layers, d=768, r=8, n=4096, fp32
    python benchmarks/bench_share.py --device cuda   # GPU: also d=4096, bf16

Part 1, a 12-layer stack of adapters sharing one A (forward + backward of every layer's adapter):
  banked      ShareLoR2C: each layer reads A_bank[g], B_bank[l] in place through the fused op
  separate    one A parameter and per-layer B parameters through the fused op
  gather-ref  what libraries do today: A_bank[idx] / B_bank[idx] gathered (a copy every call),
              then the reference expression
Part 2, multi-adapter batches: 8 adapters mixed in one batch in one launch, against a Python
loop over the 8 adapters (gather the adapter's rows, run the fused op, scatter back).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops.modules.share import ShareLoR2C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stack_case(device, dtype, layers, n, d, r, p, repeat):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(layers)]
    los = [torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(layers)]
    gs = [torch.randn(n, d, generator=gen).to(device, dtype) for _ in range(layers)]
    share = ShareLoR2C(layers, d, r=r, dropout=p).to(device, dtype)
    torch.nn.init.normal_(share.B_bank, std=0.01)
    A = torch.nn.Parameter(share.A_bank.detach()[0].clone())
    Bs = [torch.nn.Parameter(share.B_bank.detach()[l].clone()) for l in range(layers)]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    index = [torch.tensor([l], device=device) for l in range(layers)]

    def banked():
        return [share(l, xs[l], los[l]) for l in range(layers)]

    def separate():
        return [lo.lor2c_residual(xs[l], los[l], A, Bs[l], share.scaling, p) for l in range(layers)]

    def gather_ref():
        outs = []
        for l in range(layers):
            a = share.A_bank.index_select(0, zero)[0]
            b = share.B_bank.index_select(0, index[l])[0]
            outs.append(los[l] + (F.dropout(xs[l], p) @ a.T @ b.T) * share.scaling)
        return outs

    rows = []
    params = {"banked": [share.A_bank, share.B_bank], "separate": [A, *Bs],
              "gather-ref": [share.A_bank, share.B_bank]}
    fns = {"gather-ref": gather_ref, "separate": separate, "banked": banked}
    cases = {"limit": limit_case(xs[0], los[0])}
    for name, fn in fns.items():
        def step(fn=fn, inputs=xs + params[name]):
            return torch.autograd.grad(fn(), inputs, gs)

        step()
        cases[name] = (step, None)
    times = common.timed(cases, device, repeat)  # round-robin: load hits every provider alike
    limit_ms = 2 * layers * times.pop("limit")[0]  # 3 n*d elements each way, per layer
    for name, fn in fns.items():
        ms, spread = times[name]
        saved = common.saved_bytes(lambda fn=fn: fn(), exclude=tuple(xs + los + params[name]))
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            cases[name][0]()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        rows.append({"case": f"{layers}-layer stack", "provider": name, "ms": ms,
                     "iqr_ms": spread, "saved_mb": saved / 2**20, "peak_mb": peak,
                     **limit_fields(limit_ms, ms, 2 * layers * 3 * n * d * xs[0].element_size())})
        print(f"  stack {name:<10} {ms:8.2f} ms", file=sys.stderr)
    base = {r["provider"]: r["ms"] for r in rows}
    for r in rows:
        r["vs_gather_ref"] = base["gather-ref"] / r["ms"]
        r["vs_separate"] = base["separate"] / r["ms"]
    return rows


def limit_case(x, layer_out):
    """The memory-bound limit of one layer's adapter, one way (DESIGN.md 2.1: 3 n*d elements),
    timed as an out-of-place add in the same round-robin as the providers."""
    a, b = x.detach().clone(), layer_out.detach().clone()
    return (lambda: torch.add(a, b), None)


def limit_fields(limit_ms, ms, bytes_moved):
    return {"gbps": bytes_moved / (ms * 1e-3) / 1e9, "of_limit": limit_ms / ms}


def multi_case(device, dtype, adapters, n, d, r, p, repeat):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    layer_out = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(n, d, generator=gen).to(device, dtype)
    A = (torch.randn(adapters, r, d, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(adapters, d, r, generator=gen) * 0.01).to(device, dtype).requires_grad_()
    ids = torch.randint(0, adapters, (n,), generator=gen).to(device)
    groups = [(a, (ids == a).nonzero().squeeze(1)) for a in range(adapters)]

    def one_launch():
        return lo.lor2c_residual(x, layer_out, A, B, 2.0, p, adapter_ids=ids)

    def python_loop():
        out = layer_out
        for a, rows in groups:
            part = lo.lor2c_residual(x[rows], layer_out[rows], A[a], B[a], 2.0, p)
            out = out.index_copy(0, rows, part)
        return out

    cases = {"limit": limit_case(x, layer_out)}
    for name, fn in (("python loop", python_loop), ("one launch", one_launch)):
        def step(fn=fn):
            return torch.autograd.grad(fn(), [x, layer_out, A, B], g)

        step()
        cases[name] = (step, None)
    times = common.timed(cases, device, repeat)
    limit_ms = 2 * times.pop("limit")[0]
    rows = []
    for name in times:
        ms, spread = times[name]
        rows.append({"case": f"{adapters} adapters in one batch", "provider": name, "ms": ms,
                     "iqr_ms": spread,
                     **limit_fields(limit_ms, ms, 2 * 3 * n * d * x.element_size())})
        print(f"  multi {name:<11} {ms:8.2f} ms", file=sys.stderr)
    for r in rows:
        r["vs_loop"] = rows[0]["ms"] / r["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, nargs="+")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--p", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=10)
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = [(d, "fp32") for d in (args.d or [768])]
    if device.type == "cuda" and not args.d:
        cases.append((4096, "bf16"))
    if args.quick:
        args.layers, args.n, args.repeat, cases = 3, 256, 3, [(128, "fp32")]

    rows = []
    for d, dt in cases:
        dtype = DTYPES[dt]
        for row in stack_case(device, dtype, args.layers, args.n, d, args.r, args.p, args.repeat):
            rows.append({"d": d, "dtype": dt, **row})
        for row in multi_case(device, dtype, 8, args.n, d, args.r, args.p, args.repeat):
            rows.append({"d": d, "dtype": dt, **row})

    meta = {"bench": "share", "device": common.device_name(device), "device_type": device.type,
            "commit": common.commit(), **common.versions(), "layers": args.layers, "n": args.n,
            "r": args.r, "p": args.p}
    print(f"ShareLoR2C banks and multi-adapter batches, n={args.n} rows per layer, r={args.r}, "
          f"p={args.p}, forward + backward, on {meta['device']}; commit {meta['commit']}\n")
    stack = [r for r in rows if "vs_gather_ref" in r]
    multi = [r for r in rows if "vs_loop" in r]
    print(common.format_table(stack, [
        ("d", "d", ""), ("dtype", "dtype", ""), ("case", "case", ""), ("provider", "provider", ""),
        ("ms", "median ms", ".2f"), ("iqr_ms", "IQR ms", ".2f"),
        ("vs_gather_ref", "vs gather-ref", ".2f"), ("vs_separate", "vs separate", ".2f"),
        ("gbps", "GB/s", ".1f"), ("of_limit", "of limit", ".0%"),
        ("saved_mb", "saved MB", ".1f")] + ([("peak_mb", "peak MB", ".1f")]
                                            if device.type == "cuda" else [])))
    print()
    print(common.format_table(multi, [
        ("d", "d", ""), ("dtype", "dtype", ""), ("case", "case", ""), ("provider", "provider", ""),
        ("ms", "median ms", ".2f"), ("iqr_ms", "IQR ms", ".2f"), ("vs_loop", "speedup", ".2f"),
        ("gbps", "GB/s", ".1f"), ("of_limit", "of limit", ".0%")]))
    print()
    if args.quick:
        print("quick run: a smoke test at small sizes, where per-call overhead dominates; the targets apply to the full sizes")
    for r in ([] if args.quick else stack):
        if r["provider"] == "banked":
            # "no slower than separate": within the timer's spread on a shared machine
            ok_b = r["ms"] <= rows_by(stack, r, "separate")["ms"] * 1.05
            ok_a = r["vs_gather_ref"] > 1.0
            print(f"{'PASS' if ok_b else 'MISS'}  d={r['d']} {r['dtype']}: banked no slower than "
                  f"separate parameters (x{r['vs_separate']:.2f})")
            print(f"{'PASS' if ok_a else 'MISS'}  d={r['d']} {r['dtype']}: banked faster than "
                  f"gather + reference (x{r['vs_gather_ref']:.2f})")
    return common.finish("share", rows, meta, args)


def rows_by(rows, like, provider):
    return next(r for r in rows if r["d"] == like["d"] and r["dtype"] == like["dtype"]
                and r["provider"] == provider)


if __name__ == "__main__":
    main()
