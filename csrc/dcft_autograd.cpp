// The eager path of dcft_linear on the compiled backends ("cpu", "cuda"): one op,
// lor2c_ops_ext::dcft, whose Autograd kernel records a C++ autograd node (the pattern of
// lor2c_autograd.cpp): DCFTBackward, one hand-written node for every gradient (csrc/
// autograd_common.h says why). A forward + backward runs no Python beyond the call itself:
// lor2c_ops/ops/dcft.py (or its fast entry, csrc/fast_entry.cpp) checks the arguments and draws
// the seed first.
//
// The kernels are dcft_fwd / dcft_bwd as registered per device, reached through the dispatcher;
// the frozen weight's and bias's gradients (when they require grad) are the base linear's:
// dW = g.T @ x, db = sum of g's rows. torch.compile and opcheck use the Python library ops
// (lor2c_ops::dcft_fwd / dcft_bwd), which call the same kernels.
#include <torch/library.h>

#include "autograd_common.h"

namespace {

using lor2c::as_rows;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Pair run_forward(const at::Tensor& x, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, double scale, int64_t stride, double p,
                 const at::Tensor& seed) {
  if (x.size(0) == 0) {  // an empty batch (the kernels need at least one row)
    return {at::empty({0, weight.size(0)}, x.options()),
            at::empty({0, A.size(0) * C.size(0)},
                      x.options().dtype(at::promote_types(x.scalar_type(), at::kFloat)))};
  }
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lor2c_ops_ext::dcft_fwd", "")
          .typed<Pair(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                      double, const at::Tensor&)>();
  return op.call(x, weight, bias, A, B, C, scale, stride, p, seed);
}

Quad run_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t,
                  const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, double scale, int64_t stride, double p,
                  const at::Tensor& seed, bool need_dx, bool need_dA, bool need_dB, bool need_dC) {
  if (x.size(0) == 0) {  // an empty batch: the factors get exact zeros
    return {at::empty_like(x), at::zeros_like(A), at::zeros_like(B), at::zeros_like(C)};
  }
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lor2c_ops_ext::dcft_bwd", "")
          .typed<Quad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                      double, const at::Tensor&, bool, bool, bool, bool)>();
  return op.call(g, x, t, weight, A, B, C, scale, stride, p, seed, need_dx, need_dA, need_dB,
                 need_dC);
}

// The output rows (n, d_out) in x's leading shape, (..., d_out): a view.
at::Tensor in_x_shape(const at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(1);
  return out.view(shape);
}

// The forward below autograd, the output in x's leading shape (a view autograd does not see).
Pair forward_rows(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, double scale, int64_t stride, double p,
                  const at::Tensor& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [out, t] =
      run_forward(as_rows(x, weight.size(1)), weight, bias, A, B, C, scale, stride, p, seed);
  return {in_x_shape(out, x), t};
}

// Inputs (edges, in order): x, weight, bias (an invalid edge when absent), A, B, C. One node gives
// every gradient: the adapter's from the backward kernel, the frozen linear's (dW = g.T @ x,
// db = sum of g's rows) only when the weight or bias do require grad.
struct DCFTBackward final : public torch::autograd::Node {
  SavedVariable x_, t_, weight_, A_, B_, C_, seed_;  // x as the caller passed it
  std::vector<int64_t> x_shape_;                     // x's shape when it is not 2-D
  double scale_ = 1.0, p_ = 0.0;
  int64_t stride_ = 1;

  std::string name() const override { return "DCFTBackward"; }

  void release_variables() override {
    x_.reset_data();
    t_.reset_data();
    weight_.reset_data();
    A_.reset_data();
    B_.reset_data();
    C_.reset_data();
    seed_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(6);
    if (!grads[0].defined()) return out;
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1);
    const bool need_b = task_should_compute_output(2), need_A = task_should_compute_output(3);
    const bool need_B = task_should_compute_output(4), need_C = task_should_compute_output(5);
    if (!(need_x || need_w || need_b || need_A || need_B || need_C)) return out;
    const at::Tensor weight = weight_.unpack();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor g = as_rows(grads[0], weight.size(0));
    const at::Tensor x = as_rows(x_.unpack(), weight.size(1));
    if (need_x || need_A || need_B || need_C) {
      auto [dx, dA, dB, dC] =
          run_backward(g, x, t_.unpack(), weight, A_.unpack(), B_.unpack(), C_.unpack(), scale_,
                       stride_, p_, seed_.unpack(), need_x, need_A, need_B, need_C);
      if (need_x) out[0] = lor2c::in_shape(dx, x_shape_);
      if (need_A) out[3] = dA;
      if (need_B) out[4] = dB;
      if (need_C) out[5] = dC;
    }
    // The frozen base linear's gradients, only when the weight or bias do require grad.
    if (need_w) out[1] = g.t().mm(x).to(weight.scalar_type());
    if (need_b)
      out[2] = g.sum({0}, false, at::promote_types(g.scalar_type(), at::kFloat)).to(g.dtype());
    return out;
  }
};

at::Tensor dcft_autograd(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
                         double p, const at::Tensor& seed) {
  auto [out, t] = forward_rows(x, weight, bias, A, B, C, scale, stride, p, seed);
  const at::Tensor no_bias;
  const at::Tensor& b = bias.has_value() ? *bias : no_bias;
  if (torch::autograd::compute_requires_grad(x, weight, b, A, B, C)) {
    auto node = lor2c::make_node<DCFTBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, b, A, B, C));
    node->x_ = SavedVariable(x, false);
    node->t_ = SavedVariable(t, false);
    node->weight_ = SavedVariable(weight, false);
    node->A_ = SavedVariable(A, false);
    node->B_ = SavedVariable(B, false);
    node->C_ = SavedVariable(C, false);
    node->seed_ = SavedVariable(seed, false);
    node->x_shape_ = lor2c::shape_unless_2d(x);
    node->scale_ = scale;
    node->p_ = p;
    node->stride_ = stride;
    torch::autograd::set_history(out, node);
  }
  return out;
}

// Below autograd (inference mode, or no input needs a gradient): the forward kernel alone.
at::Tensor dcft_no_grad(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
                        double p, const at::Tensor& seed) {
  return std::get<0>(forward_rows(x, weight, bias, A, B, C, scale, stride, p, seed));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // dcft_linear's output with its backward as a C++ autograd node. Arguments as dcft_fwd, except
  // that x (..., d_in) may have any leading dimensions; out is (..., d_out).
  m.def(
      "dcft(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor C, float scale, "
      "int stride, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lor2c_ops_ext, Autograd, m) { m.impl("dcft", &dcft_autograd); }
TORCH_LIBRARY_IMPL(lor2c_ops_ext, CPU, m) { m.impl("dcft", &dcft_no_grad); }
#ifdef LOR2C_WITH_CUDA
TORCH_LIBRARY_IMPL(lor2c_ops_ext, CUDA, m) { m.impl("dcft", &dcft_no_grad); }
#endif
