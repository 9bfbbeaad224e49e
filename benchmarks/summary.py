"""One row per op, shape and case out of the benchmark scripts' own rows: the fused provider,
the baseline people use today, the speedup, and memory (the suite's table and plots).

Baselines: the published code's expression eager for LoR2C (`eager`) and DCFT (`published`),
gathered `bank[idx]` + the reference expression for ShareLoR2C (`gather-ref`), a Python loop
over adapters for multi-adapter batches, the dense SVD for SFS, and the reference-expression
model for the end-to-end step. Memory: peak bytes of a forward + backward above the inputs
where measured (GPU; DCFT on every device), else the bytes the graph keeps for backward.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import common

NOT_FUSED = {"eager", "compiled", "reference", "published", "linear"}


def memory(row: dict) -> tuple:
    if row.get("peak_mb") is not None:
        return row["peak_mb"], "peak"
    if row.get("saved_mb") is not None:
        return row["saved_mb"], "saved"
    return None, None


def entry(op, shape, case, row, base, compiled=None, **extra) -> dict:
    mem, kind = memory(row)
    base_mem, _ = memory(base) if base else (None, None)
    return {
        "op": op,
        "shape": shape,
        "case": case,
        "provider": row["provider"],
        "ms": row["ms"],
        "iqr_ms": row.get("iqr_ms"),
        "baseline": base["provider"] if base else None,
        "baseline_ms": base["ms"] if base else None,
        "speedup": base["ms"] / row["ms"] if base else None,
        "compiled_ms": compiled["ms"] if compiled else None,
        "vs_compiled": compiled["ms"] / row["ms"] if compiled else None,
        "mem_mb": mem,
        "baseline_mem_mb": base_mem,
        "mem_kind": kind,
        **extra,
    }


def pick(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def per_p(job, op, shape, baseline, **fields):
    """Scripts with a row per (p, mode, provider): the fused providers' fwd+bwd rows."""
    rows = job["rows"]
    out = []
    for p in dict.fromkeys(r["p"] for r in rows):
        for row in rows:
            if row["p"] == p and row["mode"] == "fwd+bwd" and row["provider"] not in NOT_FUSED:
                out.append(
                    entry(
                        op,
                        shape,
                        f"p={p}",
                        row,
                        pick(rows, p=p, mode="fwd+bwd", provider=baseline),
                        pick(rows, p=p, mode="fwd+bwd", provider="compiled"),
                        **{key: row.get(key) for key in fields},
                    )
                )
    return out


def entries(results: list[dict]) -> list[dict]:
    """The summary rows of a suite run: each job's script says what they are (summarise)."""
    out = []
    for job in results:
        module = importlib.import_module(f"bench_{job['name']}")
        for row in module.summarise(job):
            out.append({"job": job["label"], **row})
    return out


def header(meta: dict) -> str:
    return (
        f"Summary on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit "
        f"{meta['commit']}{' (quick: a smoke test at small sizes)' if meta.get('quick') else ''}"
        ". Forward + backward (ops) or a whole optimizer step (training step); speedup "
        "against the baseline people run today, measured in the same run; memory: peak of a "
        "step above its inputs where measured (peak), else bytes kept for backward (saved); "
        "of limit: the memory-bound time of docs/math.md section 1.2 timed as out-of-place "
        "adds (fresh "
        "outputs, as the op returns) over the op's time; of bandwidth: the same against adds "
        "into preallocated outputs (pure copy bandwidth)."
    )


def table(rows: list[dict]) -> str:
    shown = []
    for row in rows:
        mem = row["mem_mb"]
        base_mem = row["baseline_mem_mb"]
        shown.append(
            {
                **row,
                "memory": (
                    f"{mem:.1f} vs {base_mem:.1f} MB {row['mem_kind']}"
                    if mem is not None and base_mem is not None
                    else None
                ),
            }
        )
    return common.format_table(
        shown,
        [
            ("op", "op", ""),
            ("shape", "shape", ""),
            ("case", "case", ""),
            ("provider", "fused", ""),
            ("ms", "ms", ".2f"),
            ("baseline", "baseline", ""),
            ("baseline_ms", "baseline ms", ".2f"),
            ("speedup", "speedup", ",.2f"),
            ("vs_compiled", "vs compiled", ".2f"),
            ("of_limit", "of limit", ".0%"),
            ("of_bandwidth", "of bandwidth", ".0%"),
            ("tokens_per_s", "tokens/s", ",.0f"),
            ("memory", "memory", ""),
        ],
    )


def targets(results: list[dict]) -> list[str]:
    """The scripts' PASS/MISS lines, labelled with their job."""
    return [f"{line}  [{job['label']}]" for job in results for line in job.get("targets", [])]


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN = "<!-- suite table: generated by python benchmarks/summary.py <suite json> --readme -->"
END = "<!-- end of suite table -->"


def from_file(path: str) -> tuple:
    """(meta, summary rows) of a suite results file (benchmarks/run.py's JSON)."""
    with open(path) as f:
        data = json.load(f)
    rows = data.get("summary") or entries(data["jobs"])
    return data["meta"], rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="The summary table of a suite results file; --readme writes it into the "
        "README between its markers (the README's table is never pasted by hand)."
    )
    parser.add_argument("results", help="a suite-<device>-<commit>-<time>.json")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args(argv)
    meta, rows = from_file(args.results)
    text = (
        f"From `{os.path.relpath(args.results, os.path.dirname(README))}` ({meta['device']}, "
        f"commit {meta['commit']}).\n\n" + table(rows)
    )
    if not args.readme:
        print(header(meta) + "\n\n" + table(rows))
        return 0
    with open(README) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        print(f"README.md has no suite-table markers ({BEGIN} ... {END})", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)
    print(f"README.md: suite table from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
