// The rank-r products of the LoR2C CPU kernels for bfloat16 activations on CPUs that multiply
// bf16 natively (AVX512-BF16: vdpbf16ps, two bf16 products summed into each fp32 lane, twice
// the multiply-adds of an fp32 FMA per instruction). The same three products as
// rank_products.h, with bf16 operands and fp32 sums, as the eager expression computes them in
// bf16 (its operands are bf16 tensors): each product's fp32 operand (t, u and their scaled
// copies) is rounded to bf16 once, where eager rounds it as a tensor (csrc/cpu/bf16_products.cpp).
//
// vdpbf16ps sums pairs of adjacent bf16 elements, so each product is fed pairs along its
// reduction: dot_rows along d (consecutive columns of a row), combine_rows along the ranks (the
// weights packed as rank pairs, pack_rank_pairs), accumulate_outer along the rows (row pairs
// interleaved, interleave_rows). A pair is one uint32: the first element in the low half.
// pf: lines to bring into L2 as the tiles run (rank_products.h), paced as the fp32 kernels'.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "rank_products.h"  // Prefetch

namespace lor2c {
namespace cpu {

// Whether the bf16 kernels run for bfloat16 activations: the AVX-512 path is in use, the CPU has
// AVX512-BF16, and LOR2C_CPU_BF16_DOT (read once) is not 0. bf16_dot_missing(): why not, or
// nullptr.
bool bf16_dot();
const char* bf16_dot_missing();

// The pair (lo, hi) of bf16 values rounded from fp32 as torch rounds (c10::BFloat16: to nearest
// even, a NaN to 0x7FC0).
inline uint32_t bf16_pair(float lo, float hi) {
  return uint32_t{c10::BFloat16(lo).x} | (uint32_t{c10::BFloat16(hi).x} << 16);
}

// The row stride, in elements, of the weight, row-pair and scratch-row buffers the bf16 kernels
// lay out themselves for rows of d elements: d, padded by 32 elements (64 or 128 bytes) where d
// is a multiple of 512. Rows a multiple of 1 KB apart map to the same few L1 sets, and a tile
// reading a dozen such rows at once evicts its own lines (measured, dot_rows at d = 4096, rank
// 64, one Zen 4 core: 124 GFLOP/s with A's rows 8 KB apart, 150 with them 64 bytes further
// apart; the whole op, n=2048: forward 14.4-14.8 -> 13.4-13.6 ms). The fp32 kernels were tried
// the same way (weights, scratch rows) and did not gain measurably: they keep the caller's A.
inline int64_t bf16_row_stride(int64_t d) { return d % 512 == 0 ? d + 32 : d; }

// out[b * r + k] = sum_j M[k * ldm + j] * rows[b][j]   (t = xd A.T, u = g B), b < used; M is
// r x d bf16 (row stride ldm), rows[0..used) are bf16 rows of d elements.
void dot_rows_bf16(const uint16_t* M, int64_t ldm, int64_t r, int64_t d,
                   const uint16_t* const* rows, int used, float* out, Prefetch* pf = nullptr);

// out[b][j] = bf16(((base ? base[b][j] : 0) + sum_k coef_k(b) * M[k][j]) * (mul ? mul[b][j] :
// 1)), b < used (y; dx, with mul the dropout mask): base and out are bf16 rows, the sum is fp32
// and rounded once, as c10 rounds. Mp: M's rank pairs, pack_rank_pairs' layout (row stride ldm);
// cp[b * ((r + 1) / 2) + k / 2]: the pair (coef[b][k], coef[b][k + 1]) (0 past r).
void combine_rows_bf16(const uint32_t* Mp, int64_t ldm, int64_t r, int64_t d, const uint32_t* cp,
                       const uint16_t* const* base, const float* const* mul, int used,
                       uint16_t* const* out, Prefetch* pf = nullptr);

// P[k * d + j] += sum_b coef[b][k] * rows[b][j]   (dA, dB.T partial sums) over `pairs` row
// pairs: Rp[q][j] is the pair (rows[2q][j], rows[2q + 1][j]) (interleave_rows), cp[q * r + k]
// the pair (coef[2q][k], coef[2q + 1][k]).
void accumulate_outer_bf16(float* P, int64_t r, int64_t d, const uint32_t* cp,
                           const uint32_t* const* Rp, int pairs, Prefetch* pf = nullptr);

// out[j] = bf16(float(x[j]) * mask[j]) for j < d, rounded as c10 rounds: dropout(x) in bf16 in one
// pass (x bf16, the mask row fp32, csrc/cpu/dropout.h), as eager's bf16 x * mask is rounded.
void dropout_bf16(const uint16_t* x, const float* mask, int64_t d, uint16_t* out);

// Mp[(k / 2) * ldp + j] = (M[k][j], M[k + 1][j]) for the (r + 1) / 2 rank pairs of an r x d
// bf16 matrix (rows of d; the second of an odd r's last pair is 0).
void pack_rank_pairs(const uint16_t* M, int64_t r, int64_t d, uint32_t* Mp, int64_t ldp);

// out[j] = (a[j], b ? b[j] : 0) for j < d.
void interleave_rows(const uint16_t* a, const uint16_t* b, int64_t d, uint32_t* out);

}  // namespace cpu
}  // namespace lor2c
