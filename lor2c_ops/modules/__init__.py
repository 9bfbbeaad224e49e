"""nn.Module front ends of the fused ops, one file per op family."""
from .lor2c import FusedLoR2C

__all__ = ["FusedLoR2C"]
