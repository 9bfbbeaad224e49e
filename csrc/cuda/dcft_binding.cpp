// ATen glue of the DCFT CUDA kernels (csrc/cuda/dcft.cu): checks, the expanded factors, the
// launches, the base linear's GEMMs (accumulated onto the kernels' outputs, beta = 1), and the
// reduction and folding of the weight-gradient partials. The argument checks are the CPU entry
// point's (../dcft_common.h); the dtype mapping, dropout arguments, device checks and
// launch-error check are binding_common.h's, shared with the LoR2C binding.
// Compiled only into CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>

#include "../dcft_common.h"
#include "binding_common.h"
#include "dcft_kernels.h"

namespace lor2c {
namespace {

using cuda::check_cuda;
using cuda::check_device;
using cuda::check_launch;
using cuda::device_info;
using cuda::dropout_args;
using cuda::DropoutArgs;
using cuda::dtype_of;

// Every tensor of a call on x's device, x a CUDA tensor.
void check_devices(const at::Tensor& x,
                   std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  check_cuda(x);
  for (const auto& [name, t] : others) check_device(*t, name, x.device());
}

// (k, m) int64 on `options`' device: [a, p] = p * stride + a.
at::Tensor window_index(int64_t m, int64_t k, int64_t stride, const at::TensorOptions& options) {
  const at::TensorOptions opt = options.dtype(at::kLong);
  return at::arange(m, opt).mul(stride).unsqueeze(0) + at::arange(k, opt).unsqueeze(1);
}

// F (r, m) -> (r * k, d) float32 with [j * k + a, p * stride + a] = F[j, p], zero elsewhere.
at::Tensor expand(const at::Tensor& F, int64_t k, int64_t stride, int64_t d) {
  const int64_t r = F.size(0), m = F.size(1);
  const at::Tensor idx =
      window_index(m, k, stride, F.options()).unsqueeze(0).expand({r, k, m}).contiguous();
  at::Tensor out = at::zeros({r, k, d}, F.options().dtype(at::kFloat));
  out.scatter_(2, idx, F.to(at::kFloat).unsqueeze(1).expand({r, k, m}).contiguous());
  return out.view({r * k, d});
}

// The adjoint of expand: (r * k, d) -> (r, m), [j, p] = sum_a P[j * k + a, p * stride + a].
at::Tensor fold(const at::Tensor& P, int64_t r, int64_t k, int64_t stride, int64_t m) {
  const at::Tensor idx =
      window_index(m, k, stride, P.options()).unsqueeze(0).expand({r, k, m}).contiguous();
  return P.view({r, k, P.size(1)}).gather(2, idx).sum(1);
}

// kron(I_r, C) as float32, contiguous: [(j, a), (j, b)] = C[a, b].
at::Tensor core(const at::Tensor& C, int64_t r) {
  return at::kron(at::eye(r, C.options().dtype(at::kFloat)), C.to(at::kFloat)).contiguous();
}

struct Splits {
  int64_t count, rows;
};

// Row splits for outer_partials: enough blocks to fill the device, at most 65535 splits.
Splits outer_splits(int64_t n, int64_t d) {
  const int64_t sms = device_info().num_sms;
  const int64_t columns = cuda::dcft_outer_column_blocks(d);
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + columns - 1) / columns);
  const int64_t count = std::min<int64_t>({wanted, std::max<int64_t>(n, 1), 65535});
  const int64_t rows = (n + count - 1) / count;  // n >= 1 here
  return {(n + rows - 1) / rows, rows};
}

// sum over rows of coef[i, :] (x) rows[i, :] * mask: (rk, d) float32.
at::Tensor outer(const at::Tensor& rows, const at::Tensor& coef, int64_t rk, const DropoutArgs& dp,
                 cudaStream_t stream) {
  const int64_t n = rows.size(0), d = rows.size(1);
  const Splits s = outer_splits(n, d);
  at::Tensor P = at::empty({s.count, rk, d}, rows.options().dtype(at::kFloat));
  check_launch(cuda::dcft_outer_partials(dtype_of(rows), rows.data_ptr(), rows.stride(0),
                                         coef.data_ptr<float>(), P.data_ptr<float>(), n, d, rk,
                                         s.count, s.rows, dp, stream),
               "dcft_outer_partials");
  return P.sum(0);
}

std::tuple<at::Tensor, at::Tensor> dcft_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& A, const at::Tensor& B,
                                                 const at::Tensor& C, double scale, int64_t stride,
                                                 double p, const at::Tensor& seed) {
  const DcftSizes z = check_dcft(x, weight, bias, A, B, C, stride, seed, p);
  const bool has_bias = bias.has_value() && bias->defined();
  check_devices(x, {{"weight", &weight}, {"A", &A}, {"B", &B}, {"C", &C}, {"seed", &seed}});
  if (has_bias) check_devices(x, {{"bias", &*bias}});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rk = z.r * z.k;
  TORCH_CHECK(rk <= cuda::kDcftMaxRank, "cuda backend: r * k <= ", cuda::kDcftMaxRank,
              " supported, got ", rk);
  at::Tensor out = at::empty({z.n, z.d_out}, x.options());
  at::Tensor t = at::empty({z.n, rk}, x.options().dtype(at::kFloat));
  if (z.n == 0) return {out, t};
  const at::Tensor Ae = expand(A, z.k, z.stride, z.d_in);
  const at::Tensor Be = expand(B.t(), z.k, z.stride, z.d_out);
  const at::Tensor Ck = core(C, z.r);
  const at::Tensor biasf = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor seedc = seed.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(
      cuda::dcft_forward_rows(dtype_of(x), x.data_ptr(), x.stride(0),
                              has_bias ? biasf.data_ptr<float>() : nullptr, Ae.data_ptr<float>(),
                              Ck.data_ptr<float>(), Be.data_ptr<float>(), out.data_ptr(),
                              t.data_ptr<float>(), z.n, z.d_in, z.d_out, rk,
                              static_cast<float>(scale), dropout_args(seedc, p), stream),
      "dcft_forward_rows");
  out.addmm_(x, weight.t());  // + x @ W.T, accumulated onto bias + s * dropout(x) @ D
  return {out, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcft_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
    double p, const at::Tensor& seed, bool need_dx, bool need_dA, bool need_dB, bool need_dC) {
  const DcftSizes z = check_dcft(x, weight, std::nullopt, A, B, C, stride, seed, p);
  check_grad(grad, x, z);
  check_saved_t(t, z);
  check_devices(x, {{"grad", &grad},
                    {"t", &t},
                    {"weight", &weight},
                    {"A", &A},
                    {"B", &B},
                    {"C", &C},
                    {"seed", &seed}});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rk = z.r * z.k;
  TORCH_CHECK(rk <= cuda::kDcftMaxRank, "cuda backend: r * k <= ", cuda::kDcftMaxRank,
              " supported, got ", rk);
  at::Tensor dx = need_dx ? at::empty({z.n, z.d_in}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = at::empty({0}, A.options()), dB = at::empty({0}, B.options());
  at::Tensor dC = at::empty({0}, C.options());
  if (z.n == 0) {
    if (need_dA) dA = at::zeros_like(A);
    if (need_dB) dB = at::zeros_like(B);
    if (need_dC) dC = at::zeros_like(C);
    return {dx, dA, dB, dC};
  }
  if (!(need_dx || need_dA || need_dB || need_dC)) return {dx, dA, dB, dC};
  const at::Tensor Ae = expand(A, z.k, z.stride, z.d_in);
  const at::Tensor Be = expand(B.t(), z.k, z.stride, z.d_out);
  const at::Tensor Ck = core(C, z.r);
  const at::Tensor seedc = seed.contiguous();
  const DropoutArgs dp = dropout_args(seedc, p);
  const DropoutArgs no_dropout{dp.seed, 0u, 1.0f, false};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float s = static_cast<float>(scale);

  // V = g @ Be.T, dT = s * V @ Ck.T and dx = (dT @ Ae) * mask, row by row.
  at::Tensor V = at::empty({z.n, rk}, x.options().dtype(at::kFloat));
  at::Tensor dT = at::empty({z.n, rk}, x.options().dtype(at::kFloat));
  check_launch(
      cuda::dcft_backward_rows(dtype_of(x), grad.data_ptr(), grad.stride(0), Ae.data_ptr<float>(),
                               Ck.data_ptr<float>(), Be.data_ptr<float>(), V.data_ptr<float>(),
                               dT.data_ptr<float>(), need_dx ? dx.data_ptr() : nullptr, z.n, z.d_in,
                               z.d_out, rk, s, dp, stream),
      "dcft_backward_rows");
  if (need_dA)  // dA = fold(dT.T @ dropout(x))
    dA = fold(outer(x, dT, rk, dp, stream), z.r, z.k, z.stride, z.m_in).to(A.scalar_type());
  if (need_dB) {  // dB = s * fold(U.T @ g), U = T @ Ck
    const at::Tensor U = at::mm(t, Ck);
    dB = (fold(outer(grad, U, rk, no_dropout, stream), z.r, z.k, z.stride, z.m_out) * s)
             .t()
             .contiguous()
             .to(B.scalar_type());
  }
  if (need_dC)  // dC = s * sum over rows and ranks of T.T V
    dC = (at::einsum("nja,njb->ab", {t.view({z.n, z.r, z.k}), V.view({z.n, z.r, z.k})}) * s)
             .contiguous()
             .to(C.scalar_type());
  if (need_dx) dx.addmm_(grad, weight);  // + g @ W, accumulated onto the adapter's dx
  return {dx, dA, dB, dC};
}

}  // namespace

TORCH_LIBRARY_IMPL(lor2c_ops_ext, CUDA, m) {
  m.impl("dcft_fwd", &dcft_fwd_cuda);
  m.impl("dcft_bwd", &dcft_bwd_cuda);
}

}  // namespace lor2c
