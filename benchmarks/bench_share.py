"""Benchmark of ShareLoR2C weight banks and multi-adapter batches (docs/math.md section 2).

    python benchmarks/bench_share.py                 # CPU: 12 layers, d=768, r=8, n=4096, fp32
    python benchmarks/bench_share.py --device cuda   # GPU: also d=4096, bf16

Part 1, a 12-layer stack of adapters sharing one A (every layer's adapter):
  banked      ShareLoR2C: each layer reads A_bank[g], B_bank[l] in place through the fused op
  separate    one A parameter and per-layer B parameters through the fused op
  gather-ref  what libraries do today: A_bank[idx] / B_bank[idx] gathered (a copy every call),
              then the reference expression; `compiled` is the same under torch.compile
Part 2, multi-adapter batches, 8 adapters mixed in one batch: `one launch` (the fused op with
adapter_ids) against a Python loop over the 8 adapters (gather the adapter's rows, run the fused
op, scatter back) and against a loop-free PyTorch expression (`eager`, and `compiled`).
Forward, backward and both; median and spread (round-robin on a CPU), speedups, GB/s and the
fraction of the memory-bound limit measured in the same run, bytes kept for backward.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import summary  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops import backends, info  # noqa: E402
from lor2c_ops.modules.share import ShareLoR2C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# The ops' shapes, once: "large" follows this script's defaults, "small" is the pytest-benchmark
# default (benchmarks/test_bench_ops.py reads both from here). share: a bank of L adapters
# called one by one; multi: a batch mixing G adapters in one launch.
BENCH_OPS = {
    "share": dict(
        kernel_op="lor2c",
        sizes={
            ("small", "cpu"): dict(n=2048, d=768, r=8, L=4),
            ("large", "cpu"): dict(n=4096, d=768, r=8, L=12),
            ("small", "cuda"): dict(n=4096, d=1024, r=8, L=4),
            ("large", "cuda"): dict(n=4096, d=4096, r=8, L=12),
        },
    ),
    "multi": dict(
        kernel_op="lor2c_multi",
        sizes={
            ("small", "cpu"): dict(n=2048, d=768, r=8, G=4),
            ("large", "cpu"): dict(n=4096, d=768, r=8, G=8),
            ("small", "cuda"): dict(n=4096, d=1024, r=8, G=4),
            ("large", "cuda"): dict(n=4096, d=4096, r=8, G=8),
        },
    ),
}


def time_modes(providers: dict, gs, device, repeat: int, limit) -> tuple[float, dict]:
    """(limit ms, {(name, mode): (median ms, IQR ms)}) for fwd, bwd and fwd+bwd of providers
    {name: (forward, inputs)}, timed round-robin with the memory-bound limit case."""
    cases = {"limit": limit}
    for name, (forward, inputs) in providers.items():
        for mode, case in common.mode_cases(forward, inputs, gs).items():
            cases[name, mode] = case
    times = common.timed(cases, device, repeat)
    return times.pop("limit")[0], times


def limit_case(x, layer_out):
    """The memory-bound limit of one layer's adapter, one way (docs/math.md section 1.2: 3 n*d
    elements), timed as an out-of-place add in the same round-robin as the providers."""
    a, b = x.detach().clone(), layer_out.detach().clone()
    return (lambda: torch.add(a, b), None)


def mode_rows(case, times, limit_ms, bytes_one_way, baselines, extra=None):
    """Rows per (mode, provider): speedups against each baseline provider of the same mode,
    achieved GB/s and the fraction of the limit (fwd+bwd moves twice a one-way pass)."""
    rows = []
    for (name, mode), (ms, spread) in times.items():
        factor = 2 if mode == "fwd+bwd" else 1
        row = {
            "case": case,
            "mode": mode,
            "provider": name,
            "ms": ms,
            "iqr_ms": spread,
            "gbps": factor * bytes_one_way / (ms * 1e-3) / 1e9,
            "of_limit": factor * limit_ms / ms,
            **(extra or {}).get(name, {}),
        }
        for key, base in baselines.items():
            row[key] = times[base, mode][0] / ms
        rows.append(row)
    return rows


def stack_case(device, dtype, layers, n, d, r, p, repeat):
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(layers)
    ]
    los = [
        torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(layers)
    ]
    gs = [torch.randn(n, d, generator=gen).to(device, dtype) for _ in range(layers)]
    share = ShareLoR2C(layers, d, r=r, dropout=p).to(device, dtype)
    torch.nn.init.normal_(share.B_bank, std=0.01)
    A = torch.nn.Parameter(share.A_bank.detach()[0].clone())
    Bs = [torch.nn.Parameter(share.B_bank.detach()[i].clone()) for i in range(layers)]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    index = [torch.tensor([i], device=device) for i in range(layers)]

    def banked():
        return [share(i, xs[i], los[i]) for i in range(layers)]

    def separate():
        return [lo.lor2c_residual(xs[i], los[i], A, Bs[i], share.scaling, p) for i in range(layers)]

    def gather_ref():
        outs = []
        for i in range(layers):
            a = share.A_bank.index_select(0, zero)[0]
            b = share.B_bank.index_select(0, index[i])[0]
            outs.append(los[i] + (F.dropout(xs[i], p) @ a.T @ b.T) * share.scaling)
        return outs

    bank = [share.A_bank, share.B_bank]
    providers = {
        "gather-ref": (gather_ref, xs + bank),
        "compiled": (torch.compile(gather_ref), xs + bank),
        "separate": (separate, xs + [A, *Bs]),
        "banked": (banked, xs + bank),
    }
    limit_ms, times = time_modes(providers, gs, device, repeat, limit_case(xs[0], los[0]))
    memory = {}
    for name, (forward, inputs) in providers.items():
        saved = common.saved_bytes(forward, exclude=tuple(xs + los + inputs))
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            torch.autograd.grad(forward(), inputs, gs)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        memory[name] = {"saved_mb": saved / 2**20, "peak_mb": peak}
        print(f"  stack {name:<10} {times[name, 'fwd+bwd'][0]:8.2f} ms", file=sys.stderr)
    return mode_rows(
        f"{layers}-layer stack",
        times,
        layers * limit_ms,
        layers * 3 * n * d * xs[0].element_size(),
        {"vs_gather_ref": "gather-ref", "vs_compiled": "compiled", "vs_separate": "separate"},
        memory,
    )


def multi_reference(x, layer_out, A_bank, B_bank, ids, scale, p):
    """A multi-adapter batch in eager PyTorch without a Python loop (which cannot compile):
    project onto every adapter's A at once, zero the columns of the adapters a row does not use,
    and project back through all the B's. Row i gets A_bank[ids[i]], B_bank[ids[i]]."""
    G, r, d_in = A_bank.shape
    n = x.shape[0]
    h = F.dropout(x, p, training=True) @ A_bank.reshape(G * r, d_in).T  # (n, G*r)
    use = (ids[:, None] == torch.arange(G, device=ids.device)).to(h.dtype)  # (n, G)
    h = (h.view(n, G, r) * use[:, :, None]).view(n, G * r)
    return layer_out + (h @ B_bank.permute(1, 0, 2).reshape(-1, G * r).T) * scale


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

    def eager():
        return multi_reference(x, layer_out, A, B, ids, 2.0, p)

    inputs = [x, layer_out, A, B]
    providers = {
        "python loop": (python_loop, inputs),
        "eager": (eager, inputs),
        "compiled": (torch.compile(eager), inputs),
        "one launch": (one_launch, inputs),
    }
    limit_ms, times = time_modes(providers, g, device, repeat, limit_case(x, layer_out))
    for name in providers:
        print(f"  multi {name:<11} {times[name, 'fwd+bwd'][0]:8.2f} ms", file=sys.stderr)
    if device.type == "cpu":
        print(
            f"  multi: one launch runs the cpu backend's {backends.cpu_plan(n, r, adapters)} "
            f"plan ({info.cpu_isa()[0]} path)",
            file=sys.stderr,
        )
    return mode_rows(
        f"{adapters} adapters in one batch",
        times,
        limit_ms,
        3 * n * d * x.element_size(),
        {"vs_loop": "python loop", "vs_eager": "eager", "vs_compiled": "compiled"},
    )


# --- in the suite (benchmarks/run.py collects suite_jobs; summary.py calls summarise) ----------
# seconds: each job's run time on a quiet 2-core Sapphire Rapids (CPU) or an H200 (GPU): the
# progress bar's weights, not limits.
SUITE_ORDER = 20


def suite_jobs(device_type: str, quick: bool) -> list:
    if quick:
        return [common.Job("share", ["--quick"], "share (quick)", 10)]
    if device_type == "cuda":
        return [
            common.Job(
                "share", [], "ShareLoR2C 12 layers BERT-base and LLaMA-2-7B + 8-adapter batch", 60
            )
        ]
    return [
        common.Job(
            "share", ["--repeat", "20"], "ShareLoR2C 12 layers BERT-base + 8-adapter batch", 10
        )
    ]


def summarise(job: dict) -> list[dict]:
    """This script's rows of the suite summary (benchmarks/summary.py)."""
    meta, rows = job["meta"], job["rows"]
    out = []
    for d, dtype in dict.fromkeys((r["d"], r["dtype"]) for r in rows):
        mine = [
            r
            for r in rows
            if r["d"] == d and r["dtype"] == dtype and r.get("mode", "fwd+bwd") == "fwd+bwd"
        ]
        stack = [r for r in mine if "vs_gather_ref" in r]
        multi = [r for r in mine if "vs_loop" in r]
        banked = summary.pick(stack, provider="banked")
        if banked:
            out.append(
                summary.entry(
                    "ShareLoR2C stack",
                    f"{meta['layers']} layers n={meta['n']} d={d} r={meta['r']} {dtype}",
                    f"p={meta['p']}",
                    banked,
                    summary.pick(stack, provider="gather-ref"),
                    summary.pick(stack, provider="compiled"),
                    vs_separate=banked.get("vs_separate"),
                    of_limit=banked.get("of_limit"),
                )
            )
        launch = summary.pick(multi, provider="one launch")
        if launch:
            out.append(
                summary.entry(
                    "multi-adapter batch",
                    f"n={meta['n']} d={d} r={meta['r']} {dtype}",
                    launch["case"],
                    launch,
                    summary.pick(multi, provider="python loop"),
                    summary.pick(multi, provider="compiled"),
                    of_limit=launch.get("of_limit"),
                )
            )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, nargs="+")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--p", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="of the --d cases (default fp32)"
    )
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = [(d, args.dtype) for d in (args.d or [768])]
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

    meta = {
        "bench": "share",
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "layers": args.layers,
        "n": args.n,
        "r": args.r,
        "p": args.p,
    }
    print(
        f"ShareLoR2C banks and multi-adapter batches, n={args.n} rows per layer, r={args.r}, "
        f"p={args.p}, on {meta['device']}; commit {meta['commit']}\n"
    )
    stack = [r for r in rows if "vs_gather_ref" in r]
    multi = [r for r in rows if "vs_loop" in r]
    head = [
        ("d", "d", ""),
        ("dtype", "dtype", ""),
        ("case", "case", ""),
        ("mode", "mode", ""),
        ("provider", "provider", ""),
        ("ms", "median ms", ".2f"),
        ("iqr_ms", "IQR ms", ".2f"),
    ]
    tail = [("gbps", "GB/s", ".1f"), ("of_limit", "of limit", ".0%")]
    print(
        common.format_table(
            stack,
            head
            + [
                ("vs_gather_ref", "vs gather-ref", ".2f"),
                ("vs_compiled", "vs compiled", ".2f"),
                ("vs_separate", "vs separate", ".2f"),
            ]
            + tail
            + [("saved_mb", "saved MB", ".1f")]
            + ([("peak_mb", "peak MB", ".1f")] if device.type == "cuda" else []),
        )
    )
    print()
    print(
        common.format_table(
            multi,
            head
            + [
                ("vs_loop", "vs loop", ".2f"),
                ("vs_eager", "vs eager", ".2f"),
                ("vs_compiled", "vs compiled", ".2f"),
            ]
            + tail,
        )
    )
    print()
    if args.quick:
        print(
            "quick run: a smoke test at small sizes, where per-call overhead dominates; the "
            "targets apply to the full sizes"
        )
    for r in [] if args.quick else stack:
        if r["provider"] == "banked" and r["mode"] == "fwd+bwd":
            # "no slower than separate": within the timer's spread on a shared machine
            ok_b = r["vs_separate"] >= 1 / 1.05
            ok_a = r["vs_gather_ref"] > 1.0
            print(
                f"{'PASS' if ok_b else 'MISS'}  d={r['d']} {r['dtype']}: banked no slower than "
                f"separate parameters (x{r['vs_separate']:.2f})"
            )
            print(
                f"{'PASS' if ok_a else 'MISS'}  d={r['d']} {r['dtype']}: banked faster than "
                f"gather + reference (x{r['vs_gather_ref']:.2f}; x{r['vs_compiled']:.2f} "
                f"against it under torch.compile)"
            )
    return common.finish("share", rows, meta, args)


if __name__ == "__main__":
    main()
