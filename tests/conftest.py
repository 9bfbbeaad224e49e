import os

# OpenMP threads that spin while waiting make every parallel region crawl when another process
# holds a core (seen: a MiniLM step from 0.045 s to 2 s); CI machines are small and shared.
# OpenMP reads this when torch loads it, so it is set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton picks interpreter or GPU compiler when a kernel is defined (torch does not read this):
# set it before anything imports lor2c_ops, so that without a GPU the Triton backend is tested
# on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import lor2c_ops  # noqa: E402,F401
from lor2c_ops import backends  # noqa: E402
from lor2c_ops.ops import _common, dcft as dcft_op, lor2c as lor2c_op  # noqa: E402


@pytest.fixture(params=backends.NAMES)
def backend(request):
    return request.param


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if any kernel of either op is reached: bad input must be refused before
    any kernel runs (test_lor2c, test_share, test_dcft)."""

    def forbidden(backend):
        raise AssertionError("a kernel ran before the bad input was rejected")

    for op in (lor2c_op, dcft_op):
        monkeypatch.setattr(op, "_kernels", forbidden)
    # the eager path's C++ autograd op and the fast entry reach the kernels without _kernels:
    # take the Python path
    monkeypatch.setattr(_common, "compiled_autograd", lambda op: False)
    monkeypatch.setattr(_common, "FAST", None)
