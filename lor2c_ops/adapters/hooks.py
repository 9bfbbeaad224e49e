"""The forward hooks that run the adapters inside an unchanged model, and the calling conventions
of blocks they rely on (the hidden states come in first or by keyword, and go out alone or
first in a tuple / list).

A span adapter puts a forward hook on block `end` that adds its residual, and, when the span
covers several blocks, a forward pre-hook on block `start` that keeps h_start until then. An
injected LoRA puts a forward hook on its Linear / Conv1D. Hooks run outside Hugging Face's
gradient checkpointing in transformers 5 (which checkpoints `forward`); transformers 4 checkpoints
`Module.__call__`, hooks included, and recomputes each block alone in backward: there a span of
one block works, and a longer span raises, saying so (AddResidual). torch.compile of the whole
model traces the hooks.
"""

from __future__ import annotations

import torch

from ..modules.lor2c import FusedLoR2C
from .spans import SpanAdapter


def hidden_input(args, kwargs, name: str, index: int) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if name in kwargs and isinstance(kwargs[name], torch.Tensor):
        return kwargs[name]
    raise TypeError(
        f"LoR2C: block {index} was called without the hidden states as its first "
        f"positional argument or as keyword {name!r}; set "
        f"LoR2CConfig(hidden_states_kwarg=...)"
    )


def _not_hidden(output, index: int) -> TypeError:
    return TypeError(
        f"LoR2C: block {index} returned {type(output).__name__}; expected a tensor "
        f"or a tuple/list whose first element is the hidden states"
    )


def hidden_output(output, index: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise _not_hidden(output, index)


def replace_hidden(output, new, index: int):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise _not_hidden(output, index)


def _in_backward() -> bool:
    """Whether this runs inside an autograd backward pass (a checkpoint's recomputation)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # private: torch 2.0+
    return graph_task_id is not None and graph_task_id() != -1


class CaptureInput:
    """Forward pre-hook on block `start` of a multi-block span: keeps h_start until block `end`."""

    def __init__(self, store: dict, start: int, kwarg: str):
        self.store, self.start, self.kwarg = store, start, kwarg

    def __call__(self, module, args, kwargs):
        self.store[self.start] = hidden_input(args, kwargs, self.kwarg, self.start)
        return None


class AddResidual:
    """Forward hook on block `end`: output += s * dropout(h_start) @ A.T @ B.T (fused)."""

    def __init__(self, adapter: SpanAdapter, store: dict, kwarg: str):
        self.adapter, self.store, self.kwarg = adapter, store, kwarg

    def __call__(self, module, args, kwargs, output):
        a = self.adapter
        if a.start == a.end:
            x = hidden_input(args, kwargs, self.kwarg, a.start)
        else:
            x = self.store.pop(a.start, None)
            if x is None and _in_backward():
                # Run again inside backward: gradient checkpointing that wraps the block's hooks
                # (transformers before 5 checkpoints its layers' Module.__call__, hooks and all;
                # 5 checkpoints `forward`, and the hooks run outside) recomputes this block alone.
                raise RuntimeError(
                    f"LoR2C: block {a.end} is being recomputed by gradient checkpointing that "
                    f"includes its forward hooks (as transformers before 5.0 does), and the "
                    f"span ({a.start}, {a.end}) needs h_{a.start}, which is not kept for that: "
                    f"with such checkpointing use spans of one block each (LoR2CConfig("
                    f"spans=None), the default), or checkpoint without the hooks (transformers 5)"
                )
            if x is None:  # a forward that skipped block start
                raise RuntimeError(
                    f"LoR2C: block {a.end} ran without block {a.start} before it; "
                    f"the span ({a.start}, {a.end}) needs h_{a.start}"
                )
        out = hidden_output(output, a.end)
        return replace_hidden(output, a.residual(x, out), a.end)


class InjectedLoRA:
    """Forward hook on an nn.Linear (or Conv1D): y = x W.T + b + s * dropout(x) @ A.T @ B.T (the
    fused op with layer_out = x W.T + b)."""

    def __init__(self, lora: FusedLoR2C):
        self.lora = lora

    def __call__(self, module, args, output):
        return self.lora(args[0], output)


class InjectedSlices:
    """Forward hook on a fused projection: the LoRAs add to their [start, stop) slices of the
    output (GPT-2's c_attn: query and value), the rest passes through."""

    def __init__(self, parts):
        self.parts = sorted(parts, key=lambda p: p[1])  # (lora, start, stop)

    def __call__(self, module, args, output):
        x, pieces, pos = args[0], [], 0
        for lora, start, stop in self.parts:
            if start > pos:
                pieces.append(output[..., pos:start])
            pieces.append(lora(x, output[..., start:stop]))
            pos = stop
        if pos < output.shape[-1]:
            pieces.append(output[..., pos:])
        return torch.cat(pieces, dim=-1)
