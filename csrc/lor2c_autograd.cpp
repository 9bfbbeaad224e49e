// The eager path of the compiled backends ("cpu", "cuda"): one op, lor2c_ops_ext::lor2c, whose
// Autograd kernel records a C++ autograd node. A forward + backward then runs no Python beyond
// the call itself (lor2c_ops/ops/lor2c.py checks the arguments and draws the seed first): the
// backward node calls lor2c_bwd / lor2c_multi_bwd straight from the autograd engine.
//
// The kernels are the ones registered per device for lor2c_fwd / lor2c_bwd (csrc/cpu/lor2c.cpp,
// csrc/cuda/lor2c_binding.cpp), reached through the dispatcher. torch.compile and opcheck use the
// Python library ops instead (lor2c_ops::lor2c_fwd / lor2c_bwd), which call the same kernels.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace {

using lor2c::as_rows;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Pair run_forward(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                 const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale, double p,
                 const at::Tensor& seed) {
  if (ids.has_value()) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lor2c_ops_ext::lor2c_multi_fwd", "")
            .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, double, const at::Tensor&)>();
    return op.call(x, layer_out, A, B, *ids, scale, p, seed);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lor2c_ops_ext::lor2c_fwd", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double, double, const at::Tensor&)>();
  return op.call(x, layer_out, A, B, scale, p, seed);
}

Triple run_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& ids, double scale,
                    double p, const at::Tensor& seed, bool need_dx, bool need_dA, bool need_dB) {
  if (ids.defined()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lor2c_ops_ext::lor2c_multi_bwd", "")
                         .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       double, double, const at::Tensor&, bool, bool, bool)>();
    return op.call(g, x, t, A, B, ids, scale, p, seed, need_dx, need_dA, need_dB);
  }
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lor2c_ops_ext::lor2c_bwd", "")
          .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, double, const at::Tensor&, bool, bool, bool)>();
  return op.call(g, x, t, A, B, scale, p, seed, need_dx, need_dA, need_dB);
}

// The forward's outputs for an empty batch (the kernels need at least one row).
Pair empty_forward(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A) {
  return {at::empty_like(layer_out), at::empty({0, A.size(-2)}, x.options().dtype(at::kFloat))};
}

struct LoR2CFunction : public torch::autograd::Function<LoR2CFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in,
                            const at::Tensor& layer_out, const at::Tensor& A, const at::Tensor& B,
                            const c10::optional<at::Tensor>& ids, double scale, double p,
                            const at::Tensor& seed) {
    const at::Tensor x = as_rows(x_in, A.size(-1));
    const at::Tensor lo = as_rows(layer_out, B.size(-2));
    auto [out, t] =
        x.size(0) == 0 ? empty_forward(x, lo, A) : run_forward(x, lo, A, B, ids, scale, p, seed);
    ctx->save_for_backward({x, t, A, B, ids.has_value() ? *ids : at::Tensor(), seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["x_shape"] = x_in.sizes();
    return layer_out.dim() == 2 ? out : out.view(layer_out.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &t = saved[1], &A = saved[2], &B = saved[3];
    const at::Tensor &ids = saved[4], &seed = saved[5];
    at::Tensor g = grads[0];
    const bool need_x = ctx->needs_input_grad(0), need_lo = ctx->needs_input_grad(1);
    const bool need_A = ctx->needs_input_grad(2), need_B = ctx->needs_input_grad(3);
    variable_list out(8);
    if (!g.defined()) return out;
    if (need_lo) out[1] = g;  // d layer_out is the output gradient itself
    if (!(need_x || need_A || need_B)) return out;
    g = as_rows(g, g.size(-1));
    at::Tensor dx, dA, dB;
    if (x.size(0) == 0) {  // an empty batch: the weights get exact zeros
      dx = at::empty_like(x);
      dA = at::zeros_like(A);
      dB = at::zeros_like(B);
    } else {
      std::tie(dx, dA, dB) =
          run_backward(g, x, t, A, B, ids, ctx->saved_data["scale"].toDouble(),
                       ctx->saved_data["p"].toDouble(), seed, need_x, need_A, need_B);
    }
    if (need_x) out[0] = lor2c::in_shape(ctx, dx);
    if (need_A) out[2] = dA;
    if (need_B) out[3] = dB;
    return out;
  }
};

at::Tensor lor2c_autograd(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale,
                          double p, const at::Tensor& seed) {
  return LoR2CFunction::apply(x, layer_out, A, B, ids, scale, p, seed);
}

// Below autograd (inference mode, or no input needs a gradient): the forward kernel alone.
at::Tensor lor2c_no_grad(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                         const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale,
                         double p, const at::Tensor& seed) {
  const at::Tensor x2 = as_rows(x, A.size(-1));
  if (x2.size(0) == 0) return at::empty_like(layer_out);
  const at::Tensor out =
      std::get<0>(run_forward(x2, as_rows(layer_out, B.size(-2)), A, B, ids, scale, p, seed));
  return layer_out.dim() == 2 ? out : out.view(layer_out.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // out = layer_out + scale * dropout(x) @ A.T @ B.T with its backward as a C++ autograd node;
  // ids given: A, B are banks and row i uses adapter ids[i] (-1: none). Arguments as lor2c_fwd,
  // except that x (..., d_in) and layer_out (..., d_out) may have any leading dimensions (ids:
  // one per row); out has layer_out's shape.
  m.def(
      "lor2c(Tensor x, Tensor layer_out, Tensor A, Tensor B, Tensor? ids, float scale, "
      "float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lor2c_ops_ext, Autograd, m) { m.impl("lor2c", &lor2c_autograd); }
TORCH_LIBRARY_IMPL(lor2c_ops_ext, CPU, m) { m.impl("lor2c", &lor2c_no_grad); }
#ifdef LOR2C_WITH_CUDA
TORCH_LIBRARY_IMPL(lor2c_ops_ext, CUDA, m) { m.impl("lor2c", &lor2c_no_grad); }
#endif
