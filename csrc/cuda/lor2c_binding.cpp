// ATen glue of the LoR2C residual CUDA kernels: the CUDA implementations of the private ops
// lor2c_ops_ext::lor2c_fwd / lor2c_bwd and lor2c_multi_fwd / lor2c_multi_bwd (schemas in
// csrc/lor2c.cpp). Same checks, outputs and dtypes as csrc/cpu/lor2c.cpp, plus device checks;
// allocation through ATen (the caching allocator), work enqueued on the current stream, no host
// synchronisation. The dtype mapping, dropout arguments, device checks and launch-error check
// are binding_common.h's, shared with the DCFT binding.
// Compiled only into CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../lor2c_common.h"
#include "binding_common.h"
#include "lor2c_kernels.h"

namespace lor2c {
namespace {

using cuda::check_cuda;
using cuda::check_device;
using cuda::check_launch;
using cuda::device_info;
using cuda::dropout_args;
using cuda::dtype_of;

// Checks of a forward: x on a CUDA device, then ../lor2c_common.h's check_forward (the CPU entry
// point's checks: x, layer_out and one adapter's A (r, d_in), B (d_out, r), a bank's row 0 for a
// multi-adapter call), then that every tensor is on x's device. Returns x's device.
at::Device check_fwd(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& seed, double p) {
  check_cuda(x);
  check_forward(x, layer_out, A, B, seed, p);
  dtype_of(x);
  check_device(layer_out, "layer_out", x.device());
  check_device(seed, "seed", x.device());
  return x.device();
}

// The same for a backward, with grad (n, d_out) and t (n, r) fp32 from the forward.
at::Device check_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& seed, double p) {
  check_cuda(x);
  check_backward(grad, x, t, A, B, seed, p);
  dtype_of(x);
  check_device(grad, "grad", x.device());
  check_device(t, "t", x.device());
  check_device(seed, "seed", x.device());
  return x.device();
}

// Kernel arguments of a forward; Ac, Bc the contiguous weights (one adapter's or the banks).
cuda::FwdArgs fwd_args(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& Ac,
                       const at::Tensor& Bc, const at::Tensor& out, const at::Tensor& t,
                       double scale, double p, const at::Tensor& seedc) {
  cuda::FwdArgs args{};
  args.act = dtype_of(x);
  args.weights_fp32 = Ac.scalar_type() == at::kFloat;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.layer_out = layer_out.data_ptr();
  args.ldl = layer_out.stride(0);
  args.A = Ac.data_ptr();
  args.B = Bc.data_ptr();
  args.out = out.data_ptr();
  args.t = t.data_ptr<float>();
  args.n = x.size(0);
  args.d_in = x.size(1);
  args.d_out = out.size(1);
  args.r = t.size(1);
  args.scale = static_cast<float>(scale);
  args.dropout = dropout_args(seedc, p);
  return args;
}

// Kernel arguments of a backward; an output not asked for is passed as nullptr.
cuda::BwdArgs bwd_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                       const at::Tensor& Ac, const at::Tensor& Bc, const at::Tensor& dx,
                       const at::Tensor& dA, const at::Tensor& dB, const at::Tensor& workspace,
                       double scale, double p, const at::Tensor& seedc, bool need_dx, bool need_dA,
                       bool need_dB) {
  cuda::BwdArgs args{};
  args.act = dtype_of(x);
  args.weights_fp32 = Ac.scalar_type() == at::kFloat;
  args.grad = grad.data_ptr();
  args.ldg = grad.stride(0);
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.t = t.data_ptr<float>();
  args.A = Ac.data_ptr();
  args.B = Bc.data_ptr();
  args.dx = need_dx ? dx.data_ptr() : nullptr;
  args.dA = need_dA ? dA.data_ptr() : nullptr;
  args.dB = need_dB ? dB.data_ptr() : nullptr;
  args.workspace = workspace.data_ptr<float>();
  args.n = x.size(0);
  args.d_in = x.size(1);
  args.d_out = grad.size(1);
  args.r = t.size(1);
  args.scale = static_cast<float>(scale);
  args.need_dx = need_dx;
  args.need_dA = need_dA;
  args.need_dB = need_dB;
  args.dropout = dropout_args(seedc, p);
  return args;
}

at::Tensor workspace_for(const cuda::BwdPlan& plan, const at::Tensor& x) {
  return at::empty({plan.u_elems + plan.dB_ws_elems + plan.dA_ws_elems},
                   x.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> lor2c_fwd_cuda(const at::Tensor& x, const at::Tensor& layer_out,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  double scale, double p, const at::Tensor& seed) {
  const at::Device device = check_fwd(x, layer_out, A, B, seed, p);
  check_device(A, "A", device);
  check_device(B, "B", device);
  const c10::cuda::CUDAGuard guard(device);

  const int64_t n = x.size(0), d_out = B.size(0), r = A.size(0);
  at::Tensor out = at::empty({n, d_out}, layer_out.options());
  at::Tensor t = at::empty({n, r}, x.options().dtype(at::kFloat));
  if (n == 0) return {out, t};
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous(), seedc = seed.contiguous();
  check_launch(cuda::lor2c_fwd_launch(fwd_args(x, layer_out, Ac, Bc, out, t, scale, p, seedc),
                                      device_info(), at::cuda::getCurrentCUDAStream()),
               "lor2c_fwd_launch");
  return {out, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lor2c_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A,
    const at::Tensor& B, double scale, double p, const at::Tensor& seed, bool need_dx, bool need_dA,
    bool need_dB) {
  const at::Device device = check_bwd(grad, x, t, A, B, seed, p);
  check_device(A, "A", device);
  check_device(B, "B", device);
  const c10::cuda::CUDAGuard guard(device);

  const int64_t n = x.size(0), d_in = x.size(1), d_out = B.size(0), r = A.size(0);
  at::Tensor dx = need_dx ? at::empty({n, d_in}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = need_dA ? at::empty({r, d_in}, A.options()) : at::empty({0}, A.options());
  at::Tensor dB = need_dB ? at::empty({d_out, r}, B.options()) : at::empty({0}, B.options());
  if (!need_dx && !need_dA && !need_dB) return {dx, dA, dB};

  const cuda::DeviceInfo info = device_info();
  const cuda::BwdPlan plan =
      cuda::lor2c_bwd_plan(n, d_in, d_out, r, need_dx, need_dA, need_dB, info);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous(), seedc = seed.contiguous();
  const at::Tensor workspace = workspace_for(plan, x);
  check_launch(cuda::lor2c_bwd_launch(bwd_args(grad, x, t, Ac, Bc, dx, dA, dB, workspace, scale, p,
                                               seedc, need_dx, need_dA, need_dB),
                                      plan, info, at::cuda::getCurrentCUDAStream()),
               "lor2c_bwd_launch");
  return {dx, dA, dB};
}

// ---- multi-adapter batches ------------------------------------------------------------------
// Banks checked as on the CPU (check_banks, lor2c_common.h); the values of ids are not checked
// here: that would read them back to the host. The kernels treat an id outside [-1, G) like -1 and
// never index past the banks; lor2c_ops.lor2c_residual validates the ids before calling.

// The row order of a multi-adapter call, on the device: ids sorted stably (so the order, and
// with it every reduction order, is a function of the ids alone) and the plan buffer that the
// launchers fill from them. Keeps the tensors alive until the launch is enqueued; the caching
// allocator keeps their memory for the stream's pending work after that.
struct MultiRows {
  at::Tensor sorted, order, plan;
  cuda::MultiArgs args(int64_t G) {
    return {sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), G, plan.data_ptr<int64_t>()};
  }
};

MultiRows sort_rows(const at::Tensor& ids, int64_t G) {
  auto sorted = at::sort(ids.to(at::kLong).contiguous(), /*stable=*/true, /*dim=*/0,
                         /*descending=*/false);
  at::Tensor plan = at::empty({cuda::lor2c_multi_plan_elems(G)}, ids.options().dtype(at::kLong));
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous(), plan};
}

std::tuple<at::Tensor, at::Tensor> lor2c_multi_fwd_cuda(const at::Tensor& x,
                                                        const at::Tensor& layer_out,
                                                        const at::Tensor& A_bank,
                                                        const at::Tensor& B_bank,
                                                        const at::Tensor& ids, double scale,
                                                        double p, const at::Tensor& seed) {
  check_cuda(x);
  check_banks(A_bank, B_bank, ids, x.size(0));
  const at::Device device = check_fwd(x, layer_out, A_bank[0], B_bank[0], seed, p);
  check_device(A_bank, "A_bank", device);
  check_device(B_bank, "B_bank", device);
  check_device(ids, "adapter_ids", device);
  const c10::cuda::CUDAGuard guard(device);

  const int64_t n = x.size(0), d_out = B_bank.size(1), r = A_bank.size(1), G = A_bank.size(0);
  at::Tensor out = at::empty({n, d_out}, layer_out.options());
  at::Tensor t = at::empty({n, r}, x.options().dtype(at::kFloat));
  if (n == 0) return {out, t};
  const at::Tensor Ac = A_bank.contiguous(), Bc = B_bank.contiguous(), seedc = seed.contiguous();
  MultiRows rows = sort_rows(ids, G);
  check_launch(
      cuda::lor2c_multi_fwd_launch(fwd_args(x, layer_out, Ac, Bc, out, t, scale, p, seedc),
                                   rows.args(G), device_info(), at::cuda::getCurrentCUDAStream()),
      "lor2c_multi_fwd_launch");
  return {out, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lor2c_multi_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const at::Tensor& ids, double scale, double p, const at::Tensor& seed,
    bool need_dx, bool need_dA, bool need_dB) {
  check_cuda(x);
  check_banks(A_bank, B_bank, ids, x.size(0));
  const at::Device device = check_bwd(grad, x, t, A_bank[0], B_bank[0], seed, p);
  check_device(A_bank, "A_bank", device);
  check_device(B_bank, "B_bank", device);
  check_device(ids, "adapter_ids", device);
  const c10::cuda::CUDAGuard guard(device);

  const int64_t n = x.size(0), d_in = x.size(1), d_out = B_bank.size(1), r = A_bank.size(1);
  const int64_t G = A_bank.size(0);
  at::Tensor dx = need_dx ? at::empty({n, d_in}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA =
      need_dA ? at::empty({G, r, d_in}, A_bank.options()) : at::empty({0}, A_bank.options());
  at::Tensor dB =
      need_dB ? at::empty({G, d_out, r}, B_bank.options()) : at::empty({0}, B_bank.options());
  if (!need_dx && !need_dA && !need_dB) return {dx, dA, dB};

  const cuda::DeviceInfo info = device_info();
  const cuda::BwdPlan plan =
      cuda::lor2c_multi_bwd_plan(n, d_in, d_out, r, G, need_dx, need_dA, need_dB, info);
  const at::Tensor Ac = A_bank.contiguous(), Bc = B_bank.contiguous(), seedc = seed.contiguous();
  const at::Tensor workspace = workspace_for(plan, x);
  MultiRows rows = sort_rows(ids, G);
  check_launch(
      cuda::lor2c_multi_bwd_launch(bwd_args(grad, x, t, Ac, Bc, dx, dA, dB, workspace, scale, p,
                                            seedc, need_dx, need_dA, need_dB),
                                   rows.args(G), plan, info, at::cuda::getCurrentCUDAStream()),
      "lor2c_multi_bwd_launch");
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lor2c_ops_ext, CUDA, m) {
  m.impl("lor2c_fwd", &lor2c_fwd_cuda);
  m.impl("lor2c_bwd", &lor2c_bwd_cuda);
  m.impl("lor2c_multi_fwd", &lor2c_multi_fwd_cuda);
  m.impl("lor2c_multi_bwd", &lor2c_multi_bwd_cuda);
}

}  // namespace lor2c
