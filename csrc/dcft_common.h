// Host-side argument checks shared by the CPU and CUDA bindings of the DCFT op
// (docs/math.md section 4).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lor2c {

// Sizes of one call: x (n, d_in), weight (d_out, d_in), A (r, m_in), B (m_out, r), C (k, k),
// d_in = (m_in - 1) * stride + k, d_out = (m_out - 1) * stride + k.
struct DcftSizes {
  int64_t n, d_in, d_out, r, k, stride, m_in, m_out;
};

inline DcftSizes check_dcft(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, int64_t stride,
                            const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D (n, d_in) tensor, got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1,
              "x: expected unit stride along the last dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight: expected shape (d_out, ",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
              " (as x), got ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ", x.scalar_type(),
                " (as x), got ", bias->scalar_type());
  }
  TORCH_CHECK(C.dim() == 2 && C.size(0) == C.size(1) && C.size(0) >= 1,
              "C: expected a square (k, k) tensor, got ", C.sizes());
  const int64_t k = C.size(0);
  TORCH_CHECK(stride >= 1 && stride <= k, "stride: expected 1 <= stride <= k = ", k, ", got ",
              stride);
  TORCH_CHECK(A.dim() == 2 && A.size(0) >= 1 && A.size(1) >= 1,
              "A: expected a non-empty (r, m_in) tensor, got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(1) == A.size(0) && B.size(0) >= 1,
              "B: expected shape (m_out, ", A.size(0), "), got ", B.sizes());
  const int64_t m_in = A.size(1), m_out = B.size(0);
  TORCH_CHECK(x.size(1) == (m_in - 1) * stride + k, "A: expected d_in = (m_in - 1) * stride + k, ",
              "got d_in = ", x.size(1), ", m_in = ", m_in, ", stride = ", stride, ", k = ", k);
  TORCH_CHECK(weight.size(0) == (m_out - 1) * stride + k,
              "B: expected d_out = (m_out - 1) * stride + k, got d_out = ", weight.size(0),
              ", m_out = ", m_out, ", stride = ", stride, ", k = ", k);
  TORCH_CHECK(A.scalar_type() == B.scalar_type() && A.scalar_type() == C.scalar_type(),
              "A, B and C: expected one dtype, got ", A.scalar_type(), ", ", B.scalar_type(),
              " and ", C.scalar_type());
  TORCH_CHECK(A.scalar_type() == x.scalar_type() || A.scalar_type() == at::kFloat,
              "A: expected dtype ", x.scalar_type(), " (as x) or float32, got ", A.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2,
              "seed: expected an int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected 0 <= p < 1, got ", p);
  TORCH_CHECK(x.size(0) < (int64_t{1} << 32), "x: more than 2^32 rows is not supported");
  return {x.size(0), x.size(1), weight.size(0), A.size(0), k, stride, m_in, m_out};
}

// The saved activation of the forward: float32 (n, r * k), contiguous.
inline void check_saved_t(const at::Tensor& t, const DcftSizes& s) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == s.n && t.size(1) == s.r * s.k,
              "t: expected a contiguous float32 (", s.n, ", ", s.r * s.k, ") tensor");
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& x, const DcftSizes& s) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == s.n && grad.size(1) == s.d_out,
              "grad: expected shape (", s.n, ", ", s.d_out, "), got ", grad.sizes());
  TORCH_CHECK(s.d_out <= 1 || grad.stride(1) == 1,
              "grad: expected unit stride along the last dimension");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad: expected dtype ", x.scalar_type(),
              ", got ", grad.scalar_type());
}

}  // namespace lor2c
