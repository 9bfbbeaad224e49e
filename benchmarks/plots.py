"""PNG plots of the suite's summary: speedup per op and shape, memory per provider."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

FUSED, BASE, COMPILED = "#1f77b4", "#b0b0b0", "#ff7f0e"


def _label(entry: dict) -> str:
    case = f" {entry['case']}" if entry["case"] else ""
    versus = f" vs {entry['baseline']}" if entry.get("baseline") else ""
    return f"{entry['op']} [{entry['provider']}{versus}]\n{entry['shape']}{case}"


def _annotate(ax, bars):
    for bar in bars:
        width = bar.get_width()
        if width > 0:
            text = format(width, ",.0f" if width >= 100 else ".2f" if width < 10 else ".1f")
            ax.text(width * 1.04, bar.get_y() + bar.get_height() / 2, text, va="center",
                    fontsize=7)


def speedup(entries: list[dict], meta: dict, path: str) -> None:
    rows = [e for e in entries if e["speedup"]][::-1]  # first entry on top
    height = 0.8
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(rows)))
    y = list(range(len(rows)))
    compiled = [e["vs_compiled"] or 0 for e in rows]
    has_compiled = any(compiled)
    offset = height / 4 if has_compiled else 0
    bars = ax.barh([i + offset for i in y], [e["speedup"] for e in rows],
                   height=height / (2 if has_compiled else 1), color=FUSED,
                   label="vs the baseline (published expression eager, bank[idx] gather, "
                         "Python loop over adapters, dense SVD, reference-expression model)")
    _annotate(ax, bars)
    if has_compiled:
        bars = ax.barh([i - offset for i in y], compiled, height=height / 2, color=COMPILED,
                       label="vs torch.compile of the PyTorch expression (published LoR2C / DCFT, bank gather, loop-free multi-adapter)")
        _annotate(ax, bars)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, [_label(e) for e in rows], fontsize=7)
    ax.set_xlabel("speedup of the fused op: baseline time / fused time (x, log scale; "
                  "> 1 is faster)")
    ax.set_title(f"lor2c_ops speedup, forward + backward (ops) or optimizer step (training)\n"
                 f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.2 + 0.55 * len(rows))), fontsize=7)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def memory(entries: list[dict], meta: dict, path: str) -> None:
    rows = [e for e in entries if e["mem_mb"] is not None and e["baseline_mem_mb"] is not None]
    rows = rows[::-1]
    height = 0.8
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(rows)))
    y = list(range(len(rows)))
    floor = 1e-3  # MB: a bar of zero bytes on a log axis
    base = ax.barh([i - height / 4 for i in y], [max(e["baseline_mem_mb"], floor) for e in rows],
                   height=height / 2, color=BASE, label="baseline")
    fused = ax.barh([i + height / 4 for i in y], [max(e["mem_mb"], floor) for e in rows],
                    height=height / 2, color=FUSED, label="fused (lor2c_ops)")
    _annotate(ax, base)
    _annotate(ax, fused)
    ax.set_xscale("log")
    ax.set_yticks(y, [f"{_label(e)} ({e['mem_kind']})" for e in rows], fontsize=7)
    ax.set_xlabel("MB (log scale): peak of one step above its inputs (peak), or bytes the "
                  "autograd graph keeps for backward (saved)")
    ax.set_title(f"lor2c_ops memory per provider, less is better\n{meta['device']}, torch "
                 f"{meta['torch']}, commit {meta['commit']}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.2 + 0.55 * len(rows))), fontsize=8, ncol=2)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw(entries: list[dict], meta: dict, base: str) -> dict:
    """Writes <base>-speedup.png and <base>-memory.png; returns {kind: path}."""
    paths = {"speedup": f"{base}-speedup.png", "memory": f"{base}-memory.png"}
    speedup(entries, meta, paths["speedup"])
    memory(entries, meta, paths["memory"])
    return paths
