// The eager path of the compiled backends ("cpu", "cuda"): one op, lor2c_ops_ext::lor2c, whose
// Autograd kernel records a C++ autograd node, LoR2CBackward (csrc/autograd_common.h says why a
// hand-written node). A forward + backward then runs no Python beyond the call itself
// (lor2c_ops/ops/lor2c.py, or its fast entry csrc/fast_entry.cpp, checks the arguments and draws
// the seed first): the node calls lor2c_bwd / lor2c_multi_bwd straight from the autograd engine.
//
// The kernels are the ones registered per device for lor2c_fwd / lor2c_bwd (csrc/cpu/lor2c.cpp,
// csrc/cuda/lor2c_binding.cpp), reached through the dispatcher below autograd. torch.compile and
// opcheck use the Python library ops instead (lor2c_ops::lor2c_fwd / lor2c_bwd), which call the
// same kernels.
#include <torch/library.h>

#include "autograd_common.h"

namespace {

using lor2c::as_rows;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Pair run_forward(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                 const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale, double p,
                 const at::Tensor& seed) {
  if (ids.has_value() && ids->defined()) {
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

// The forward below autograd: (out in layer_out's shape, t). Rows are taken here (views that
// autograd does not see); an empty batch gets empty outputs (the kernels need a row).
Pair forward_rows(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                  const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale, double p,
                  const at::Tensor& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x2 = as_rows(x, A.size(-1));
  const at::Tensor lo = as_rows(layer_out, B.size(-2));
  if (x2.size(0) == 0)
    return {at::empty_like(layer_out), at::empty({0, A.size(-2)}, x.options().dtype(at::kFloat))};
  auto [out, t] = run_forward(x2, lo, A, B, ids, scale, p, seed);
  return {layer_out.dim() == 2 ? out : out.view(layer_out.sizes()), t};
}

// Inputs (edges, in order): x, layer_out, A, B. d layer_out is the output gradient itself.
struct LoR2CBackward final : public torch::autograd::Node {
  SavedVariable x_, t_, A_, B_, ids_, seed_;  // x as the caller passed it (rows retaken here)
  std::vector<int64_t> x_shape_;              // x's shape when it is not 2-D
  double scale_ = 1.0, p_ = 0.0;

  std::string name() const override { return "LoR2CBackward"; }

  void release_variables() override {
    x_.reset_data();
    t_.reset_data();
    A_.reset_data();
    B_.reset_data();
    ids_.reset_data();
    seed_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(4);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const bool need_x = task_should_compute_output(0), need_lo = task_should_compute_output(1);
    const bool need_A = task_should_compute_output(2), need_B = task_should_compute_output(3);
    if (need_lo) out[1] = grad;
    if (!(need_x || need_A || need_B)) return out;
    const at::Tensor A = A_.unpack(), B = B_.unpack();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor x = as_rows(x_.unpack(), A.size(-1));
    at::Tensor dx, dA, dB;
    if (x.size(0) == 0) {  // an empty batch: the weights get exact zeros
      dx = at::empty_like(x);
      dA = at::zeros_like(A);
      dB = at::zeros_like(B);
    } else {
      std::tie(dx, dA, dB) =
          run_backward(as_rows(grad, grad.size(-1)), x, t_.unpack(), A, B, ids_.unpack(), scale_,
                       p_, seed_.unpack(), need_x, need_A, need_B);
    }
    if (need_x) out[0] = lor2c::in_shape(dx, x_shape_);
    if (need_A) out[2] = dA;
    if (need_B) out[3] = dB;
    return out;
  }
};

at::Tensor lor2c_autograd(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale,
                          double p, const at::Tensor& seed) {
  auto [out, t] = forward_rows(x, layer_out, A, B, ids, scale, p, seed);
  if (torch::autograd::compute_requires_grad(x, layer_out, A, B)) {
    auto node = lor2c::make_node<LoR2CBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, layer_out, A, B));
    node->x_ = SavedVariable(x, false);
    node->t_ = SavedVariable(t, false);
    node->A_ = SavedVariable(A, false);
    node->B_ = SavedVariable(B, false);
    if (ids.has_value()) node->ids_ = SavedVariable(*ids, false);
    node->seed_ = SavedVariable(seed, false);
    node->x_shape_ = lor2c::shape_unless_2d(x);
    node->scale_ = scale;
    node->p_ = p;
    torch::autograd::set_history(out, node);
  }
  return out;
}

// Below autograd (inference mode, or no input needs a gradient): the forward kernel alone.
at::Tensor lor2c_no_grad(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                         const at::Tensor& B, const c10::optional<at::Tensor>& ids, double scale,
                         double p, const at::Tensor& seed) {
  return std::get<0>(forward_rows(x, layer_out, A, B, ids, scale, p, seed));
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
