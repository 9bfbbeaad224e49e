// The eager path of dcft_linear on the compiled backends ("cpu", "cuda"): one op,
// lor2c_ops_ext::dcft, whose Autograd kernel records a C++ autograd node (the pattern of
// lor2c_autograd.cpp). A forward + backward runs no Python beyond the call itself:
// lor2c_ops/ops/dcft.py checks the arguments and draws the seed first.
//
// The kernels are dcft_fwd / dcft_bwd as registered per device, reached through the dispatcher;
// the frozen weight's and bias's gradients (when they require grad) are the base linear's:
// dW = g.T @ x, db = sum of g's rows. torch.compile and opcheck use the Python library ops
// (lor2c_ops::dcft_fwd / dcft_bwd), which call the same kernels.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace {

using lor2c::as_rows;
using torch::autograd::AutogradContext;
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

// Inputs: x, weight, bias, A, B, C, scale, stride, p, seed: the gradient list has one entry per
// argument, tensor or not.
constexpr int kInputs = 10;

struct DCFTFunction : public torch::autograd::Function<DCFTFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
                            double p, const at::Tensor& seed) {
    const at::Tensor x = as_rows(x_in, weight.size(1));
    auto [out, t] = run_forward(x, weight, bias, A, B, C, scale, stride, p, seed);
    ctx->save_for_backward({x, t, weight, A, B, C, seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["p"] = p;
    ctx->saved_data["x_shape"] = x_in.sizes();
    ctx->saved_data["has_bias"] = bias.has_value();
    return in_x_shape(out, x_in);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &t = saved[1], &weight = saved[2];
    const at::Tensor &A = saved[3], &B = saved[4], &C = saved[5], &seed = saved[6];
    variable_list out(kInputs);
    if (!grads[0].defined()) return out;
    const at::Tensor g = as_rows(grads[0], weight.size(0));
    // needs_input_grad counts tensor inputs only: without a bias, A, B and C move up by one.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t a = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_A = ctx->needs_input_grad(a), need_B = ctx->needs_input_grad(a + 1);
    const bool need_C = ctx->needs_input_grad(a + 2);
    if (need_x || need_A || need_B || need_C) {
      auto [dx, dA, dB, dC] =
          run_backward(g, x, t, weight, A, B, C, ctx->saved_data["scale"].toDouble(),
                       ctx->saved_data["stride"].toInt(), ctx->saved_data["p"].toDouble(), seed,
                       need_x, need_A, need_B, need_C);
      if (need_x) out[0] = lor2c::in_shape(ctx, dx);
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
  return DCFTFunction::apply(x, weight, bias, A, B, C, scale, stride, p, seed);
}

// Below autograd (inference mode, or no input needs a gradient): the forward kernel alone.
at::Tensor dcft_no_grad(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
                        double p, const at::Tensor& seed) {
  const at::Tensor out = std::get<0>(
      run_forward(as_rows(x, weight.size(1)), weight, bias, A, B, C, scale, stride, p, seed));
  return in_x_shape(out, x);
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
