"""`python -m lor2c_ops.info`: versions, and which backends run here and why the others do not."""
from __future__ import annotations

import platform

import torch

from . import __version__, backends


def report() -> str:
    lines = [f"lor2c_ops {__version__}", f"torch {torch.__version__} (CUDA build: "
             f"{torch.version.cuda or 'no'})", f"python {platform.python_version()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    for device_type in device_types:
        lines.append(f"\nbackends for {device_type} tensors "
                     f"(default: {backends.select(None, torch.device(device_type), torch.float32)}):")
        for name, reason in backends.available(device_type).items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
