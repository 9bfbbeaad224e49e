// What the C++ autograd ops of the eager path share (lor2c_autograd.cpp, dcft_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace lor2c {

// t as (rows, width) with unit column stride: a view whenever the layout allows one. The ops take
// rows inside their autograd node, so that N-D activations cost the graph no view nodes.
inline at::Tensor as_rows(const at::Tensor& t, int64_t width) {
  at::Tensor t2 = t.dim() == 2 ? t : t.reshape({-1, width});
  if (t2.size(0) > 1 && width > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

// A gradient of rows back in the shape of the forward's input (saved as "x_shape"): a view, the
// kernels write it contiguous.
inline at::Tensor in_shape(torch::autograd::AutogradContext* ctx, const at::Tensor& rows) {
  const auto shape = ctx->saved_data["x_shape"].toIntVector();
  return static_cast<int64_t>(shape.size()) == 2 ? rows : rows.view(shape);
}

}  // namespace lor2c
