"""Backend reporting, and the package working without its compiled extension."""

import os
import subprocess
import sys

import torch

from lor2c_ops import backends, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=300,
    )


def test_info_lists_every_backend_with_a_reason():
    text = info.report()
    for name in backends.NAMES:
        assert name in text
    for name, reason in backends.available("cpu").items():
        assert reason is None or len(reason) > 10, f"{name}: unhelpful reason {reason!r}"


def test_info_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "lor2c_ops.info"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "backends for cpu tensors" in result.stdout


def test_import_without_the_extension_falls_back():
    code = (
        "import sys; sys.modules['lor2c_ops._C'] = None\n"  # makes `from . import _C` fail
        "import torch, lor2c_ops as lo\n"
        "from lor2c_ops import backends\n"
        "reason = backends.available('cpu')['cpu']\n"
        "assert reason and 'extension' in reason, reason\n"
        "assert backends.select(None, torch.device('cpu'), torch.float32) == 'reference'\n"
        "x = torch.randn(4, 6); A = torch.randn(2, 6); B = torch.randn(5, 2)\n"
        "lo_ = torch.randn(4, 5)\n"
        "y = lo.lor2c_residual(x, lo_, A, B, scale=0.5)\n"
        "torch.testing.assert_close(y, lo_ + 0.5 * x @ A.T @ B.T)\n"
        "try:\n"
        "    lo.lor2c_residual(x, lo_, A, B, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'extension' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=cpu ran without the extension')\n"
        "print('ok')\n"
    )
    result = _python(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_default_backend_per_device():
    assert backends.select(None, torch.device("cpu"), torch.bfloat16) == "cpu"
    if torch.cuda.is_available():
        assert backends.select(None, torch.device("cuda"), torch.bfloat16) in ("triton", "cuda")


def test_info_names_the_eager_rule_from_its_one_source(monkeypatch):
    """The info line is backends.expression_min_rank's: a rule there shows, none shows none."""
    monkeypatch.setattr(
        backends, "expression_min_rank", lambda dtype: 24 if dtype == torch.float16 else None
    )
    line = info.eager_rule_line()
    assert line.startswith("float16 calls without dropout from rank 24 (")
    assert line.count("calls without dropout") == 1
    monkeypatch.setattr(backends, "expression_min_rank", lambda dtype: None)
    assert info.eager_rule_line().startswith("nothing")
    assert "backend=None sends to the eager expression: nothing" in info.report()
