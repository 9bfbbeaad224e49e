"""Host time per call: what each provider costs the CPU to issue one forward + backward at a
tiny shape (where the kernels themselves take no time), against the eager PyTorch expression.

    python benchmarks/bench_host.py [--device cpu|cuda] [--quick]

Target (issue 10): every fused backend at most half the eager expression's host time. Timed
round-robin (providers interleaved) so that load from other processes hits them alike; on a GPU
the device is synchronised only at the end of each batch of calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import summary  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops import backends  # noqa: E402

TARGET = 0.5


def _eager_lor2c(x, layer_out, A, B, p):
    xd = torch.nn.functional.dropout(x, p) if p > 0 else x
    return layer_out + (xd @ A.T @ B.T) * 2.0


def _eager_multi(x, layer_out, A_bank, B_bank, ids, p):
    """The loop-free expression: project onto every adapter, keep each row's own, project back."""
    xd = torch.nn.functional.dropout(x, p) if p > 0 else x
    t = torch.einsum("nd,grd->ngr", xd, A_bank)
    sel = torch.nn.functional.one_hot(ids.clamp(min=0), A_bank.shape[0]).to(x.dtype)
    sel = sel * (ids >= 0).to(x.dtype)[:, None]
    u = t * sel[:, :, None]
    return layer_out + 2.0 * torch.einsum("ngr,gor->no", u, B_bank)


def _eager_dcft(x, W, b, A, B, C, p):
    xd = torch.nn.functional.dropout(x, p) if p > 0 else x
    D = torch.nn.functional.conv_transpose2d((A.T @ B.T)[None, None], C[None, None], stride=2)[0, 0]
    return torch.nn.functional.linear(x, W, b) + 2.0 * (xd @ D)


def cases(device, p):
    """{op: (inputs needing grad, {provider: fn})} at tiny shapes."""
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    n, d, r = 8, 64, 4
    mk = lambda *s: torch.randn(*s, device=device, dtype=dt, requires_grad=True)
    x, lout, A, B = mk(n, d), mk(n, d), mk(r, d), mk(d, r)
    G = 4
    Ab, Bb = mk(G, r, d), mk(G, d, r)
    ids = torch.arange(n, device=device) % G
    W = torch.randn(d, d, device=device, dtype=dt)
    bias = torch.randn(d, device=device, dtype=dt)
    Ad, Bd, Cd = mk(1, 32), mk(32, 1), mk(2, 2)
    fused = [
        name
        for name in ("cpu", "triton", "cuda")
        if backends.BACKENDS[name].refuses(device, dt, "lor2c") is None
    ]
    out = {
        "lor2c": (
            (x, lout, A, B),
            dict(
                eager=lambda: _eager_lor2c(x, lout, A, B, p),
                **{
                    f"fused ({b})": (
                        lambda b=b: lo.lor2c_residual(x, lout, A, B, 2.0, p, backend=b)
                    )
                    for b in fused
                },
            ),
        ),
        "multi-adapter (4)": (
            (x, lout, Ab, Bb),
            dict(
                eager=lambda: _eager_multi(x, lout, Ab, Bb, ids, p),
                **{
                    f"fused ({b})": (
                        lambda b=b: lo.lor2c_residual(
                            x, lout, Ab, Bb, 2.0, p, backend=b, adapter_ids=ids
                        )
                    )
                    for b in fused
                    if backends.BACKENDS[b].refuses(device, dt, "lor2c_multi") is None
                },
            ),
        ),
        "dcft": (
            (x, Ad, Bd, Cd),
            dict(
                eager=lambda: _eager_dcft(x, W, bias, Ad, Bd, Cd, p),
                **{
                    f"fused ({b})": (
                        lambda b=b: lo.dcft_linear(
                            x, W, bias, Ad, Bd, Cd, 2.0, dropout_p=p, backend=b
                        )
                    )
                    for b in fused
                    if backends.BACKENDS[b].refuses(device, dt, "dcft") is None
                },
            ),
        ),
    }
    return out, dt


def host_times(inputs, providers, device, rounds, calls):
    g = None
    per = {name: [] for name in providers}
    for name, fn in providers.items():  # warm up (compiles Triton kernels, caches)
        for _ in range(5):
            y = fn()
            g = torch.ones_like(y) if g is None else g
            torch.autograd.grad(y, inputs, g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(rounds):
        for name, fn in providers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.autograd.grad(fn(), inputs, g)
            sync()
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in per.items()}


def run(device: torch.device, quick: bool = False, rounds: int = 15, calls: int = 100) -> list:
    rows = []
    if quick:
        rounds, calls = 3, 20
    for p in (0.0, 0.1):
        table, dt = cases(device, p)
        for op, (inputs, providers) in table.items():
            us = host_times(inputs, providers, device, rounds, calls)
            base = us["eager"]
            for name, v in us.items():
                rows.append(
                    dict(
                        op=op,
                        p=p,
                        provider=name,
                        host_us=v,
                        ms=v / 1e3,
                        ratio=v / base,
                        dtype=str(dt)[6:],
                    )
                )
    return rows


def report(rows, quick=False) -> None:
    print(f"{'op':20s} {'p':>4s} {'provider':16s} {'host us':>9s} {'vs eager':>9s}")
    for row in rows:
        mark = ""
        if row["provider"] != "eager":
            ok = row["ratio"] <= TARGET
            mark = ("PASS" if ok else "MISS") + f" (target <= {TARGET}x eager)"
            if quick:
                mark = "(quick: not a target check)"
        print(
            f"{row['op']:20s} {row['p']:4.1f} {row['provider']:16s} {row['host_us']:9.1f} "
            f"{row['ratio']:8.2f}x {mark}"
        )


# --- in the suite (benchmarks/run.py collects suite_jobs; summary.py calls summarise) ----------
# seconds: each job's run time on a quiet 2-core Sapphire Rapids (CPU) or an H200 (GPU): the
# progress bar's weights, not limits.
SUITE_ORDER = 50


def suite_jobs(device_type: str, quick: bool) -> list:
    if quick:
        return [common.Job("host", ["--quick"], "host (quick)", 8)]
    return [
        common.Job(
            "host", [], "host time per call, tiny shapes", 40 if device_type == "cuda" else 25
        )
    ]


def summarise(job: dict) -> list[dict]:
    """This script's rows of the suite summary (benchmarks/summary.py)."""
    rows = job["rows"]
    out = []
    for row in rows:
        if row["provider"] == "eager":
            continue
        base = summary.pick(rows, op=row["op"], p=row["p"], provider="eager")
        out.append(
            summary.entry(
                f"host time: {row['op']}",
                f"n=8 d=64 r=4 {row['dtype']}",
                f"p={row['p']}",
                row,
                base,
            )
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_arguments(ap, "fewer rounds: a smoke test")
    ap.add_argument("--rounds", type=int, default=15, help="round-robin rounds (median taken)")
    ap.add_argument("--calls", type=int, default=100, help="calls per provider per round")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    # One thread: host time is one thread's work, and at these sizes no kernel gains from more;
    # other threads only add wake-ups, and on a loaded machine, waits for a descheduled BLAS
    # worker (seen: eager's tiny products 10x slower, a ratio that flatters the fused ops).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        rows = run(device, args.quick, args.rounds, args.calls)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "bench": "host",
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "n": 8,
        "d": 64,
        "r": 4,
        "threads": 1,
        "load_average": load,
    }
    print(
        f"Host time per forward + backward (torch.autograd.grad), n=8 d=64 r=4, one thread, on "
        f"{meta['device']}; commit {meta['commit']}; load average {load:.1f}"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"WARNING: the machine is loaded (load average {load:.1f} on {os.cpu_count()} "
            f"CPUs): times are inflated; ratios hold only as far as the load hit all alike"
        )
    report(rows, args.quick)
    return common.finish("host", rows, meta, args)


if __name__ == "__main__":
    main()
