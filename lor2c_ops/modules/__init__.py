"""nn.Module front ends of the fused ops, one file per op family."""

from .dcft import DCFTLinear
from .lor2c import FusedLoR2C
from .share import ShareLoR2C

__all__ = ["DCFTLinear", "FusedLoR2C", "ShareLoR2C"]
