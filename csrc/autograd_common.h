// What the C++ autograd ops of the eager path share (lor2c_autograd.cpp, dcft_autograd.cpp).
//
// Each op's Autograd kernel records one hand-written autograd node (a torch::autograd::Node
// subclass, as PyTorch's generated nodes are) rather than a torch::autograd::Function: the
// latter's CppNode keeps its saved values in a string-keyed map of IValues, wraps and checks every
// output generically and boxes its inputs, about a third of the op's host time at tiny sizes. The
// kernels run below autograd (AutoDispatchBelowADInplaceOrView): the dispatcher goes straight to
// the CPU or CUDA kernel, unboxed, instead of through the autograd fallback.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <type_traits>
#include <vector>

namespace lor2c {

// A new autograd node of type NodeT, held the way this torch holds graph nodes: by
// c10::intrusive_ptr where Node is an intrusive_ptr_target (torch 2.13), else by std::shared_ptr
// (torch 2.9 and earlier). Decided by the type, not a version number, so any torch in between
// builds too.
template <typename NodeT>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeT>) {
    return c10::make_intrusive<NodeT>();
  } else {
    return std::make_shared<NodeT>();
  }
}

// t as (rows, width) with unit column stride: a view whenever the layout allows one. The ops take
// rows inside their autograd node, so that N-D activations cost the graph no view nodes. Called
// below autograd: the view is not recorded.
inline at::Tensor as_rows(const at::Tensor& t, int64_t width) {
  at::Tensor t2 = t.dim() == 2 ? t : t.reshape({-1, width});
  if (t2.size(0) > 1 && width > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

// The shape of an N-D input, kept by a node to give its gradient back in it (empty for 2-D).
inline std::vector<int64_t> shape_unless_2d(const at::Tensor& t) {
  return t.dim() == 2 ? std::vector<int64_t>() : t.sizes().vec();
}

// Rows (n, d) back in a saved shape: a view (the kernels write their outputs contiguous).
inline at::Tensor in_shape(const at::Tensor& rows, const std::vector<int64_t>& shape) {
  return shape.empty() ? rows : rows.view(shape);
}

}  // namespace lor2c
