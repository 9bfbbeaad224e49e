// Schemas of the DCFT kernels (docs/math.md section 4), defined once for every device.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // x (n, d_in): rows of any stride, unit column stride. weight (d_out, d_in), bias (d_out,) or
  // None, both in x's dtype. A (r, m_in), B (m_out, r), C (k, k), in x's dtype or float32, with
  // d_in = (m_in - 1) * stride + k, d_out = (m_out - 1) * stride + k, 1 <= stride <= k.
  // seed int64[2] = (seed, offset) on x's device; dropout applies to x on the adapter path only.
  // Returns out = x @ weight.T + bias + scale * dropout(x) @ D, where
  // D = conv_transpose2d(A.T @ B.T, C, stride) is never formed (the kernel writes
  // bias + scale * dropout(x) @ D into out and the GEMM accumulates x @ weight.T onto it), and
  // t = A @ windows(dropout(x)) as float32 (n, r * k), index j * k + a, saved for backward.
  m.def(
      "dcft_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor C, "
      "float scale, int stride, float p, Tensor seed) -> (Tensor, Tensor)");
  // Returns (dx, dA, dB, dC) for the output gradient `grad` (n, d_out); dx includes the base
  // linear's grad @ weight. An output not asked for is an empty tensor.
  m.def(
      "dcft_bwd(Tensor grad, Tensor x, Tensor t, Tensor weight, Tensor A, Tensor B, Tensor C, "
      "float scale, int stride, float p, Tensor seed, bool need_dx, bool need_dA, "
      "bool need_dB, bool need_dC) -> (Tensor, Tensor, Tensor, Tensor)");
}
