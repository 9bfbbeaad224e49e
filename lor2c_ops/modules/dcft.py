"""DCFTLinear: a frozen linear layer with a DCFT adapter (docs/math.md section 4)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dcft import dcft_delta, dcft_linear, subspace_size


class DCFTLinear(nn.Module):
    """y = x @ weight.T + bias + scaling * dropout(x) @ D, D = conv_transpose2d(A.T @ B.T, C, stride).

    weight (out_features, in_features) and bias are frozen; the trainable adapter is
    lora_A (r, m_in), lora_B (m_out, r) and lora_C (k, k), all from N(0, 0.02) as in the
    reference code, with in_features = (m_in - 1) * stride + k and out_features = (m_out - 1) *
    stride + k (stride defaults to k = kernel_size). scaling = alpha / r. Trainable parameters:
    r * (m_in + m_out) + k * k.

    Training runs the fused op, which never forms D. eval() merges scaling * D into the weight,
    so inference is a plain F.linear; the unmerged weight is kept aside and train() puts it back
    exactly (bit for bit, in any dtype). While merged, a change to the adapter (an optimizer
    step, load_state_dict, an in-place edit, a new scaling) is noticed at the next forward, which
    re-merges from the kept weight. Edits that bypass autograd's version counter (through
    `.data`) are not seen: call merge(force=True) after those. state_dict() always holds the
    unmerged weight.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 1, kernel_size: int = 2,
                 stride: Optional[int] = None, alpha: float = 1, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None, backend: Optional[str] = None,
                 merge_on_eval: bool = True):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("r", r), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        k = kernel_size
        if stride is None:
            stride = k
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= k:
            raise ValueError(f"stride: expected an int in 1..{k} (kernel_size) or None, got "
                             f"{stride!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.m_in = subspace_size(in_features, k, stride, "in_features")
        self.m_out = subspace_size(out_features, k, stride, "out_features")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.kernel_size, self.stride, self.alpha = k, stride, alpha
        self.dropout, self.backend, self.merge_on_eval = float(dropout), backend, merge_on_eval
        self.scaling = alpha / r
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, self.m_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.m_out, r, **factory))
        self.lora_C = nn.Parameter(torch.empty(k, k, **factory))
        # The unmerged weight while merged: a buffer, so .to() moves it with the weight, but not
        # persistent (state_dict holds the unmerged weight under "weight").
        self.register_buffer("_original", None, persistent=False)
        self._merged_key = None
        self._merged_weight_version = None
        self.reset_base_parameters()
        self.reset_parameters()

    # --- construction ----------------------------------------------------------------------------

    def reset_base_parameters(self) -> None:
        """nn.Linear's initialisation of the (frozen) base weight and bias."""
        self._require_unmerged("reset the base weight")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_parameters(self) -> None:
        """The adapter's initialisation in the reference code: A, B, C from N(0, 0.02)."""
        for p in (self.lora_A, self.lora_B, self.lora_C):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 1, kernel_size: int = 2,
                    stride: Optional[int] = None, alpha: float = 1, dropout: float = 0.0,
                    backend: Optional[str] = None, merge_on_eval: bool = True) -> "DCFTLinear":
        """Wraps an existing nn.Linear: its weight and bias Parameters are reused (not copied) and
        frozen; the adapter is created on their device and in their dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, r=r, kernel_size=kernel_size,
                     stride=stride, alpha=alpha, dropout=dropout, bias=False, device="meta",
                     dtype=w.dtype, backend=backend, merge_on_eval=merge_on_eval)
        module.weight = w
        module.bias = linear.bias
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(False)
        for name in ("lora_A", "lora_B", "lora_C"):
            meta = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty(meta.shape, device=w.device,
                                                           dtype=w.dtype)))
        module.reset_parameters()
        module.train(linear.training)
        return module

    # --- merging ---------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._original is not None

    def _adapter_key(self):
        params = (self.lora_A, self.lora_B, self.lora_C)
        return (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
                float(self.scaling), self.stride)

    def delta_weight(self) -> torch.Tensor:
        """scaling * D.T (out_features, in_features) in float32: what merge() adds to the weight."""
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            A, B, C = (p.detach().float() for p in (self.lora_A, self.lora_B, self.lora_C))
            return (dcft_delta(A, B, C, self.stride) * self.scaling).t()

    def merge(self, force: bool = False) -> None:
        """Adds scaling * D into the weight (computed in float32), keeping the unmerged weight.
        Merging again re-merges from the kept weight when the adapter changed (or when forced)."""
        key = self._adapter_key()
        if self.merged:
            if key == self._merged_key and not force:
                return
            self._check_weight_untouched("re-merge")
            base = self._original
        else:
            base = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_(base.float() + self.delta_weight())
        self._original = base
        self._merged_key = key
        self._merged_weight_version = self.weight._version

    def unmerge(self) -> None:
        """Puts the kept, unmerged weight back exactly."""
        if not self.merged:
            return
        self._check_weight_untouched("unmerge")
        with torch.no_grad():
            self.weight.copy_(self._original)
        self._original = None
        self._merged_key = None
        self._merged_weight_version = None

    def _check_weight_untouched(self, action: str) -> None:
        if self.weight._version != self._merged_weight_version:
            raise RuntimeError(
                f"DCFTLinear: the weight was modified while the adapter was merged into it, so it "
                f"cannot {action} exactly; set the base weight only while unmerged (call train() "
                f"or unmerge() first)")

    def _require_unmerged(self, action: str) -> None:
        if getattr(self, "_original", None) is not None:
            raise RuntimeError(f"DCFTLinear: cannot {action} while the adapter is merged into the "
                               f"weight; call train() or unmerge() first")

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.unmerge()
        elif self.merge_on_eval:
            self.merge()
        return self

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.merge_on_eval:
            self.merge()  # a no-op unless the adapter changed since the last merge
            return F.linear(x, self.weight, self.bias)
        if self.merged:
            self.unmerge()
        return dcft_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_C,
                           self.scaling, self.stride, self.dropout, self.training,
                           backend=self.backend)

    def orthogonal_penalty(self) -> torch.Tensor:
        """||A A.T - I||_F + ||B.T B - I||_F (docs/math.md section 4.4), differentiable."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return (torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye)
                + torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye))

    # --- state dict: always the unmerged weight ----------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = (self._original if keep_vars
                                              else self._original.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        remerge = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if remerge:
            self.merge()

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, dropout={self.dropout}, bias={self.bias is not None}")
        if self.merged:
            text += ", merged"
        return text + (f", backend={self.backend!r}" if self.backend else "")
