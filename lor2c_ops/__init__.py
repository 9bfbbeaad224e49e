"""lor2c_ops: fused kernels for low-rank residual adapters (LoR2C and its variants, DCFT).

    import lor2c_ops as lo
    y = lo.lor2c_residual(x, layer_out, A, B, scale=2.0, dropout_p=0.1)
    adapter = lo.FusedLoR2C(768, r=8, alpha=16)

`python -m lor2c_ops.info` lists the backends available here and why the others are not.
"""

from ._version import __version__
from . import _ext  # noqa: F401  (loads the compiled kernels when they were built)
from .backends import available as available_backends
from .modules import DCFTLinear, FusedLoR2C, ShareLoR2C
from .ops.dcft import dcft_delta, dcft_linear
from .ops.lor2c import lor2c_residual

__all__ = [
    "__version__",
    "available_backends",
    "DCFTLinear",
    "FusedLoR2C",
    "ShareLoR2C",
    "dcft_delta",
    "dcft_linear",
    "lor2c_residual",
]
from .adapters import (
    IMLoR2CSchedule,
    LoR2CConfig,
    apply_dcft,
    apply_lor2c,  # noqa: E402
    load_adapters,
    save_adapters,
)

__all__ += [
    "IMLoR2CSchedule",
    "LoR2CConfig",
    "apply_dcft",
    "apply_lor2c",
    "load_adapters",
    "save_adapters",
]
