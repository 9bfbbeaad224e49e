// The rank-r products of the LoR2C CPU kernels on a block of kRows fp32 rows: small matrix
// multiplies with one side r x d (the weights, L1/L2-resident) and the other kRows x d (the
// rows of the block, L1-resident), computed with register tiles so that each loaded vector
// feeds several multiply-adds (csrc/cpu/rank_products.cpp). Compiled per instruction-set path
// (csrc/cpu/isa.h). `rows`, `base` and `out` hold kRows row pointers, of which the first `used`
// (1..kRows) are the block's: the others are read as rows of zeros or not at all, and their
// results are not written or left unspecified (out rows past `used` may be scratch); coef is
// kRows x r, row-major.
#pragma once
#include <cstdint>

namespace lor2c {
namespace cpu {

// out[b * r + k] = sum_j M[k * d + j] * rows[b][j]   (t = x A.T, u = g B)
void dot_rows(const float* M, int64_t r, int64_t d, const float* const* rows, int used, float* out);

// out[b][j] = (base ? base[b][j] : 0) + sum_k coef[b * r + k] * M[k * d + j]   (y, dx)
void combine_rows(const float* M, int64_t r, int64_t d, const float* coef, const float* const* base,
                  int used, float* const* out);

// P[k * d + j] += sum_b coef[b * r + k] * rows[b][j]   (dA, dB.T partial sums)
void accumulate_outer(float* P, int64_t r, int64_t d, const float* coef, const float* const* rows,
                      int used);

}  // namespace cpu
}  // namespace lor2c
