"""apply_lor2c on real and toy models: outputs against an independent hook implementation of
docs/math.md section 1, training touches only the adapters, remove() restores the model exactly,
torch.compile, autocast bf16, gradient checkpointing, share=True, and bad configurations."""

import copy
import os

import pytest
import torch
from torch import nn

import lor2c_ops as lo
from lor2c_ops.adapters import LoR2CHandle, find_blocks

from models import load_minilm, tiny_gpt2, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


# --- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_base():
    return load_minilm()


@pytest.fixture
def minilm(minilm_base):
    return copy.deepcopy(minilm_base)


class KwBlock(nn.Module):
    """A block that takes the hidden states by keyword and returns a tuple."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + scale * self.fc2(torch.tanh(self.fc1(hidden_states))), "aux")


class KwStack(nn.Module):
    def __init__(self, d=12, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(KwBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(hidden_states=x, scale=0.5)[0]
        return self.head(x)


def ids(vocab=64, shape=(2, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def randomise(handle, std=0.05, seed=0):
    """Non-zero B so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in handle.adapters:
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * std)


# --- the independent reference: plain-PyTorch hooks of the same equations ----------------------


def reference_outputs(model, blocks, adapters, run):
    """Runs `run()` with hooks adding s * h_start @ A.T @ B.T (no dropout) after block `end`."""
    store, hooks = {}, []

    def first(v):
        return v if isinstance(v, torch.Tensor) else v[0]

    for start, end, A, B, s in adapters:

        def pre(mod, args, kwargs, start=start):
            store[start] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out, start=start, A=A, B=B, s=s):
            h = store[start]
            new = first(out) + s * (h @ A.T @ B.T)
            return new if isinstance(out, torch.Tensor) else (new,) + tuple(out[1:])

        hooks.append(blocks[start].register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blocks[end].register_forward_hook(post, with_kwargs=True))
    try:
        return run()
    finally:
        for h in hooks:
            h.remove()


def snapshot(handle):
    return [
        (a.start, a.end, a.lora_A.detach().clone(), a.lora_B.detach().clone(), a.scaling)
        for a in handle.adapters
    ]


def check_against_reference(model, config, run, atol=1e-5):
    handle = lo.apply_lor2c(model, config)
    randomise(handle)
    with torch.no_grad():
        out = run()
    weights = snapshot(handle)
    blocks = handle.blocks
    handle.remove()
    with torch.no_grad():
        base = run()
        ref = reference_outputs(model, blocks, weights, run)
    assert (out - base).abs().max() > 1e-3  # the adapters did something
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    return handle


# --- outputs --------------------------------------------------------------------------------


def test_minilm_spans_match_independent_hooks(minilm):
    x = ids(1000, (2, 7))
    cfg = lo.LoR2CConfig(r=4, alpha=8, spans=[(0, 1), (2, 2), (3, 5)])
    h = check_against_reference(minilm, cfg, lambda: minilm(input_ids=x).last_hidden_state)
    assert h.spans == [(0, 1), (2, 2), (3, 5)]
    assert h.removed


def test_minilm_one_adapter_per_block_by_default(minilm):
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=4))
    assert [(a.start, a.end) for a in h.adapters] == [(i, i) for i in range(6)]
    a = h.adapters[0]
    assert a.lora_A.shape == (4, 384) and a.lora_B.shape == (384, 4) and a.scaling == 4.0
    assert h.num_trainable() == 6 * 2 * 4 * 384
    assert torch.count_nonzero(a.lora_B) == 0  # fresh adapters change nothing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_small_llama_and_gpt2_match_independent_hooks(family):
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    path, _ = find_blocks(model)
    assert path == ("layers" if family == "llama" else "h")
    x = ids()
    cfg = lo.LoR2CConfig(r=3, alpha=6, spans=[(0, 0), (1, 2)])
    check_against_reference(model, cfg, lambda: model(input_ids=x).last_hidden_state)


def test_causal_lm_wrapper_finds_model_layers():
    lm = transformers.LlamaForCausalLM(tiny_llama().config)
    assert find_blocks(lm)[0] == "model.layers"


def test_keyword_hidden_states_and_tuple_outputs():
    torch.manual_seed(0)
    model = KwStack()
    x = torch.randn(2, 3, 12)
    cfg = lo.LoR2CConfig(r=2, layers_path="blocks", spans=[(0, 2), (3, 3)])
    check_against_reference(model, cfg, lambda: model(x))


def test_share_uses_one_bank(minilm):
    x = ids(1000, (1, 6))
    cfg = lo.LoR2CConfig(r=4, share=True, spans=[(0, 0), (1, 3), (4, 5)])
    h = lo.apply_lor2c(minilm, cfg)
    bank = h.container.bank
    assert isinstance(bank, lo.ShareLoR2C) and bank.A_bank.shape == (1, 4, 384)
    assert h.num_trainable() == 4 * 384 + 3 * 384 * 4
    assert all(a.lora_A.data_ptr() == bank.A_bank.data_ptr() for a in h.adapters)
    h.remove()
    check_against_reference(minilm, cfg, lambda: minilm(input_ids=x).last_hidden_state)


# --- training and removal ---------------------------------------------------------------------


def test_one_step_changes_only_adapters_and_remove_restores(minilm):
    x = ids(1000, (2, 6))
    minilm.train()  # dropout in the base model: compare in eval mode below
    flags = {n: p.requires_grad for n, p in minilm.named_parameters()}
    before = {n: p.detach().clone() for n, p in minilm.named_parameters()}
    keys = list(minilm.state_dict())
    modules = dict(minilm.named_modules())
    with torch.no_grad():
        base = minilm.eval()(input_ids=x).last_hidden_state
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=4, dropout=0.1, spans=[(0, 2), (3, 3), (4, 5)]))
    assert all(
        not p.requires_grad
        for n, p in minilm.named_parameters()
        if not n.startswith("lor2c_adapters.")
    )
    minilm.train()
    params = [p for p in minilm.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in h.parameters()}
    opt = torch.optim.SGD(params, lr=0.1)
    loss = minilm(input_ids=x).last_hidden_state.pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in minilm.named_parameters():
        if not n.startswith("lor2c_adapters."):
            assert torch.equal(p, before[n]), n
    assert all(torch.count_nonzero(a.lora_B) > 0 for a in h.adapters)
    h.remove()
    minilm.eval()
    assert list(minilm.state_dict()) == keys
    assert dict(minilm.named_modules()) == modules
    assert {n: p.requires_grad for n, p in minilm.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(minilm(input_ids=x).last_hidden_state, base)


def test_trainable_modules_stay_trainable():
    model = KwStack()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, layers_path="blocks", trainable=["head"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= names
    assert not any(n.startswith("blocks.") for n in names)
    h.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(minilm):
    x = ids(1000, (1, 5))
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=4, spans=[(0, 1), (2, 5)]))
    randomise(h)

    def grads():
        for p in h.parameters():
            p.grad = None
        minilm(input_ids=x).last_hidden_state.pow(2).mean().backward()
        return [p.grad.clone() for p in h.parameters()]

    for m in minilm.modules():  # checkpointing needs train mode: make it deterministic
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout_prob", None), float):
            m.dropout_prob = 0.0  # transformers 4's BERT gives SDPA its attention dropout so
    minilm.train()
    plain = grads()
    minilm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert minilm.encoder.layer[0].gradient_checkpointing
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4 checkpoints Module.__call__, the hooks with it: a span of several blocks
        # cannot be recomputed alone, and says so (one-block spans:
        # test_checkpointing_that_wraps_the_hooks_runs_one_block_spans_and_explains_longer_ones)
        with pytest.raises(RuntimeError, match="recomputed by gradient checkpointing"):
            grads()
        return
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class CheckpointedStack(nn.Module):
    """Each block checkpointed hooks and all, as transformers before 5 does (its layers'
    Module.__call__ under torch.utils.checkpoint), so backward re-runs a block's hooks alone."""

    def __init__(self, d=12, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(KwBlock(d) for _ in range(n))
        self.checkpoint = False

    def forward(self, x):
        for b in self.blocks:
            call = lambda h, b=b: b(hidden_states=h, scale=0.5)[0]
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(call, x, use_reentrant=False)
            else:
                x = call(x)
        return x


def test_checkpointing_that_wraps_the_hooks_runs_one_block_spans_and_explains_longer_ones():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, requires_grad=True)
    model = CheckpointedStack()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, layers_path="blocks"))  # one per block
    randomise(h)

    def grads():
        for p in list(h.parameters()) + [x]:
            p.grad = None
        model(x).pow(2).mean().backward()
        return [p.grad.clone() for p in list(h.parameters()) + [x]]

    plain = grads()
    model.checkpoint = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    h.remove()
    model.checkpoint = False
    lo.apply_lor2c(model, lo.LoR2CConfig(r=2, layers_path="blocks", spans=[(0, 1), (2, 3)]))
    model(x).sum().backward()  # without checkpointing the spans work
    model.checkpoint = True
    with pytest.raises(RuntimeError, match=r"recomputed by gradient checkpointing.*\(2, 3\)"):
        model(x).sum().backward()


def test_torch_compile_of_the_whole_model(minilm):
    x = ids(1000, (2, 5))
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=4, spans=[(0, 1), (2, 2), (3, 5)]))
    randomise(h)
    eager = minilm(input_ids=x).last_hidden_state
    eager.pow(2).mean().backward()
    g_eager = [p.grad.clone() for p in h.parameters()]
    for p in h.parameters():
        p.grad = None
    compiled = torch.compile(minilm, backend="aot_eager")
    out = compiled(input_ids=x).last_hidden_state
    out.pow(2).mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for a, p in zip(g_eager, h.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_toy_stack_compiles_fullgraph():
    torch.manual_seed(0)
    model = KwStack()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, layers_path="blocks", spans=[(0, 1), (2, 3)]))
    randomise(h)
    x = torch.randn(2, 3, 12)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)


def test_autocast_bf16(minilm):
    x = ids(1000, (2, 5))
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=4, spans=[(0, 2), (3, 5)]))
    randomise(h)
    with torch.no_grad():
        full = minilm(input_ids=x).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = minilm(input_ids=x).last_hidden_state
        out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in h.parameters())
    assert (out.float() - full).abs().max() < 0.25  # bf16 through 6 layers


# --- bad configurations ---------------------------------------------------------------------


def test_errors_are_clear_and_change_nothing(minilm):
    flags = [p.requires_grad for p in minilm.parameters()]
    with pytest.raises(ValueError, match="out of range"):
        lo.apply_lor2c(minilm, lo.LoR2CConfig(spans=[(0, 6)]))
    with pytest.raises(ValueError, match="overlap"):
        lo.LoR2CConfig(spans=[(0, 2), (2, 3)])
    with pytest.raises(ValueError, match="layers_path"):
        lo.apply_lor2c(minilm, lo.LoR2CConfig(layers_path="encoder.nope"))
    with pytest.raises(ValueError, match="stack of blocks"):
        lo.apply_lor2c(nn.Sequential(nn.Linear(2, 2)), lo.LoR2CConfig())
    assert [p.requires_grad for p in minilm.parameters()] == flags
    assert not hasattr(minilm, "lor2c_adapters")
    h = lo.apply_lor2c(minilm, lo.LoR2CConfig(r=2))
    assert isinstance(h, LoR2CHandle)
    with pytest.raises(ValueError, match="already has LoR2C adapters"):
        lo.apply_lor2c(minilm, lo.LoR2CConfig(r=2))
    h.remove()
    assert [p.requires_grad for p in minilm.parameters()] == flags


# --- inject on every family: Linear q/v projections and GPT-2's fused Conv1D c_attn -----------


def _linear_out(module, x):
    """The base output of an nn.Linear or a transformers Conv1D (y = x @ W + b), hooks off."""
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, module.weight, module.bias)
    return x @ module.weight + module.bias


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inject_on_llama_and_gpt2(family):
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    x = ids()
    with torch.no_grad():
        base = model(input_ids=x).last_hidden_state
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=3, alpha=6))
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    edit = h.inject(1, optimizer=opt)
    names = (
        ["self_attn.q_proj", "self_attn.v_proj"]
        if family == "llama"
        else ["attn.c_attn[query]", "attn.c_attn[value]"]
    )
    assert edit.detail["modules"] == names and h.inject_targets(0) == names
    assert set(h.injected) == {(1, n) for n in names}
    with torch.no_grad():  # fresh LoRAs (B = 0) change nothing
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, base)

    # each LoRA adds s * x A.T B.T to its projection (GPT-2: to its slice of c_attn's output)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in h.injected.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)
    block = h.blocks[1]
    xi = torch.randn(2, 4, 32)
    with torch.no_grad():
        if family == "llama":
            for n in names:
                mod, lora = block.get_submodule(n), h.injected[(1, n)]
                ref = _linear_out(mod, xi) + lora.scaling * xi @ lora.lora_A.T @ lora.lora_B.T
                torch.testing.assert_close(mod(xi), ref, atol=1e-5, rtol=1e-5)
        else:
            c_attn = block.attn.c_attn
            q, k, v = _linear_out(c_attn, xi).split(32, dim=-1)
            lq, lv = h.injected[(1, names[0])], h.injected[(1, names[1])]
            q = q + lq.scaling * xi @ lq.lora_A.T @ lq.lora_B.T
            v = v + lv.scaling * xi @ lv.lora_A.T @ lv.lora_B.T
            torch.testing.assert_close(c_attn(xi), torch.cat([q, k, v], -1), atol=1e-5, rtol=1e-5)
        assert (model(input_ids=x).last_hidden_state - base).abs().max() > 1e-4

    # a training step moves the new LoRAs (in the optimizer), never the frozen base
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not n.startswith("lor2c_adapters.")
    }
    before = [p.detach().clone() for p in edit.added]
    model(input_ids=x).last_hidden_state.pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(edit.added, before))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, base, atol=0, rtol=0)


def test_gpt2_inject_targets_whole_conv1d_or_slices():
    model = tiny_gpt2()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, inject_targets=["c_attn"]))
    h.inject(0, optimizer=False)
    lora = h.injected[(0, "attn.c_attn")]
    assert (lora.in_features, lora.out_features) == (32, 96)  # all of q, k, v (PEFT's default)
    h.remove()
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, inject_targets=["c_attn[key]", "mlp.c_fc"]))
    h.inject(2, optimizer=False)
    assert set(h.injected) == {(2, "attn.c_attn[key]"), (2, "mlp.c_fc")}
    assert h.injected[(2, "mlp.c_fc")].out_features == 128
    model(input_ids=ids()).last_hidden_state.sum().backward()
    h.remove()
    for targets, match in (
        (["c_proj"], "matches 2"),
        (["ln_1"], "matches 0"),
        (["c_attn", "c_attn[value]"], "overlap"),
        (["mlp.c_fc[query]"], "fused"),
    ):
        h = lo.apply_lor2c(model, lo.LoR2CConfig(r=2, inject_targets=targets))
        with pytest.raises(ValueError, match=match):
            h.inject(0, optimizer=False)
        assert h.spans == [(0, 0), (1, 1), (2, 2)] and not h.injected  # nothing changed
        h.remove()
