"""Timing, memory and result-writing helpers shared by the benchmark scripts.

Times are medians over repeated runs (triton.testing.do_bench on a GPU; on the CPU a
perf_counter loop, round-robin over the providers so that load from other processes hits them
alike), with the interquartile range as the spread. The memory-bound limit of an op is
measured in the same run as the op: the time of out-of-place adds moving the same bytes. So is
its compute limit (gemm_cases): the op's multiply-adds at the rate of a square matmul; the
roofline is the larger of the two (docs/math.md section 1.2).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# The lor2c_ops measured is the one in this checkout, never another copy that an environment's
# editable install or site-packages happens to point at: the scripts import common first.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(REPO, "lor2c_ops")) and REPO not in sys.path:
    sys.path.insert(0, REPO)

# Hidden sizes named after the models that have them (the suite's job labels).
MODELS = {384: "MiniLM-L6", 768: "BERT-base", 1024: "BERT-large", 4096: "LLaMA-2-7B"}


@dataclass
class Job:
    """One run of a benchmark script in the suite. Each bench_<name>.py declares its own jobs
    (suite_jobs) and summary rows (summarise): adding a benchmark is adding its script."""

    bench: str  # benchmarks/bench_<bench>.py
    argv: list
    label: str
    seconds: float  # expected run time on the machine the list is for (the bar's weight)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 3,
    repeat: int = 15,
    setup: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """(median, interquartile range) of fn's run time in milliseconds.

    `setup`, when given, runs untimed before each call (e.g. a forward before a timed backward).
    """
    if device.type == "cuda" and setup is None:
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
        return q[1], q[2] - q[0]
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    quartiles = statistics.quantiles(times, n=4)
    return statistics.median(times), quartiles[2] - quartiles[0]


def timed(cases: dict, device: torch.device, repeat: int, warmup: int = 2) -> dict:
    """{key: (median ms, IQR ms)} for cases {key: (fn, setup or None)}.

    On a GPU each case is timed on its own (common.bench). On a CPU, which in CI is small and
    shared, the cases are timed round-robin, each repetition running every case once, so that a
    change of load slows every provider alike instead of whichever happened to be running.
    """
    if device.type == "cuda":
        return {
            key: bench(fn, device, repeat=repeat, setup=pre) for key, (fn, pre) in cases.items()
        }
    samples = {key: [] for key in cases}
    for it in range(warmup + repeat):
        for key, (fn, pre) in cases.items():
            if pre is not None:
                pre()
            t0 = time.perf_counter()
            fn()
            if it >= warmup:
                samples[key].append((time.perf_counter() - t0) * 1e3)
    result = {}
    for key, values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        result[key] = (statistics.median(values), quartiles[2] - quartiles[0])
    return result


def host_and_gpu_ms(
    fn: Callable[[], object], device: torch.device, calls: int = 20, rounds: int = 5
) -> tuple[float, float | None]:
    """(host ms, GPU ms) per call of fn on a GPU: the host time to issue a call (perf_counter
    over a batch of calls, synchronising only around the batch) and the GPU time with the host
    taken out (a CUDA-graph replay of `calls` calls; None where fn cannot be captured). A
    provider is host-bound where its host time exceeds its GPU time."""
    host = []
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e3)
        torch.cuda.synchronize(device)
    gpu = None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        replays = []
        for _ in range(rounds):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(device)
            replays.append(start.elapsed_time(end) / calls)
        gpu = statistics.median(replays)
    except Exception:  # noqa: BLE001 - e.g. a compiled graph that cannot be captured
        torch.cuda.synchronize(device)
    return statistics.median(host), gpu


def mode_cases(forward: Callable[[], object], inputs: list, grads) -> dict:
    """{"fwd" | "bwd" | "fwd+bwd": (fn, setup)} cases for `timed`: the forward alone (a training
    forward: the graph is built), the backward alone (after an untimed forward) and both. Runs
    both once first, so that compilation and warm-up stay out of the timings."""

    def both():
        return torch.autograd.grad(forward(), inputs, grads)

    state = {}

    def setup():
        state["out"] = forward()

    def backward():
        return torch.autograd.grad(state.pop("out"), inputs, grads)

    both()
    return {"fwd": (forward, None), "bwd": (backward, setup), "fwd+bwd": (both, None)}


@contextlib.contextmanager
def native_stderr_to_null():
    """Native libraries (the profiler's kineto, OpenMP) write to file descriptor 2 directly,
    past contextlib.redirect_stderr: send the descriptor itself to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def allocation_events(step: Callable[[], object], device: torch.device) -> list[tuple[int, int]]:
    """(time ns, bytes) of every allocation (> 0) and free (< 0) during one call of step(), from
    the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with native_stderr_to_null(), profile(activities=activities, profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None:
            events.append((node.start_time_ns, size))
    return sorted(events)


def peak_of(events: list[tuple[int, int]]) -> int:
    """The most bytes live at once above the start (the CPU analogue of max_memory_allocated)."""
    peak = live = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def memory_bound_ms(
    numel: int, dtype: torch.dtype, device: torch.device, elements_moved: int, repeat: int = 15
) -> dict:
    """The time to move `elements_moved` elements, measured with adds of `numel` elements.

    Two figures: `out_of_place` adds (`a + b`: a fresh output, as the op must return one; on a
    CPU that includes first-touch page faults of the new memory) and `bandwidth`, adds into a
    preallocated output (pure memory bandwidth). Each add reads two and writes one tensor.
    """
    a = torch.randn(numel, device=device).to(dtype)
    b = torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    bytes_per_add = 3 * numel * a.element_size()
    moved = elements_moved * a.element_size()
    fresh_ms, _ = bench(lambda: torch.add(a, b), device, repeat=repeat)
    into_ms, _ = bench(lambda: torch.add(a, b, out=out), device, repeat=repeat)
    return {
        "out_of_place_ms": moved / bytes_per_add * fresh_ms,
        "bandwidth_ms": moved / bytes_per_add * into_ms,
        "bandwidth": bytes_per_add / (into_ms * 1e-3),
    }


# The square matmul whose rate stands for "the machine's products" (docs/math.md section 1.2): large
# enough for the BLAS to reach its steady rate (on the 2-core EPYC, fp32: 191 GFLOP/s at 512,
# 182-193 at 768-1536), small enough to time in every round.
GEMM_SIZE = {"cpu": 1024, "cuda": 4096}


def gemm_cases(device: torch.device, dtype: torch.dtype) -> tuple[dict, int]:
    """Cases {("gemm", dtype name): (fn, None)} to time beside the providers, and the flops of one
    call. On a CPU fp32 is timed too when the op's dtype is narrower: the CPU kernels compute in
    fp32, so the faster of the two rates is the limit."""
    size = GEMM_SIZE[device.type]
    dtypes = [dtype]
    if device.type == "cpu" and dtype != torch.float32:
        dtypes.append(torch.float32)
    cases = {}
    for dt in dtypes:
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        out = torch.empty_like(a)
        cases["gemm", str(dt).removeprefix("torch.")] = (
            (lambda a=a, b=b, out=out: torch.mm(a, b, out=out)),
            None,
        )
    return cases, 2 * size**3


def gemm_rate(times: dict, flops: int) -> float:
    """The fastest matmul rate (flop/s) among the ("gemm", dtype) cases of a `timed` result."""
    return max(flops / (ms * 1e-3) for key, (ms, _) in times.items() if key[0] == "gemm")


def lor2c_flops(n: int, d_in: int, d_out: int, r: int) -> dict:
    """Floating-point operations of the LoR2C products per mode (docs/math.md section 1.2):
    forward t = xd A^T and t B^T, n r (d_in + d_out) multiply-adds; backward u = g B, dB, dA and
    dx, twice that. Adds of layer_out and the mask's multiplies are not counted."""
    fwd = 2 * n * r * (d_in + d_out)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}


def saved_bytes(run_forward: Callable[[], torch.Tensor], exclude: tuple) -> int:
    """Bytes the autograd graph of one forward keeps for backward, besides `exclude` tensors."""
    seen, total = set(), 0
    keep = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in keep and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return total


def add_output_arguments(parser, quick_help: str = "small sizes: a smoke test") -> None:
    """--device, --quick, --out and --no-save, the same in every benchmark script."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    parser.add_argument(
        "--no-save",
        action="store_true",
        help="print only; write no results file (the suite runner writes one)",
    )


def finish(name: str, rows: list[dict], meta: dict, args) -> dict:
    """Writes the results file (not for --quick or --no-save) and returns what the suite keeps."""
    if not (args.quick or args.no_save):
        print(f"\nresults: {write_results(name, rows, meta, args.out)}")
    return {"name": name, "meta": meta, "rows": rows}


def write_results(name: str, rows: list[dict], meta: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"{name}-{meta['device_type']}-{meta['commit']}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows as a Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, spec) if spec else str(value))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + body)


class Progress:
    """A progress bar on the terminal (one line, redrawn) or, when stderr is not a terminal
    (CI logs), one line per finished job. Jobs carry weights, their expected seconds, so that
    the bar and the time left move with the work rather than with the job count."""

    def __init__(self, weights: list[float], stream=None):
        self.stream = stream or sys.__stderr__
        self.tty = self.stream.isatty()
        self.weights, self.done_weight, self.index = weights, 0.0, 0
        self.t0 = time.perf_counter()
        self.label = ""

    def _line(self) -> str:
        total = sum(self.weights)
        frac = min(self.done_weight / total, 1.0) if total else 1.0
        width = 28
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = time.perf_counter() - self.t0
        left = elapsed / frac - elapsed if frac > 0.02 else None
        eta = f", ~{_clock(left)} left" if left is not None and frac < 1 else ""
        return f"[{bar}] {self.index}/{len(self.weights)} {_clock(elapsed)}{eta}  {self.label}"

    def _draw(self) -> None:
        if self.tty:
            columns = 120
            self.stream.write("\r" + self._line()[:columns].ljust(columns))
            self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()

    def start(self, label: str) -> None:
        self.label = label
        self._draw()

    def note(self, detail: str) -> None:
        """A sub-step of the running job (e.g. a provider finished)."""
        base = self.label.split("  (")[0]
        self.label = f"{base}  ({detail})"
        self._draw()

    def finish(self) -> None:
        self.done_weight += self.weights[self.index]
        self.index += 1
        if self.tty:
            self._draw()
        else:
            self.stream.write(self._line() + "\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
