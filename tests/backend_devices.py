"""Where each backend's tests run, shared by conftest.py and the test files. A module of its own
(not `from conftest import ...`): a pytest session that also collects benchmarks/ has two
modules named conftest, and such an import would get whichever loaded last."""

import pytest
import torch

from lor2c_ops import backends


def backend_device(name: str) -> torch.device:
    """Where a backend's tests run: CUDA when it needs or can use a GPU here, else the CPU."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def skip_unless_runnable(name: str) -> torch.device:
    """The device for backend `name`; skips only the CUDA backend's runtime tests without a GPU."""
    device = backend_device(name)
    reason = backends.BACKENDS[name].refuses(device, torch.float32)
    if reason is not None:
        if name == "cuda":
            pytest.skip(f"cuda backend: {reason}")
        raise AssertionError(f"backend {name} must run in this test environment: {reason}")
    return device
