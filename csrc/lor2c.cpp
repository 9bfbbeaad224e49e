// Schemas of the LoR2C residual kernels (docs/math.md section 1), defined once for every device.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // x (n, d_in), layer_out (n, d_out): rows of any stride, unit column stride.
  // A (r, d_in), B (d_out, r); seed int64[2] = (seed, offset) on x's device.
  // Returns out = layer_out + scale * dropout(x) @ A.T @ B.T and t = dropout(x) @ A.T (fp32).
  m.def(
      "lor2c_fwd(Tensor x, Tensor layer_out, Tensor A, Tensor B, float scale, float p, "
      "Tensor seed) -> (Tensor, Tensor)");
  // Returns (dx, dA, dB); an output not asked for is an empty tensor.
  m.def(
      "lor2c_bwd(Tensor grad, Tensor x, Tensor t, Tensor A, Tensor B, float scale, float p, "
      "Tensor seed, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)");
  // Multi-adapter batches: row i uses A_bank[ids[i]] (r, d_in) and B_bank[ids[i]] (d_out, r);
  // ids[i] == -1 gives out = layer_out and no gradient. dA, dB come back bank-shaped.
  m.def(
      "lor2c_multi_fwd(Tensor x, Tensor layer_out, Tensor A_bank, Tensor B_bank, Tensor ids, "
      "float scale, float p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "lor2c_multi_bwd(Tensor grad, Tensor x, Tensor t, Tensor A_bank, Tensor B_bank, "
      "Tensor ids, float scale, float p, Tensor seed, bool need_dx, bool need_dA, "
      "bool need_dB) -> (Tensor, Tensor, Tensor)");
}
