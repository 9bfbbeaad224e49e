// Host-side helpers shared by the CPU and CUDA bindings of the LoR2C residual op.
// (Written once here: the bindings add only what is their own, e.g. devices on CUDA.)
#pragma once
#include <ATen/ATen.h>

#include "philox.h"

namespace lor2c {

// Decodes the op's seed tensor values (int64[2] = seed, offset) and p into kernel parameters,
// with the threshold and seed decoding of csrc/philox.h. Reading the seed needs it on the CPU;
// the CUDA bindings pass seed = offset = 0 (threshold and 1/(1-p) only) and the pointer to the
// kernels, which decode it on the device with dropout_seed.
inline DropoutParams dropout_params(double p, int64_t seed, int64_t offset) {
  DropoutParams dp{};
  dp.enabled = p > 0.0;
  dropout_seed(dp, seed, offset);
  dp.threshold = dropout_threshold(p);
  dp.inv_keep = dp.enabled ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  return dp;
}

// dropout_params of the seed tensor read on the host: the CPU entry points (LoR2C and DCFT). A
// seed on another device is copied to the CPU first.
inline DropoutParams host_dropout_params(const at::Tensor& seed, double p) {
  const at::Tensor s = seed.is_cpu() ? seed : seed.to(at::kCPU);
  return dropout_params(p, s.data_ptr<int64_t>()[0], s.data_ptr<int64_t>()[1]);
}

inline void check_rows(const at::Tensor& t, const char* name, int64_t n, int64_t d) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == d, name, ": expected shape (", n, ", ",
              d, "), got ", t.sizes());
  TORCH_CHECK(d <= 1 || t.stride(1) == 1, name, ": expected unit stride along the last dimension");
}

// Weight banks of a multi-adapter call and its per-row adapter ids (values checked elsewhere).
inline void check_banks(const at::Tensor& A_bank, const at::Tensor& B_bank, const at::Tensor& ids,
                        int64_t n) {
  TORCH_CHECK(A_bank.dim() == 3 && B_bank.dim() == 3 && A_bank.size(0) == B_bank.size(0),
              "A_bank, B_bank: expected (G, r, d_in) and (G, d_out, r) banks, got ", A_bank.sizes(),
              " and ", B_bank.sizes());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n &&
                  (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt),
              "adapter_ids: expected an int64 or int32 tensor of shape (", n, ")");
}

inline void check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D (n, d_in) tensor, got ", x.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "A: expected shape (r, ", x.size(1),
              "), got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(1) == A.size(0), "B: expected shape (d_out, ", A.size(0),
              "), got ", B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "A and B: expected one dtype, got ",
              A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK(A.scalar_type() == x.scalar_type() || A.scalar_type() == at::kFloat,
              "A: expected dtype ", x.scalar_type(), " (as x) or float32, got ", A.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2,
              "seed: expected an int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected 0 <= p < 1, got ", p);
  TORCH_CHECK(x.size(0) < (int64_t{1} << 32), "x: more than 2^32 rows is not supported");
}

// The checks of a forward: 2-D x (n, d_in), layer_out (n, d_out) in x's dtype, one adapter's A
// (r, d_in) and B (d_out, r) (a bank's row 0 for a multi-adapter call), the seed and p. Devices
// are the caller's (the CUDA bindings check them after these).
inline void check_forward(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& seed, double p) {
  check_common(x, A, B, seed, p);
  check_rows(x, "x", x.size(0), x.size(1));
  check_rows(layer_out, "layer_out", x.size(0), B.size(0));
  TORCH_CHECK(layer_out.scalar_type() == x.scalar_type(), "layer_out: expected dtype ",
              x.scalar_type(), ", got ", layer_out.scalar_type());
}

// The same for a backward, with grad (n, d_out) and t (n, r) fp32 from the forward.
inline void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& seed,
                           double p) {
  check_common(x, A, B, seed, p);
  check_rows(x, "x", x.size(0), x.size(1));
  check_rows(grad, "grad", x.size(0), B.size(0));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad: expected dtype ", x.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == x.size(0) && t.size(1) == A.size(0),
              "t: expected a contiguous float32 (", x.size(0), ", ", A.size(0), ") tensor");
}

}  // namespace lor2c
