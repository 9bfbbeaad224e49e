"""PNG plots of the suite's summary: speedup per op and shape, memory per provider.

Each figure answers one question per panel, on a scale of its own: the ops against their PyTorch
baselines (a few x), host time per call at tiny shapes, a whole training step (around 1x), SFS
(thousands of x) in the speedup figure; bytes kept for backward and peak memory of a step in
the memory figure. Every row says what is compared with what; a 1x line is drawn, and results
where the first is slower (or needs more memory) are red and hatched.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

FUSED, COMPILED, BASE, WORSE = "#1f77b4", "#ff7f0e", "#b0b0b0", "#d62728"
ROW_INCHES = 0.42
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85}

# how the summary's provider names read in the plots
PROVIDERS = {
    "cpu": "fused (cpu)",
    "triton": "fused (triton)",
    "cuda": "fused (cuda)",
    "reference": "reference",
    "banked": "fused, banks read in place",
    "one launch": "fused, one launch",
    "factored": "from the factors",
    "lor2c-fused": "LoR2C fused",
    "lora-peft": "PEFT LoRA on q/v",
    "dcft-fused": "DCFT fused",
}
BASELINES = {
    "eager": "the published expression (eager)",
    "published": "the published code (dense D, eager)",
    "gather-ref": "bank[idx] gathers + reference (eager)",
    "python loop": "a Python loop over the adapters",
    "dense": "svdvals(B @ A)",
    "lor2c-reference": "LoR2C as published",
    "dcft-published": "DCFT as published",
    "compiled": "torch.compile",
}


def _name(table: dict, key) -> str:
    return table.get(key, str(key))


def _shape(entry: dict) -> str:
    case = f" {entry['case']}" if entry.get("case") else ""
    return f"{entry['shape']}{case}"


def _kind(entry: dict) -> str:
    if entry["op"] == "SFS":
        return "sfs"
    if entry["op"].startswith("training step"):
        return "step"
    if entry["op"].startswith("host time"):
        return "host"
    return "ops"


def _fmt(value: float) -> str:
    return format(
        value,
        ",.0f" if value >= 100 else ".1f" if value >= 10 else ".2f" if value >= 0.995 else ".2g",
    )


def _bars(ax, ys, values, color, height, worse, text, log):
    """Horizontal bars; `worse(v)` ones red and hatched; `text(v)` written after each bar."""
    colors = [WORSE if worse(v) else color for v in values]
    bars = ax.barh(ys, values, height=height, color=colors, edgecolor="white", linewidth=0.5)
    for bar, v in zip(bars, values):
        if worse(v):
            bar.set_hatch("///")
            bar.set_edgecolor("white")
        x = v * 1.03 if log else v
        ax.annotate(
            text(v),
            (x, bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
            zorder=5,
            color=WORSE if worse(v) else "black",
            bbox=LABEL_BOX,
            fontweight="bold" if worse(v) else "normal",
        )
    return bars


def _one_x(ax):
    ax.axvline(1.0, color="black", linewidth=1.6, linestyle="--", zorder=3)


def _log_limits(ax, values, low=None, unit="x"):
    lo = min([v for v in values if v > 0] + [1.0])
    hi = max(values + [1.0])
    ax.set_xscale("log")
    left, right = (low if low is not None else lo / 1.6), hi * 3.5  # room for the labels
    ax.set_xlim(left, right)
    if right / left < 1000:  # a few decades: label 1-2-5 steps, not only powers of ten
        ticks = [
            m * 10**e
            for e in range(math.floor(math.log10(left)), math.ceil(math.log10(right)) + 1)
            for m in (1, 2, 5)
        ]
        ticks = [t for t in ticks if left <= t <= right]
        ax.set_xticks(ticks, [f"{t:g}{unit}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _legend(ax, handles):
    """To the right of the panel (never over a bar), labels wrapped."""
    for h in handles:
        h.set_label(textwrap.fill(h.get_label(), 34))
    ax.legend(
        handles=handles,
        fontsize=7.5,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        frameon=False,
    )


def _setup(ax, labels, title):
    ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first entry on top
    ax.set_title(title, fontsize=9.5, loc="left", fontweight="bold")
    ax.grid(axis="x", which="both", alpha=0.3)


# --- speedup ------------------------------------------------------------------------------------


def _speedup_ops(
    ax, rows, title="Ops, forward + backward: time of the baseline / time of the fused op"
):
    labels = [
        f"{e['op']}, {_shape(e)}\n{_name(PROVIDERS, e['provider'])} vs "
        f"{_name(BASELINES, e['baseline'])}"
        for e in rows
    ]
    compiled = [e.get("vs_compiled") for e in rows]
    both = any(compiled)
    h = 0.38 if both else 0.7
    ys = [i - h / 2 for i in range(len(rows))] if both else list(range(len(rows)))
    eager = [e["speedup"] for e in rows]

    def text(v):
        return f"{_fmt(v)}x" + (" slower" if v < 1 else "")

    _bars(ax, ys, eager, FUSED, h, lambda v: v < 1, text, log=True)
    values = list(eager)
    if both:
        ys_c = [i + h / 2 for i, c in enumerate(compiled) if c]
        vals_c = [c for c in compiled if c]
        _bars(ax, ys_c, vals_c, COMPILED, h, lambda v: v < 1, text, log=True)
        values += vals_c
    _log_limits(ax, values, low=min(0.5, min(values) / 1.6))
    _one_x(ax)
    _setup(ax, labels, title)
    ax.set_xlabel(
        "speedup (x, log scale; right of the dashed 1x line: the fused op is faster)", fontsize=8
    )
    handles = [Patch(color=FUSED, label="vs the baseline named in the row, eager")]
    if both:
        handles.append(
            Patch(
                color=COMPILED,
                label="vs torch.compile of that baseline "
                "(multi-adapter batch: of a loop-free PyTorch expression)",
            )
        )
    handles.append(
        Patch(
            facecolor=WORSE, hatch="///", edgecolor="white", label="slower than the baseline (< 1x)"
        )
    )
    _legend(ax, handles)


def _speedup_host(ax, rows):
    _speedup_ops(
        ax,
        rows,
        "Host time per call at tiny shapes (launch and dispatch overhead): "
        "time of the baseline / time of the fused op",
    )


def _speedup_step(ax, rows):
    labels = [
        f"{e['op']}, {_shape(e)}\n{_name(PROVIDERS, e['provider'])} vs "
        f"{_name(BASELINES, e['baseline'])}"
        for e in rows
    ]
    values = [e["speedup"] for e in rows]
    _bars(
        ax,
        list(range(len(rows))),
        values,
        FUSED,
        0.6,
        lambda v: v < 1,
        lambda v: f"{_fmt(v)}x" + (" slower" if v < 1 else ""),
        log=False,
    )
    spread = max(abs(v - 1) for v in values + [1.1])
    ax.set_xlim(0, 1 + spread * 1.8)
    _one_x(ax)
    _setup(
        ax,
        labels,
        "Whole training step (forward, backward, AdamW): time of the second / time of the first",
    )
    ax.set_xlabel(
        "speedup (x, linear scale; right of the dashed 1x line: the first is faster)", fontsize=8
    )
    _legend(
        ax,
        [
            Patch(color=FUSED, label="the first is faster (>= 1x)"),
            Patch(
                facecolor=WORSE, hatch="///", edgecolor="white", label="the first is slower (< 1x)"
            ),
        ],
    )


def _speedup_sfs(ax, rows):
    labels = [
        f"SFS, {_shape(e)}\n{_name(PROVIDERS, e['provider'])} vs {_name(BASELINES, e['baseline'])}"
        for e in rows
    ]
    values = [e["speedup"] for e in rows]
    _bars(
        ax,
        list(range(len(rows))),
        values,
        FUSED,
        0.6,
        lambda v: v < 1,
        lambda v: f"{_fmt(v)}x",
        log=True,
    )
    _log_limits(ax, values, low=0.5)
    _one_x(ax)
    _setup(
        ax, labels, "Shape of feature space (SFS): time of the dense SVD / time from the factors"
    )
    ax.set_xlabel("speedup (x, log scale of its own: far beyond the ops above)", fontsize=8)
    _legend(ax, [Patch(color=FUSED, label="SFS from the factors (thin QR + r x r SVD) is faster")])


def speedup(entries: list[dict], meta: dict, path: str) -> None:
    panels = [
        (kind, draw, [e for e in entries if e["speedup"] and _kind(e) == kind])
        for kind, draw in (
            ("ops", _speedup_ops),
            ("host", _speedup_host),
            ("step", _speedup_step),
            ("sfs", _speedup_sfs),
        )
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return _empty(meta, path, "no speedups measured")
    weights = [
        len(rows) * (2 if kind in ("ops", "host") else 1) * 0.5 + 1.4 for kind, _, rows in panels
    ]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(12, 0.8 + ROW_INCHES * sum(weights)),
        gridspec_kw={"height_ratios": weights},
        squeeze=False,
    )
    for ax, (_, draw, rows) in zip(axes[:, 0], panels):
        draw(ax, rows)
    fig.suptitle(
        f"lor2c_ops speedups: {meta['device']}, torch {meta['torch']}, commit "
        f"{meta['commit']}{' (quick: small sizes, a smoke test)' if meta.get('quick') else ''}",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- memory -------------------------------------------------------------------------------------


def _memory_panel(ax, rows, kind):
    labels = [
        f"{e['op']}, {_shape(e)}\n{_name(PROVIDERS, e['provider'])} vs "
        f"{_name(BASELINES, e['baseline'])}"
        for e in rows
    ]
    floor = 1e-3  # MB: a bar of zero bytes on a log axis
    h = 0.38
    first = [max(e["mem_mb"], floor) for e in rows]
    base = [max(e["baseline_mem_mb"], floor) for e in rows]
    n = range(len(rows))
    _bars(
        ax,
        [i + h / 2 for i in n],
        base,
        BASE,
        h,
        lambda v: False,
        lambda v: f"{_fmt(v)} MB",
        log=True,
    )
    worse = {i for i in n if first[i] > base[i] * 1.001}
    colors = [WORSE if i in worse else FUSED for i in n]
    bars = ax.barh([i - h / 2 for i in n], first, height=h, color=colors, edgecolor="white")
    for i, bar in enumerate(bars):
        if i in worse:
            bar.set_hatch("///")
        ratio = base[i] / first[i]
        note = (
            f" ({ratio:,.0f}x less)"
            if ratio >= 10
            else f" ({ratio:.2f}x less)"
            if ratio > 1.001
            else f" ({1 / ratio:.2f}x more)"
            if i in worse
            else ""
        )
        ax.annotate(
            f"{_fmt(first[i])} MB{note}",
            (first[i] * 1.03, i - h / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
            zorder=5,
            bbox=LABEL_BOX,
            color=WORSE if i in worse else "black",
            fontweight="bold" if i in worse else "normal",
        )
    _log_limits(ax, first + base, unit=" MB")
    _setup(
        ax,
        labels,
        "Bytes the autograd graph keeps for backward (ops)"
        if kind == "saved"
        else "Peak memory of a forward + backward or a training step, above its inputs",
    )
    ax.set_xlabel("MB (log scale; less is better)", fontsize=8)
    _legend(
        ax,
        [
            Patch(color=FUSED, label="the first named in the row"),
            Patch(color=BASE, label="the baseline (the second in the row)"),
            Patch(
                facecolor=WORSE,
                hatch="///",
                edgecolor="white",
                label="the first needs more memory than the baseline",
            ),
        ],
    )


def memory(entries: list[dict], meta: dict, path: str) -> None:
    rows = [e for e in entries if e["mem_mb"] is not None and e["baseline_mem_mb"] is not None]
    panels = [(kind, [e for e in rows if e["mem_kind"] == kind]) for kind in ("saved", "peak")]
    panels = [p for p in panels if p[1]]
    if not panels:
        return _empty(meta, path, "no memory measured")
    weights = [len(r) + 1.4 for _, r in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(12, 0.8 + ROW_INCHES * sum(weights)),
        gridspec_kw={"height_ratios": weights},
        squeeze=False,
    )
    for ax, (kind, r) in zip(axes[:, 0], panels):
        _memory_panel(ax, r, kind)
    fig.suptitle(
        f"lor2c_ops memory: {meta['device']}, torch {meta['torch']}, commit {meta['commit']}",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _empty(meta: dict, path: str, why: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(
        0.5, 0.5, f"{why} ({meta['device']}, commit {meta['commit']})", ha="center", va="center"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(entries: list[dict], meta: dict, base: str) -> dict:
    """Writes <base>-speedup.png and <base>-memory.png; returns {kind: path}."""
    paths = {"speedup": f"{base}-speedup.png", "memory": f"{base}-memory.png"}
    speedup(entries, meta, paths["speedup"])
    memory(entries, meta, paths["memory"])
    return paths


if __name__ == "__main__":  # redraw the plots of a saved suite run: plots.py suite-....json
    import json
    import sys

    for name in sys.argv[1:]:
        with open(name) as f:
            data = json.load(f)
        print(draw(data["summary"], data["meta"], name[: -len(".json")]))
