"""Swapping adapters into existing models: apply_lor2c / apply_dcft, structural edits (SFS,
merge, inject, schedules), and save_adapters / load_adapters."""

from .apply import apply_lor2c, get_handle
from .blocks import find_blocks
from .config import LoR2CConfig
from .container import LoR2CAdapters
from .dcft_apply import DCFTHandle, apply_dcft
from .handle import LoR2CHandle, UntrainedParametersWarning
from .io import load_adapters, read_adapters, save_adapters
from .optim import StructuralEdit, update_optimizer
from .schedule import IMLoR2CSchedule, trainer_callback
from .sfs import dense_sfs, factored_singular_values, sfs
from .spans import SharedAdapter, SpanAdapter, SpanLoR2C
from .targets import InjectTarget

__all__ = [
    "DCFTHandle",
    "IMLoR2CSchedule",
    "InjectTarget",
    "LoR2CAdapters",
    "LoR2CConfig",
    "LoR2CHandle",
    "SharedAdapter",
    "SpanAdapter",
    "SpanLoR2C",
    "StructuralEdit",
    "UntrainedParametersWarning",
    "apply_dcft",
    "apply_lor2c",
    "dense_sfs",
    "factored_singular_values",
    "find_blocks",
    "get_handle",
    "load_adapters",
    "read_adapters",
    "save_adapters",
    "sfs",
    "trainer_callback",
    "update_optimizer",
]
