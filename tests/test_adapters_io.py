"""save_adapters / load_adapters: exact round trip onto a fresh base model (after merges and
injections), atomic saves, clear errors that change nothing, and no pickle."""

import copy
import json
import os
import pickle
import re

import pytest
import torch

import lor2c_ops as lo
from lor2c_ops.adapters import read_adapters

from models import load_minilm, tiny_gpt2, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def minilm_base():
    return load_minilm()


def fresh(base):
    return copy.deepcopy(base)


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
    assert [a.from_merge for a in h2.adapters] == [a.from_merge for a in h.adapters]
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


# --- untrusted files: every header field checked, checksum, permissions ----------------------


def rewrite(path, edit_meta=None, edit_tensors=None, text=None):
    """Rewrites the adapter file at `path` with its JSON header (and tensors) edited."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if text is None:
        meta = json.loads(header["lor2c_config"])
        if edit_meta is not None:
            edit_meta(meta)
        text = json.dumps(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    header["lor2c_config"] = text
    safetensors.torch.save_file(tensors, str(path), metadata=header)


@pytest.fixture
def llama_file(tmp_path):
    """A saved LLaMA adapter with an injection: adapters over blocks 1 and 2 (lor2c.0, lor2c.1)
    and LoRAs on block 0's q_proj and v_proj (injected.*)."""
    model = tiny_llama()
    h = trained_handle(model)
    h.inject(0, optimizer=False)
    path = tmp_path / "llama.safetensors"
    lo.save_adapters(h, path)
    return path


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(meta):
        d = meta
        for key in path[:-1]:
            d = d[key]
        if value is _DELETE:
            del d[path[-1]]
        else:
            d[path[-1]] = value

    return edit


_DELETE = object()

MALFORMED = [
    (_set("adapters", _DELETE), r"'adapters': missing"),
    (
        _set("injected", 0, "block", 99),
        r"'injected\[0\]\.block': expected an int in 0\.\.2, got 99",
    ),
    (_set("adapters", 0, "scaling", "2.0x"), r"'adapters\[0\]\.scaling': expected a number"),
    (_set("adapters", 0, "scaling", float("nan")), r"'adapters\[0\]\.scaling': expected a finite"),
    (_set("adapters", 1, "end", 7), r"'adapters\[1\]\.end': expected an int in 0\.\.2, got 7"),
    (_set("adapters", 1, "start", 0), r"'adapters'.*overlap"),
    (_set("adapters", 0, "merged", "no"), r"'adapters\[0\]\.merged': expected true or false"),
    (_set("config", [4]), r"'config': expected an object"),
    (_set("config", "r", "4"), r"'config': r: expected a positive int"),
    (_set("config", "alpha", "16"), r"'config': alpha: expected a finite number"),
    (_set("config", "dropout", float("inf")), r"'config': dropout"),
    (_set("config", "pickle", 1), r"'config': LoR2CConfig: unknown fields \['pickle'\]"),
    (_set("num_blocks", True), r"'num_blocks': expected an int"),
    (_set("dims", [[32, 32]]), r"'dims': expected 3 \[d_in, d_out\] pairs"),
    (_set("dims", 1, [32, "32"]), r"'dims\[1\]\[1\]': expected an int"),
    (_set("share", "no"), r"'share': expected true or false"),
    (_set("share", True), r"'share': True disagrees with config.share"),
    (_set("family", None), r"'family': expected an object"),
    (_set("injected", 0, "module", "../../../etc/passwd"), r"injected\[0\].*dotted module path"),
    (_set("injected", 0, "module", "__class__"), r"injected\[0\].*dotted module path"),
    (_set("injected", 0, "module", "mlp.act_fn"), r"injected\[0\].*not an nn.Linear or Conv1D"),
    (_set("injected", 0, "alpha", None), r"'injected\[0\]\.alpha': expected a number"),
    (_set("history", {"kind": "merge"}), r"'history': expected a list"),
    (_set("dtype", "int8"), r"'dtype': expected a floating dtype name"),
    (_set("tensors_sha256", "00"), r"'tensors_sha256': expected 64 lowercase hex digits"),
    (_set("format_version", 3), r"adapter format version 3"),
]


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_every_malformed_field_is_one_clear_error(llama_file, edit, message):
    rewrite(llama_file, edit)
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=re.escape(str(llama_file)) + ".*" + message):
        lo.load_adapters(model, llama_file)
    _untouched(model, flags)


def test_header_that_is_not_an_object_or_not_json(llama_file):
    model = tiny_llama()
    rewrite(llama_file, text="[1, 2]")
    with pytest.raises(ValueError, match="the JSON config is a list, expected an object"):
        lo.load_adapters(model, llama_file)
    rewrite(llama_file, text="{not json")
    with pytest.raises(ValueError, match="JSON config in the header is corrupt"):
        lo.load_adapters(model, llama_file)
    rewrite(llama_file, text='{"num_blocks": ' + "9" * 5000 + "}")  # beyond int() limits
    with pytest.raises(ValueError, match="JSON config in the header is corrupt"):
        lo.load_adapters(model, llama_file)
    rewrite(llama_file, text="[" * 100000 + "]" * 100000)  # deeper than the parser goes
    with pytest.raises(ValueError, match="JSON config in the header is corrupt"):
        lo.load_adapters(model, llama_file)
    _untouched(model, [True] * len(list(model.parameters())))


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "r",
            200000,
            r"tensor 'lor2c\.0\.lora_A' has shape \(4, 32\), the header \(config\.r, "
            r"dims\[1\]\) needs \(200000, 32\)",
        ),
        ("r", 10**9, r"needs \(1000000000, 32\)"),
        ("injected_r", 10**12, r"injected\.0:self_attn__q_proj\.lora_A.*injected\[0\]\.r"),
    ],
)
def test_sizes_are_checked_against_the_files_tensors_before_allocating(
    llama_file, monkeypatch, field, value, message
):
    if field == "injected_r":
        rewrite(llama_file, _set("injected", 0, "r", value))
    else:
        rewrite(llama_file, _set("config", field, value))
    import lor2c_ops.adapters.io as io
    from lor2c_ops.adapters.container import LoR2CAdapters

    def no_allocation(*args, **kwargs):
        raise AssertionError("adapters were allocated before the header was checked")

    monkeypatch.setattr(io, "build", no_allocation)  # the span adapters
    monkeypatch.setattr(LoR2CAdapters, "add_injected", no_allocation)  # the injected LoRAs
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        lo.load_adapters(model, llama_file)
    with pytest.raises(ValueError, match=message):
        read_adapters(llama_file)
    _untouched(model, [True] * len(list(model.parameters())))


def test_extra_tensor_with_a_path_like_name_is_refused(llama_file):
    rewrite(llama_file, edit_tensors=lambda t: t.update({"../../evil": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected \['\.\./\.\./evil'\]"):
        lo.load_adapters(tiny_llama(), llama_file)


def test_corrupt_tensor_data_fails_its_checksum(llama_file):
    model = tiny_llama()
    good = llama_file.read_bytes()
    assert len(read_adapters(llama_file)[0]["tensors_sha256"]) == 64
    llama_file.write_bytes(good[:-100] + b"\xff" * 100)  # the probe: NaN weights
    with pytest.raises(
        ValueError, match=re.escape(str(llama_file)) + ".*does not match the checksum in its header"
    ):
        lo.load_adapters(model, llama_file)
    middle = len(good) - 300
    llama_file.write_bytes(good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1 :])
    with pytest.raises(ValueError, match="checksum"):
        read_adapters(llama_file)
    _untouched(model, [True] * len(list(model.parameters())))
    llama_file.write_bytes(good)
    lo.load_adapters(model, llama_file)


def test_format_1_files_without_checksum_still_load_with_a_warning(llama_file):
    expected = read_adapters(llama_file)[1]

    def to_v1(meta):
        meta["format_version"] = 1
        del meta["tensors_sha256"]

    rewrite(llama_file, to_v1)
    with pytest.warns(UserWarning, match="no checksum"):
        h = lo.load_adapters(tiny_llama(), llama_file)
    got = {k: v for k, v in h.container.state_dict().items()}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    rewrite(llama_file, _set("format_version", 2))  # a version-2 file must have one
    with pytest.raises(ValueError, match="'tensors_sha256': missing"):
        lo.load_adapters(tiny_llama(), llama_file)


def test_passing_the_json_config_says_what_to_pass(tmp_path):
    h = trained_handle(tiny_llama())
    lo.save_adapters(h, tmp_path / "run")
    with pytest.raises(
        ValueError,
        match=r"adapter_config\.json: this is the JSON copy of the "
        r"config.*pass the directory",
    ):
        lo.load_adapters(tiny_llama(), tmp_path / "run" / "adapter_config.json")
    renamed = tmp_path / "config.safetensors"
    renamed.write_bytes((tmp_path / "run" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match="a JSON file, not a safetensors adapter file"):
        lo.load_adapters(tiny_llama(), renamed)


def test_saved_files_respect_the_umask(tmp_path):
    h = trained_handle(tiny_llama())
    old = os.umask(0o022)
    try:
        lo.save_adapters(h, tmp_path / "run")
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o077)
        path = lo.save_adapters(h, tmp_path / "private.safetensors")
        assert os.stat(path).st_mode & 0o777 == 0o600
        os.chmod(path, 0o640)  # overwriting keeps the file's own permissions
        os.umask(0o022)
        lo.save_adapters(h, path)
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_gpt2_injection_round_trip(tmp_path):
    model = tiny_gpt2()
    h = trained_handle(model)
    h.inject(1, optimizer=False)
    with torch.no_grad():
        for lora in h.injected.values():
            lora.lora_B.normal_(std=0.05)
    expected = out(model)
    path = lo.save_adapters(h, tmp_path / "gpt2.safetensors")
    other = tiny_gpt2()
    h2 = lo.load_adapters(other, path)
    assert set(h2.injected) == {(1, "attn.c_attn[query]"), (1, "attn.c_attn[value]")}
    assert torch.equal(out(other), expected)
