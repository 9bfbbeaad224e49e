"""The benchmark suite: every op and the end-to-end training step, on the default device.

    python benchmarks/run.py            # CUDA when present, else the CPU (< 10 min on 2 cores)
    python benchmarks/run.py --quick    # small sizes, a smoke test (< 2 min; what CI runs)
    python benchmarks/run.py --only lor2c e2e

Runs the per-op scripts (bench_lor2c, bench_share, bench_dcft, bench_sfs) over sweeps of
tokens n, hidden size d and rank r with shapes named after real models, then bench_e2e, with a
progress bar. Prints each script's table as it finishes and a summary table at the end; writes
suite-<device>-<commit>-<time>.{json,csv,md} (keyed by device name, torch and triton versions
and commit) and PNG plots (speedup per op and shape, memory per provider) to
benchmarks/results/local/ (git-ignored: a run leaves the working tree clean). With --publish
they go to benchmarks/results/ instead and the plots are also copied to
results/latest-<device>-*.png, the README's figures (then commit them).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import inspect
import io
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import summary  # noqa: E402


def benches() -> list:
    """(name, module) of every benchmarks/bench_<name>.py, in their SUITE_ORDER: each script
    declares its own suite jobs and summary rows, so adding one is adding its file."""
    names = sorted(
        f[len("bench_") : -len(".py")]
        for f in os.listdir(HERE)
        if f.startswith("bench_") and f.endswith(".py")
    )
    modules = [(name, importlib.import_module(f"bench_{name}")) for name in names]
    return sorted(
        (m for m in modules if hasattr(m[1], "suite_jobs")), key=lambda m: m[1].SUITE_ORDER
    )


def suite_jobs(device_type: str, quick: bool) -> list:
    return [job for _, module in benches() for job in module.suite_jobs(device_type, quick)]


def run_job(job: common.Job, device: str, bar: common.Progress) -> tuple[dict, str]:
    module = importlib.import_module(f"bench_{job.bench}")
    argv = [*job.argv, "--device", device, "--no-save"]
    kwargs = {}
    if "progress" in inspect.signature(module.main).parameters:
        kwargs["progress"] = bar.note
    printed, errors = io.StringIO(), io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(printed),
            contextlib.redirect_stderr(errors),
            common.native_stderr_to_null(),
        ):
            result = module.main(argv, **kwargs)
    except (Exception, SystemExit) as error:
        detail = errors.getvalue().strip().splitlines()[-3:]
        raise JobFailed(
            f"{type(error).__name__}: {error}" + "".join(f"\n    {line}" for line in detail)
        ) from error
    return result, printed.getvalue()


class JobFailed(RuntimeError):
    pass


def write(
    out_dir: str, stamp: str, meta: dict, jobs: list[dict], entries: list[dict], logs: list[str]
) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"suite-{meta['device_type']}-{meta['commit']}-{stamp}")
    paths = {"json": base + ".json", "csv": base + ".csv", "md": base + ".md"}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "summary": entries, "jobs": jobs}, f, indent=1)
    flat = [
        {"job": job["label"], "bench": job["name"], **row} for job in jobs for row in job["rows"]
    ]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    with open(paths["md"], "w") as f:
        f.write(summary.header(meta) + "\n\n" + summary.table(entries) + "\n\n")
        f.write("\n\n".join(logs))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--only", nargs="+", choices=[name for name, _ in benches()], help="run these scripts only"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write to benchmarks/results/ (tracked) and update the README's "
        "results/latest-<device>-*.png; without it results go to the git-ignored "
        "benchmarks/results/local/",
    )
    parser.add_argument(
        "--out",
        help="results folder (default: benchmarks/results/local, "
        "benchmarks/results/quick for --quick, both git-ignored; "
        "benchmarks/results with --publish)",
    )
    args = parser.parse_args(argv)
    if args.publish and args.quick:
        parser.error(
            "--publish: --quick results are a smoke test at small sizes, not figures to publish"
        )
    if args.out is None:
        args.out = os.path.join(
            HERE, "results", "quick" if args.quick else "" if args.publish else "local"
        )
    device = torch.device(args.device)
    jobs = suite_jobs(device.type, args.quick)
    if args.only:
        jobs = [job for job in jobs if job.bench in args.only]

    meta = {
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"lor2c_ops benchmark suite on {meta['device']} (torch {meta['torch']}, triton "
        f"{meta['triton']}, commit {meta['commit']}): {len(jobs)} jobs\n",
        flush=True,
    )
    bar = common.Progress(
        [job.seconds for job in jobs], stream=os.fdopen(os.dup(2), "w", buffering=1)
    )
    results, logs, failed = [], [], []
    t0 = time.perf_counter()
    for job in jobs:
        bar.start(job.label)
        start = time.perf_counter()
        try:
            result, printed = run_job(job, args.device, bar)
        except JobFailed as error:  # one broken script must not hide the others' results
            bar.clear()
            print(f"FAILED {job.label}: {error}\n", flush=True)
            failed.append(job.label)
            bar.finish()
            continue
        seconds = time.perf_counter() - start
        bar.clear()
        log = f"## {job.label} ({seconds:.0f} s)\n\n{printed.strip()}\n"
        print(log, flush=True)
        logs.append(log)
        targets = [line for line in printed.splitlines() if line.startswith(("PASS", "MISS"))]
        results.append(
            {"label": job.label, "argv": job.argv, "seconds": seconds, "targets": targets, **result}
        )
        bar.finish()
    bar.clear()
    meta["seconds"] = time.perf_counter() - t0

    entries = summary.entries(results)
    print(summary.header(meta))
    print()
    print(summary.table(entries))
    for line in summary.targets(results):
        print(line)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = write(args.out, stamp, meta, results, entries, logs)
    if not args.no_plots and entries:
        import plots

        base = paths["json"][: -len(".json")]
        for kind, path in plots.draw(entries, meta, base).items():
            paths[kind] = path
            if args.publish:
                shutil.copyfile(path, os.path.join(args.out, f"latest-{device.type}-{kind}.png"))
    print("\nresults: " + ", ".join(paths[k] for k in sorted(paths)))
    print(f"suite time: {meta['seconds'] / 60:.1f} min")
    if failed:
        print(f"FAILED jobs: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
