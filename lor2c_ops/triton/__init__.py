"""Triton kernels (imported lazily: triton is optional).

Triton decides between compiling for a GPU and interpreting on the CPU when a kernel is
defined, from TRITON_INTERPRET; INTERPRET records the value that the kernels here were defined
with, so the dispatcher can say why CPU tensors are refused.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
