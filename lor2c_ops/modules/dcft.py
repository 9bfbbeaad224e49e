"""DCFTLinear: a frozen linear layer with a DCFT adapter (docs/math.md section 4)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as checks
from ..ops.dcft import dcft_delta, dcft_linear, subspace_size


class DCFTLinear(nn.Module):
    """y = x @ weight.T + bias + scaling * dropout(x) @ D, D = conv_transpose2d(A.T @ B.T, C,
    stride).

    weight (out_features, in_features) and bias are frozen; the trainable adapter is
    lora_A (r, m_in), lora_B (m_out, r) and lora_C (k, k), all from N(0, 0.02) as in the
    reference code, with in_features = (m_in - 1) * stride + k and out_features = (m_out - 1) *
    stride + k (stride defaults to k = kernel_size). scaling = alpha / r. Trainable parameters:
    r * (m_in + m_out) + k * k.

    Training runs the fused op, which never forms D. eval() folds scaling * D into the weight
    (fold()), so inference is a plain F.linear; the unfolded weight is kept aside and train()
    puts it back exactly (unfold(); bit for bit, in any dtype). While folded, a change to the
    adapter (an optimizer step, load_state_dict, an in-place edit, a new scaling) is noticed at
    the next forward, which folds again from the kept weight. Edits that bypass autograd's
    version counter (through `.data`) are not seen: call fold(force=True) after those.
    state_dict() always holds the unfolded weight.

    "Fold" is this module's word for adding D into the weight; merge(), unmerge() and merged are
    the older names of fold(), unfold() and folded, kept as aliases (and merge_on_eval keeps its
    name: fold on eval()). In lor2c_ops a "merge" is the MergeLoR2C span merge of
    LoR2CHandle.merge().
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 1,
        kernel_size: int = 2,
        stride: Optional[int] = None,
        alpha: float = 1,
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
        merge_on_eval: bool = True,
    ):
        super().__init__()
        checks.positive_ints(
            in_features=in_features, out_features=out_features, r=r, kernel_size=kernel_size
        )
        k = kernel_size
        stride = (
            k
            if stride is None
            else checks.int_in_range(stride, "stride", 1, k, " (kernel_size) or None")
        )
        dropout = checks.dropout_probability(dropout)
        self.m_in = subspace_size(in_features, k, stride, "in_features")
        self.m_out = subspace_size(out_features, k, stride, "out_features")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.kernel_size, self.stride, self.alpha = k, stride, alpha
        self.dropout, self.backend, self.merge_on_eval = dropout, backend, merge_on_eval
        self.scaling = alpha / r
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, **factory), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, self.m_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.m_out, r, **factory))
        self.lora_C = nn.Parameter(torch.empty(k, k, **factory))
        # The unfolded weight while folded: a buffer, so .to() moves it with the weight, but not
        # persistent (state_dict holds the unfolded weight under "weight").
        self.register_buffer("_original", None, persistent=False)
        self._folded_key = None
        self._folded_weight_version = None
        self.reset_base_parameters()
        self.reset_parameters()

    # --- construction ----------------------------------------------------------------------------

    def reset_base_parameters(self) -> None:
        """nn.Linear's initialisation of the (frozen) base weight and bias."""
        self._require_unfolded("reset the base weight")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_parameters(self) -> None:
        """The adapter's initialisation in the reference code: A, B, C from N(0, 0.02)."""
        for p in (self.lora_A, self.lora_B, self.lora_C):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 1,
        kernel_size: int = 2,
        stride: Optional[int] = None,
        alpha: float = 1,
        dropout: float = 0.0,
        backend: Optional[str] = None,
        merge_on_eval: bool = True,
    ) -> "DCFTLinear":
        """Wraps an existing nn.Linear: its weight and bias Parameters are reused (not copied) and
        frozen; the adapter is created on their device and in their dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            kernel_size=kernel_size,
            stride=stride,
            alpha=alpha,
            dropout=dropout,
            bias=False,
            device="meta",
            dtype=w.dtype,
            backend=backend,
            merge_on_eval=merge_on_eval,
        )
        module.weight = w
        module.bias = linear.bias
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(False)
        for name in ("lora_A", "lora_B", "lora_C"):
            meta = getattr(module, name)
            setattr(
                module, name, nn.Parameter(torch.empty(meta.shape, device=w.device, dtype=w.dtype))
            )
        module.reset_parameters()
        module.train(linear.training)
        return module

    # --- folding D into the weight ----------------------------------------------------------------

    @property
    def folded(self) -> bool:
        """Whether scaling * D.T is folded into the weight (eval() with merge_on_eval)."""
        return self._original is not None

    def _adapter_key(self):
        params = (self.lora_A, self.lora_B, self.lora_C)
        return (
            tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
            float(self.scaling),
            self.stride,
        )

    def delta_weight(self) -> torch.Tensor:
        """scaling * D.T (out_features, in_features) in float32: what fold() adds to the weight."""
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            A, B, C = (p.detach().float() for p in (self.lora_A, self.lora_B, self.lora_C))
            return (dcft_delta(A, B, C, self.stride) * self.scaling).t()

    def fold(self, force: bool = False) -> None:
        """Adds scaling * D into the weight (computed in float32), keeping the unfolded weight.
        Folding again folds afresh from the kept weight when the adapter changed (or when
        forced)."""
        key = self._adapter_key()
        if self.folded:
            if key == self._folded_key and not force:
                return
            self._check_weight_untouched("fold again")
            base = self._original
        else:
            base = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_(base.float() + self.delta_weight())
        self._original = base
        self._folded_key = key
        self._folded_weight_version = self.weight._version

    def unfold(self) -> None:
        """Puts the kept, unfolded weight back exactly."""
        if not self.folded:
            return
        self._check_weight_untouched("unfold")
        with torch.no_grad():
            self.weight.copy_(self._original)
        self._original = None
        self._folded_key = None
        self._folded_weight_version = None

    # the older names, kept for compatibility (docs/api.md section 2.3)
    merged = folded
    merge = fold
    unmerge = unfold

    def _check_weight_untouched(self, action: str) -> None:
        if self.weight._version != self._folded_weight_version:
            raise RuntimeError(
                f"DCFTLinear: the weight was modified while the adapter was merged into it "
                f"(folded), so it cannot {action} exactly; set the base weight only while "
                f"unfolded (call train() or unfold() first)"
            )

    def _require_unfolded(self, action: str) -> None:
        if getattr(self, "_original", None) is not None:
            raise RuntimeError(
                f"DCFTLinear: cannot {action} while the adapter is folded into the "
                f"weight; call train() or unfold() first"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.unfold()
        elif self.merge_on_eval:
            self.fold()
        return self

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.merge_on_eval:
            self.fold()  # a no-op unless the adapter changed since the last fold
            return F.linear(x, self.weight, self.bias)
        if self.folded:
            self.unfold()
        return dcft_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.lora_C,
            self.scaling,
            self.stride,
            self.dropout,
            self.training,
            backend=self.backend,
        )

    def orthogonal_penalty(self) -> torch.Tensor:
        """||A A.T - I||_F + ||B.T B - I||_F (docs/math.md section 4.4), differentiable."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return torch.linalg.matrix_norm(
            self.lora_A @ self.lora_A.T - eye
        ) + torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye)

    # --- state dict: always the unfolded weight --------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.folded:
            destination[prefix + "weight"] = (
                self._original if keep_vars else self._original.detach()
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        refold = self.folded
        self.unfold()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if refold:
            self.fold()

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, alpha={self.alpha}, "
            f"scaling={self.scaling:g}, dropout={self.dropout}, bias={self.bias is not None}"
        )
        if self.folded:
            text += ", folded"
        return text + (f", backend={self.backend!r}" if self.backend else "")
