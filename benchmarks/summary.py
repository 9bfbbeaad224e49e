"""One row per op, shape and case out of the benchmark scripts' own rows: the fused provider,
the baseline people use today, the speedup, and memory (the suite's table and plots).

Baselines: the published code's expression eager for LoR2C (`eager`) and DCFT (`published`),
gathered `bank[idx]` + the reference expression for ShareLoR2C (`gather-ref`), a Python loop
over adapters for multi-adapter batches, the dense SVD for SFS, and the reference-expression
model for the end-to-end step. Memory: peak bytes of a forward + backward above the inputs
where measured (GPU; DCFT on every device), else the bytes the graph keeps for backward.
"""
from __future__ import annotations

import common

NOT_FUSED = {"eager", "compiled", "reference", "published", "linear"}


def _memory(row: dict) -> tuple:
    if row.get("peak_mb") is not None:
        return row["peak_mb"], "peak"
    if row.get("saved_mb") is not None:
        return row["saved_mb"], "saved"
    return None, None


def _entry(op, shape, case, row, base, compiled=None, **extra) -> dict:
    mem, kind = _memory(row)
    base_mem, _ = _memory(base) if base else (None, None)
    return {"op": op, "shape": shape, "case": case, "provider": row["provider"],
            "ms": row["ms"], "iqr_ms": row.get("iqr_ms"),
            "baseline": base["provider"] if base else None,
            "baseline_ms": base["ms"] if base else None,
            "speedup": base["ms"] / row["ms"] if base else None,
            "compiled_ms": compiled["ms"] if compiled else None,
            "vs_compiled": compiled["ms"] / row["ms"] if compiled else None,
            "mem_mb": mem, "baseline_mem_mb": base_mem, "mem_kind": kind, **extra}


def _pick(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _per_p(job, op, shape, baseline, **fields):
    """Scripts with a row per (p, mode, provider): the fused providers' fwd+bwd rows."""
    rows = job["rows"]
    out = []
    for p in dict.fromkeys(r["p"] for r in rows):
        for row in rows:
            if row["p"] == p and row["mode"] == "fwd+bwd" and row["provider"] not in NOT_FUSED:
                out.append(_entry(op, shape, f"p={p}", row,
                                  _pick(rows, p=p, mode="fwd+bwd", provider=baseline),
                                  _pick(rows, p=p, mode="fwd+bwd", provider="compiled"),
                                  **{key: row.get(key) for key in fields}))
    return out


def _lor2c(job):
    m = job["meta"]
    return _per_p(job, "LoR2C residual", f"n={m['n']} d={m['d']} r={m['r']} {m['dtype']}",
                  "eager", of_limit=True, of_bandwidth=True)


def _dcft(job):
    m = job["meta"]
    return _per_p(job, "DCFT linear", f"n={m['n']} d={m['d']} k={m['k']} r={m['r']} {m['dtype']}",
                  "published", over_linear=True)


def _share(job):
    meta, rows = job["meta"], job["rows"]
    out = []
    for d, dtype in dict.fromkeys((r["d"], r["dtype"]) for r in rows):
        mine = [r for r in rows if r["d"] == d and r["dtype"] == dtype
                and r.get("mode", "fwd+bwd") == "fwd+bwd"]
        stack = [r for r in mine if "vs_gather_ref" in r]
        multi = [r for r in mine if "vs_loop" in r]
        banked = _pick(stack, provider="banked")
        if banked:
            out.append(_entry("ShareLoR2C stack", f"{meta['layers']} layers n={meta['n']} d={d} "
                              f"r={meta['r']} {dtype}", f"p={meta['p']}", banked,
                              _pick(stack, provider="gather-ref"),
                              _pick(stack, provider="compiled"),
                              vs_separate=banked.get("vs_separate"),
                              of_limit=banked.get("of_limit")))
        launch = _pick(multi, provider="one launch")
        if launch:
            out.append(_entry("multi-adapter batch", f"n={meta['n']} d={d} r={meta['r']} "
                              f"{dtype}", launch["case"], launch,
                              _pick(multi, provider="python loop"),
                              _pick(multi, provider="compiled"),
                              of_limit=launch.get("of_limit")))
    return out


def _sfs(job):
    meta, rows = job["meta"], job["rows"]
    return [_entry("SFS", f"d={meta['d']} r={meta['r']} fp32", "", _pick(rows, provider="factored"),
                   _pick(rows, provider="dense"))]


def _host(job):
    rows = job["rows"]
    out = []
    for row in rows:
        if row["provider"] == "eager":
            continue
        base = _pick(rows, op=row["op"], p=row["p"], provider="eager")
        out.append(_entry(f"host time: {row['op']}", f"n=8 d=64 r=4 {row['dtype']}",
                          f"p={row['p']}", row, base))
    return out


def _e2e(job):
    rows, shapes = job["rows"], job["meta"].get("models", {})
    out = []
    for model in dict.fromkeys(r.get("model") for r in rows):
        mine = [r for r in rows if r.get("model") == model]
        s = shapes.get(model)
        shape = (f"hidden {s['hidden']}, {s['layers']} layers, {s['batch']} x {s['seq']} tokens "
                 f"{s['dtype']}" if s else model)
        for provider, baseline in (("lor2c-fused", "lor2c-reference"),
                                   ("lora-peft", "lor2c-reference"),
                                   ("dcft-fused", "dcft-published")):
            row = _pick(mine, provider=provider)
            if row:
                out.append(_entry(f"training step {model}", shape, "", row,
                                  _pick(mine, provider=baseline),
                                  tokens_per_s=row.get("tokens_per_s")))
    return out


SUMMARISE = {"lor2c": _lor2c, "dcft": _dcft, "share": _share, "sfs": _sfs, "e2e": _e2e,
             "host": _host}


def entries(results: list[dict]) -> list[dict]:
    out = []
    for job in results:
        for entry in SUMMARISE[job["name"]](job):
            out.append({"job": job["label"], **entry})
    return out


def header(meta: dict) -> str:
    return (f"Summary on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit "
            f"{meta['commit']}{' (quick: a smoke test at small sizes)' if meta.get('quick') else ''}"
            ". Forward + backward (ops) or a whole optimizer step (training step); speedup "
            "against the baseline people run today, measured in the same run; memory: peak of a "
            "step above its inputs where measured (peak), else bytes kept for backward (saved); "
            "of limit: the memory-bound time of docs/math.md section 1.2 timed as out-of-place "
            "adds (fresh "
            "outputs, as the op returns) over the op's time; of bandwidth: the same against adds "
            "into preallocated outputs (pure copy bandwidth).")


def table(rows: list[dict]) -> str:
    shown = []
    for row in rows:
        mem = row["mem_mb"]
        base_mem = row["baseline_mem_mb"]
        shown.append({**row,
                      "memory": (f"{mem:.1f} vs {base_mem:.1f} MB {row['mem_kind']}"
                                 if mem is not None and base_mem is not None else None)})
    return common.format_table(shown, [
        ("op", "op", ""), ("shape", "shape", ""), ("case", "case", ""),
        ("provider", "fused", ""), ("ms", "ms", ".2f"), ("baseline", "baseline", ""),
        ("baseline_ms", "baseline ms", ".2f"), ("speedup", "speedup", ",.2f"),
        ("vs_compiled", "vs compiled", ".2f"), ("of_limit", "of limit", ".0%"),
        ("of_bandwidth", "of bandwidth", ".0%"),
        ("tokens_per_s", "tokens/s", ",.0f"), ("memory", "memory", "")])


def targets(results: list[dict]) -> list[str]:
    """The scripts' PASS/MISS lines, labelled with their job."""
    return [f"{line}  [{job['label']}]" for job in results for line in job.get("targets", [])]
