"""Structural variants (docs/math.md section 3): SFS from the factors, merge, inject, the IMLoR2C
schedule (optimizer groups updated at every edit), and apply_dcft (docs/math.md section 4)."""

import time

import pytest
import torch
from torch import nn

import lor2c_ops as lo
from lor2c_ops.adapters import (
    DCFTHandle,
    SpanAdapter,
    UntrainedParametersWarning,
    dense_sfs,
    get_handle,
    sfs,
)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        w = torch.softmax(self.query(h) @ self.key(h).transpose(-1, -2), -1)
        return w @ self.value(h)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention, self.out = Attn(d), nn.Linear(d, d)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.out(self.attention(hidden_states)))


class Net(nn.Module):
    def __init__(self, d=16, n=6):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def make(share=False, **kw):
    torch.manual_seed(0)
    model = Net()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=3, share=share, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in h.adapters:
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
    return model, h


def train_step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def snapshot(params):
    return [p.detach().clone() for p in params]


# --- the adapters and their container ---------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
def test_adapters_are_one_kind_and_the_container_is_public(share):
    model, h = make(share=share, spans=[(0, 1), (2, 2), (3, 5)])
    c = h.container
    assert all(isinstance(a, SpanAdapter) for a in h.adapters)
    assert c.shared == share and c.handle is h and get_handle(model) is h
    assert c.dtype == torch.float32 and c.injections() == [] and h.spans == c.spans()
    x, out = torch.randn(2, 16), torch.randn(2, 16)
    for a in h.adapters:
        want = out + a.scaling * x @ a.lora_A.T @ a.lora_B.T
        torch.testing.assert_close(a.residual(x, out), want)
    h.inject(1, optimizer=False)
    (inj_q, inj_v) = c.injections()
    assert (inj_q.block, inj_q.target.name, inj_v.target.name) == (
        2,
        "attention.query",
        "attention.value",
    )
    assert h.injected == {(2, "attention.query"): inj_q.lora, (2, "attention.value"): inj_v.lora}
    assert inj_q.key == "2:attention__query" and c.injected[inj_q.key] is inj_q.lora
    h.remove()
    assert c.handle is None and get_handle(model) is None


# --- SFS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 3, 24), (17, 1, 33), (8, 8, 8)])
@pytest.mark.parametrize("k", [None, 1, 2])
def test_sfs_from_factors_equals_dense_definition(shape, k):
    d_out, r, d_in = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    assert sfs(A, B, k) == pytest.approx(dense_sfs(A, B, k), rel=1e-10, abs=1e-14)
    assert sfs(A.float(), B.float(), k) == pytest.approx(dense_sfs(A, B, k), rel=1e-5)


def test_handle_sfs_per_adapter_and_zero_init():
    model, h = make(spans=[(0, 0), (1, 2), (3, 5)])
    for a, v in zip(h.adapters, h.sfs()):
        assert v == pytest.approx(dense_sfs(a.lora_A, a.lora_B), rel=1e-5)
    for a, v in zip(h.adapters, h.sfs(k=2)):
        assert v == pytest.approx(dense_sfs(a.lora_A, a.lora_B, 2), rel=1e-5)
    fresh = lo.apply_lor2c(Net(), lo.LoR2CConfig(r=2))
    assert fresh.sfs() == [0.0] * 6 and fresh.sfs(k=1) == [0.0] * 6


def test_sfs_is_much_faster_than_the_dense_svd():
    d, r = 256, 8  # the d = 4096 is a benchmark, too slow for a 2-core test
    A, B = torch.randn(r, d), torch.randn(d, r)

    def best(fn, repeats):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)  # the least disturbed run: the machine is shared

    fast = best(lambda: sfs(A, B), 20)
    dense = best(lambda: torch.linalg.svdvals(B @ A), 2)
    assert dense / fast > 20, (dense, fast)


# --- merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
def test_merge_updates_optimizer_and_only_new_params_train(share):
    model, h = make(share=share)
    x = torch.randn(2, 4, 16)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, opt, x)
    lower = h.adapters[1]
    A_lower, B_lower = lower.lora_A.detach().clone(), lower.lora_B.detach().clone()
    s_lower = lower.scaling
    assert not lower.from_merge
    edit = h.merge(1, 2, optimizer=opt)
    assert h.spans == [(0, 0), (1, 2), (3, 3), (4, 4), (5, 5)]
    merged = h.adapters[1]
    assert merged.from_merge and merged.merged  # `merged`: the older name, kept as an alias
    assert merged.scaling == s_lower
    assert torch.equal(merged.lora_A, A_lower) and torch.equal(merged.lora_B, B_lower)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in edit.added)
    assert not any(id(p) in in_opt for p in edit.removed)
    assert not any(p in opt.state for p in edit.removed)
    removed_before, added_before = snapshot(edit.removed), snapshot(edit.added)
    train_step(model, opt, x)
    assert all(not torch.equal(p, q) for p, q in zip(edit.added, added_before))
    assert all(torch.equal(p, q) for p, q in zip(edit.removed, removed_before))
    assert all(p.grad is None for p in edit.removed)
    assert h.history[-1]["kind"] == "merge"


def test_merged_span_computes_from_h_start():
    model, h = make(spans=[(0, 0), (1, 1)], max_merge_length=2)
    h.merge(0, 1, optimizer=False)
    a = h.adapters[0]
    x = torch.randn(2, 3, 16)
    out = model(x)
    with torch.no_grad():  # the same equations by hand, with the hooks taken off
        h.container.uninstall()
        h1 = h.blocks[1](h.blocks[0](x)) + a.scaling * x @ a.lora_A.T @ a.lora_B.T
        ref = h1
        for b in h.blocks[2:]:
            ref = b(ref)
        h.container.install(h.blocks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_merge_picks_smallest_sfs_pair_and_respects_max_merge_length():
    model, h = make(max_merge_length=2)
    scores = h.sfs()
    pairs = h.mergeable_pairs()
    best = min(pairs, key=lambda p: scores[p[0]] + scores[p[1]])
    edit = h.merge(optimizer=False)
    assert (edit.detail["i"], edit.detail["j"]) == best
    i = best[0]
    with pytest.raises(ValueError, match="max_merge_length"):
        h.merge(i, i + 1) if i + 1 < len(h.adapters) else h.merge(i - 1, i)
    with pytest.raises(ValueError, match="not adjacent"):
        h.merge(0, 2)


# --- inject ----------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
def test_inject_attaches_trainable_lora_on_query_and_value(share):
    model, h = make(share=share)
    x = torch.randn(2, 4, 16)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    train_step(model, opt, x)
    scores = h.sfs()
    target = max(range(6), key=lambda n: scores[n])
    edit = h.inject(optimizer=opt)
    assert edit.detail["block"] == target
    assert edit.detail["modules"] == ["attention.query", "attention.value"]
    assert len(h.adapters) == 5 and target not in [a.start for a in h.adapters]
    assert set(h.injected) == {(target, "attention.query"), (target, "attention.value")}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in edit.added)
    assert not any(id(p) in in_opt for p in edit.removed)
    # the injected LoRA is the fused op with layer_out = x W.T + b
    q = h.blocks[target].attention.query
    lora = h.injected[(target, "attention.query")]
    with torch.no_grad():
        lora.lora_B.normal_()
        xi = torch.randn(3, 16)
        ref = xi @ q.weight.T + q.bias + lora.scaling * xi @ lora.lora_A.T @ lora.lora_B.T
        torch.testing.assert_close(q(xi), ref, atol=1e-5, rtol=1e-5)
        lora.lora_B.zero_()
    removed_before, added_before = snapshot(edit.removed), snapshot(edit.added)
    for _ in range(2):  # B moves at step 1, A once B is non-zero
        train_step(model, opt, x)
    assert all(not torch.equal(p, q0) for p, q0 in zip(edit.added, added_before))
    assert all(torch.equal(p, q0) for p, q0 in zip(edit.removed, removed_before))
    assert all(p.requires_grad for p in edit.added)
    assert not q.weight.requires_grad
    pair = h.mergeable_pairs()[0]
    h.merge(*pair, optimizer=opt)
    with pytest.raises(ValueError, match="cannot be injected"):
        h.inject(pair[0])  # a merged adapter


def test_inject_without_optimizer_returns_what_to_add_and_remove_restores():
    model, h = make()
    x = torch.randn(1, 3, 16)
    edit = h.inject(2, optimizer=False)  # the optimizer is built after the edit
    assert len(edit.added) == 4 and len(edit.removed) == 2
    assert not edit.optimizer_updated
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert {id(p) for p in edit.added} <= {id(p) for p in opt.param_groups[0]["params"]}
    h.remove()
    torch.manual_seed(0)
    assert torch.equal(model(x), Net()(x))  # the same weights as make()'s base model
    assert all(p.requires_grad for p in model.parameters())


# --- no silent path: the handle knows the optimizer, or warns -----------------------------------


def test_edit_without_an_optimizer_warns_with_the_new_parameters():
    model, h = make()
    with pytest.warns(
        UntrainedParametersWarning,
        match=r"2 new parameters \(lor2c_adapters"
        r"\.lor2c\.1\.lora_A \(3, 16\), lor2c_adapters\.lor2c\.1\.lora_B "
        r"\(16, 3\)\); they will not train",
    ) as record:
        edit = h.merge(1, 2)
    assert record[0].filename == __file__  # points at the caller's line
    assert edit.added_names == ["lor2c_adapters.lor2c.1.lora_A", "lor2c_adapters.lor2c.1.lora_B"]
    with pytest.warns(UntrainedParametersWarning, match="4 new parameters.*injected"):
        h.inject(0)
    sched = lo.IMLoR2CSchedule(h, max_merges=1, interval=1)  # no optimizer anywhere
    with pytest.warns(UntrainedParametersWarning):
        sched.step()


@pytest.mark.parametrize("how", ["attach", "apply"])
def test_attached_optimizer_follows_every_edit(how, recwarn):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4, 16)
    if how == "apply":  # the adapters' parameters join an optimizer made before them
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2)
        h = lo.apply_lor2c(model, lo.LoR2CConfig(r=3), optimizer=opt)
    else:
        h = lo.apply_lor2c(model, lo.LoR2CConfig(r=3))
        opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
        assert h.attach_optimizer(opt) == []
    assert h.optimizer is opt
    with torch.no_grad():
        for a in h.adapters:
            a.lora_B.normal_(std=0.1)
    train_step(model, opt, x)
    sched = lo.IMLoR2CSchedule(h, max_merges=1, max_injections=1, interval=1)
    edits = h.merge(0, 1), *sched.step(), h.inject()
    assert [e.kind for e in edits] == ["merge", "merge", "inject", "inject"]
    assert all(e.optimizer_updated for e in edits)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in h.parameters()} <= in_opt
    assert not any(id(p) in in_opt for e in edits for p in e.removed)
    before = [p.detach().clone() for e in edits for p in e.added if p.requires_grad]
    for _ in range(2):
        train_step(model, opt, x)
    after = [p for e in edits for p in e.added if p.requires_grad]
    assert sum(not torch.equal(p, b) for p, b in zip(after, before)) >= len(after) // 2
    assert not [w for w in recwarn if issubclass(w.category, UntrainedParametersWarning)]
    with pytest.raises(TypeError, match="optimizer"):
        h.merge(0, 1, optimizer="adam")  # refused before anything changes
    assert len(h.history) == 4
    h.remove()
    assert h.optimizer is None


def test_structural_edit_repr_is_short():
    model, h = make(share=False)
    opt = torch.optim.SGD(h.parameters(), lr=0.1)
    merge = h.merge(1, 2, optimizer=opt)
    inject = h.inject(0, optimizer=False)
    assert repr(merge) == (
        "StructuralEdit(merge: adapters 1 (1, 1) and 2 (2, 2) -> one over "
        "(1, 2); removed 4 tensors, 192 values; added 2 tensors, 96 values; "
        "optimizer updated)"
    )
    assert repr(inject) == (
        "StructuralEdit(inject: adapter 0 -> LoRA on block 0 "
        "['attention.query', 'attention.value']; removed 2 tensors, 96 "
        "values; added 4 tensors, 192 values; optimizer not updated)"
    )
    assert "\n" not in repr(merge) and "tensor(" not in repr(inject)


# --- schedule --------------------------------------------------------------------------------


def test_imlor2c_schedule_in_a_plain_loop():
    model, h = make()
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    sched = lo.IMLoR2CSchedule(
        h, max_merges=2, max_injections=1, interval=2, total=16, optimizer=opt
    )
    x = torch.randn(2, 4, 16)
    kinds = []
    for _ in range(16):
        train_step(model, opt, x)
        kinds += [e.kind for e in sched.step()]
    assert kinds == ["merge", "inject", "merge"]  # events at steps 2 and 4 (first quarter)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trainable == in_opt
    with pytest.raises(ValueError, match="interval"):
        lo.IMLoR2CSchedule(h, interval=0)


# --- DCFT ------------------------------------------------------------------------------------


def test_apply_dcft_fold_and_unload():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 16)
    base = model(x).detach()
    q0 = model.layers[0].attention.query
    h = lo.apply_dcft(model, ["query", "value"], r=2, kernel_size=2, alpha=2)
    assert set(h.modules) == {
        f"layers.{i}.attention.{n}" for i in range(6) for n in ("query", "value")
    }
    d = model.layers[0].attention.query
    assert isinstance(d, lo.DCFTLinear) and d.weight is q0.weight
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in h.parameters()}
    with torch.no_grad():
        adapted = model(x)
        model.eval()
        folded_eval = model(x)
    assert d.folded
    torch.testing.assert_close(folded_eval, adapted, atol=1e-5, rtol=1e-5)
    plain = h.fold_and_unload()
    assert plain.layers[0].attention.query is q0 and type(q0) is nn.Linear
    torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(x), base)


def test_apply_dcft_remove_restores_and_errors():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 16)
    base = model(x).detach()
    h = lo.apply_dcft(model, r"layers\.0\.attention\.(query|key)", r=1)
    assert len(h.modules) == 2
    model.eval()
    model(x)  # folds D into the shared weight
    h.remove()
    assert torch.equal(model(x), base)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="matches no module"):
        lo.apply_dcft(model, ["nope"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        lo.apply_dcft(model, ["attention"])
    with pytest.raises(ValueError):
        lo.apply_dcft(model, ["query"], kernel_size=3)  # 16 is not (m - 1) * 3 + 3
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(b.attention.query) is nn.Linear for b in model.layers)


def test_dcft_old_names_are_aliases():
    """ "Fold" is the DCFT word for adding D into the weight (a "merge" is MergeLoR2C's); the
    older names stay as aliases (docs/api.md sections 2.3 and 3.4)."""
    assert lo.DCFTLinear.merge is lo.DCFTLinear.fold
    assert lo.DCFTLinear.unmerge is lo.DCFTLinear.unfold
    assert lo.DCFTLinear.merged is lo.DCFTLinear.folded
    assert DCFTHandle.merge_and_unload is DCFTHandle.fold_and_unload
    m = lo.DCFTLinear(8, 8).eval()
    assert m.folded and m.merged
    m.unmerge()
    assert not m.folded
