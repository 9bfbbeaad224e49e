// Launchers of the DCFT CUDA kernels (csrc/cuda/dcft.cu): raw pointers, no torch types, so the
// kernels compile with nvcc alone; csrc/cuda/dcft_binding.cpp is the ATen glue. DType and
// DropoutArgs are those of the LoR2C kernels (common.h).
//
// Decomposition (as the Triton backend): D = Ae.T @ Ck @ Be with the expanded factors
// Ae[(j, a), p * st + a] = A[j, p] (rk x d_in), Be[(j, b), q * st + b] = B[q, j] (rk x d_out),
// Ck = kron(I_r, C) (rk x rk), rk = r * k; all float32, contiguous, built by the binding.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace lor2c {
namespace cuda {

// Rows of x (n, d_in, row stride ldx): T = dropout(x) @ Ae.T -> T (n, rk), and
// out = bias + scale * (T @ Ck) @ Be -> out (n, d_out, contiguous). bias: float32 or null.
cudaError_t dcft_forward_rows(DType act, const void* x, int64_t ldx, const float* bias,
                              const float* Ae, const float* Ck, const float* Be, void* out,
                              float* T, int64_t n, int64_t d_in, int64_t d_out, int64_t rk,
                              float scale, DropoutArgs dp, cudaStream_t stream);

// Rows of g (n, d_out, row stride ldg): V = g @ Be.T -> V (n, rk); dT = scale * V @ Ck.T ->
// dT (n, rk); if dx is not null, dx = (dT @ Ae) * mask -> dx (n, d_in, contiguous).
cudaError_t dcft_backward_rows(DType act, const void* g, int64_t ldg, const float* Ae,
                               const float* Ck, const float* Be, float* V, float* dT, void* dx,
                               int64_t n, int64_t d_in, int64_t d_out, int64_t rk, float scale,
                               DropoutArgs dp, cudaStream_t stream);

// Weight-gradient partial sums: P[s, R, c] = sum over rows i of split s of
// coef[i, R] * rows[i, c] * mask[i, c] (mask = 1 unless dp.enabled), for splits of
// rows_per_split rows. rows (n, d, row stride ld); coef (n, rk); P (splits, rk, d).
cudaError_t dcft_outer_partials(DType act, const void* rows, int64_t ld, const float* coef,
                                float* P, int64_t n, int64_t d, int64_t rk, int64_t splits,
                                int64_t rows_per_split, DropoutArgs dp, cudaStream_t stream);

// Thread blocks across the columns of one split in dcft_outer_partials (for choosing splits).
int64_t dcft_outer_column_blocks(int64_t d);

// The largest rk the row kernels support (their shared memory holds 2 * 4 * rk floats per warp).
constexpr int64_t kDcftMaxRank = 1536;

}  // namespace cuda
}  // namespace lor2c
