// bf16 rank products with AVX512-BF16 (csrc/cpu/bf16_products.h).
//
// Register tiles as in rank_products.cpp, each vdpbf16ps doing 32 multiply-adds (16 fp32 lanes,
// a pair each): dot_rows 8 rows x 2 ranks (16 accumulators, summed at the end by one shuffle
// tree, lane_sums.h), combine_rows 8 rows x 3 vectors of 16 columns (24 accumulators; per rank
// pair 3 loads and 8 broadcasts), accumulate_outer 4 ranks x 5 vectors of 16 columns (20
// accumulators; per row pair 5 loads and 4 broadcasts). Column tails are masked loads and stores
// (AVX-512 BW), so any d runs without a scalar loop; dot_rows takes rows over 1024 columns in
// chunks (kDotChunk). Every tile prefetches its share of the lines in pf (PrefetchLines,
// rank_products.h), as the fp32 tiles do.
#include "bf16_products.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "isa.h"
#include "lane_sums.h"

#if defined(LOR2C_X86)
#include <immintrin.h>
#define LOR2C_TARGET_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#endif

namespace lor2c {
namespace cpu {

#if defined(LOR2C_X86)
namespace {

constexpr int kDotMR = 8, kDotNK = 2, kCombMR = 8, kCombNC = 3, kAccNK = 4, kAccNC = 5;

LOR2C_TARGET_BF16 inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// Lanes [0, n) of 16 (fewer where a row's columns end; none for n <= 0).
inline __mmask16 lanes(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// One 32-column step of dot_tile: columns j .. j + 31 (those in mask) of the MR rows x and NK
// weight rows m into the MR x NK accumulators.
template <int MR, int NK>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void dot_step(__m512* acc,
                                                                      const uint16_t* const* m,
                                                                      const uint16_t* const* x,
                                                                      int64_t j, __mmask32 mask) {
  __m512i w[NK];
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q) w[q] = _mm512_maskz_loadu_epi16(mask, m[q] + j);
#pragma GCC unroll 16
  for (int b = 0; b < MR; ++b) {
    const __m512i v = _mm512_maskz_loadu_epi16(mask, x[b] + j);
#pragma GCC unroll 16
    for (int q = 0; q < NK; ++q) acc[b * NK + q] = dp(acc[b * NK + q], v, w[q]);
  }
}

// Columns [j0, j0 + len) of the MR rows against ranks k0 .. k0 + NK - 1 of M (row stride ldm); the
// sums go to out, or are added to it (kAdd: a later chunk of the columns, dot_rows_impl).
template <int MR, int NK, bool kAdd>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void dot_tile(
    const uint16_t* M, int64_t ldm, int64_t r, int64_t j0, int64_t len, int64_t k0,
    const uint16_t* const* rows, int used, float* out, Prefetch* pf) {
  __m512 acc[MR * NK];
#pragma GCC unroll 16
  for (int i = 0; i < MR * NK; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* m[NK];
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q) m[q] = M + (k0 + q) * ldm + j0;
  const uint16_t* x[MR];
#pragma GCC unroll 16
  for (int b = 0; b < MR; ++b) x[b] = rows[b] + j0;
  PrefetchLines lines(pf, (len + 31) / 32, MR * ((len + 31) / 32));  // MR rows of len
  const int64_t full = len / 32;
  for (int64_t s = 0; s < full; ++s) {
    lines.next();
    dot_step<MR, NK>(acc, m, x, 32 * s, static_cast<__mmask32>(0xffffffffu));
  }
  if (const int64_t left = len - 32 * full; left > 0) {
    lines.next();
    dot_step<MR, NK>(acc, m, x, 32 * full, static_cast<__mmask32>((1u << left) - 1));
  }
  // The MR x NK horizontal sums at once, by the shuffle tree (lane_sums.h): input i = b NK + q
  // at position bitrev(i) leaves its sum in lane i. One _mm512_reduce_add_ps per accumulator
  // instead cost a third as many instructions as the tile's multiply-adds at d = 768.
  static_assert(MR * NK <= 16, "one vector of sums");
  using V = Vec<16>::f;
  V sums[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) sums[i] = V{};
#pragma GCC unroll 16
  for (int i = 0; i < MR * NK; ++i) sums[bitrev(i, 16)] = reinterpret_cast<V>(acc[i]);
  fold_levels<16, 8>(sums, 16);
  float lane[16];
  __builtin_memcpy(lane, &sums[0], sizeof(lane));
  for (int b = 0; b < MR && b < used; ++b)
#pragma GCC unroll 16
    for (int q = 0; q < NK; ++q) {
      float& o = out[b * r + k0 + q];
      o = kAdd ? o + lane[b * NK + q] : lane[b * NK + q];
    }
}

// The bf16 bits of 16 fp32 lanes, rounded as c10 rounds (to nearest even; a NaN to 0x7FC0), by
// hand: the bits plus 0x7fff plus the kept half's lowest bit, shifted.
LOR2C_TARGET_BF16 inline __m256i narrow16_by_hand(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0)));
}

// The same with vcvtneps2bf16, which rounds to nearest even too but reads a denormal as zero and
// keeps a NaN's sign and payload: a vector with a NaN or a denormal lane (rare) takes
// narrow16_by_hand. Measured in the forward's combine_rows (one core, rank 16, rows in cache):
// 3-8% faster than narrow16_by_hand alone, which pays for adding base last (combine_tile).
LOR2C_TARGET_BF16 inline __m256i narrow16(__m512 v) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, kNanOrDenormal) != 0, 0))
    return narrow16_by_hand(v);
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// 16 bf16 values widened to fp32 (exact: the bits in the high halves).
LOR2C_TARGET_BF16 inline __m512 widen16(__mmask16 mk, const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

// Columns j0 .. j0 + 16 NC (ncols where fewer are left) of rows b < MR. The sum starts from the
// products and adds base last, in fp32: vdpbf16ps flushes a denormal sum to zero, so a denormal
// base carried through the products would be lost (eager's add keeps it).
template <int MR, int NC>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void combine_tile(
    const uint32_t* Mp, int64_t pairs, int64_t ldm, int64_t j0, int64_t ncols, const uint32_t* cp,
    const uint16_t* const* base, const float* const* mul, int rows_here, uint16_t* const* out,
    Prefetch* pf) {
  __m512 acc[MR * NC];
  __mmask16 mk[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) mk[c] = lanes(ncols - 16 * c);
#pragma GCC unroll 16
  for (int b = 0; b < MR; ++b)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[b * NC + c] = _mm512_setzero_ps();
  const uint32_t* m = Mp + j0;
  // MR x 16 NC bf16 of out (and of base)
  PrefetchLines lines(pf, pairs, (base ? 2 : 1) * MR * NC / 2);
  for (int64_t q = 0; q < pairs; ++q, m += ldm) {
    lines.next();
    __m512i w[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) w[c] = _mm512_maskz_loadu_epi32(mk[c], m + 16 * c);
#pragma GCC unroll 16
    for (int b = 0; b < MR; ++b) {
      const __m512i coef = _mm512_set1_epi32(static_cast<int>(cp[b * pairs + q]));
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[b * NC + c] = dp(acc[b * NC + c], coef, w[c]);
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < MR && b < rows_here; ++b)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      __m512 v = acc[b * NC + c];
      if (base) v = _mm512_add_ps(v, widen16(mk[c], base[b] + j0 + 16 * c));
      if (mul) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk[c], mul[b] + j0 + 16 * c));
      _mm256_mask_storeu_epi16(out[b] + j0 + 16 * c, mk[c], narrow16(v));
    }
}

template <int NK, int NC>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void accumulate_tile(
    float* P, int64_t r, int64_t d, int64_t k0, int64_t j0, int64_t ncols, const uint32_t* cp,
    const uint32_t* const* Rp, int pairs, Prefetch* pf) {
  __m512 acc[NK * NC];
  __mmask16 mk[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) mk[c] = lanes(ncols - 16 * c);
  float* p = P + k0 * d + j0;
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[q * NC + c] = _mm512_maskz_loadu_ps(mk[c], p + q * d + 16 * c);
  PrefetchLines lines(pf, pairs, pairs * NC);  // the pairs' 16 NC uint32
  for (int b = 0; b < pairs; ++b) {
    lines.next();
    __m512i x[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) x[c] = _mm512_maskz_loadu_epi32(mk[c], Rp[b] + j0 + 16 * c);
#pragma GCC unroll 16
    for (int q = 0; q < NK; ++q) {
      const __m512i coef = _mm512_set1_epi32(static_cast<int>(cp[b * r + k0 + q]));
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[q * NC + c] = dp(acc[q * NC + c], coef, x[c]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(p + q * d + 16 * c, mk[c], acc[q * NC + c]);
}

// Tiles of NK' = rem < NK ranks.
template <int NK, bool kAdd>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void dot_rest(
    int rem, const uint16_t* M, int64_t ldm, int64_t r, int64_t j0, int64_t len, int64_t k0,
    const uint16_t* const* rows, int used, float* out, Prefetch* pf) {
  if constexpr (NK > 0) {
    if (rem == NK) return dot_tile<kDotMR, NK, kAdd>(M, ldm, r, j0, len, k0, rows, used, out, pf);
    dot_rest<NK - 1, kAdd>(rem, M, ldm, r, j0, len, k0, rows, used, out, pf);
  }
}

// Every rank of columns [j0, j0 + len).
template <bool kAdd>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void dot_chunk(
    const uint16_t* M, int64_t ldm, int64_t r, int64_t j0, int64_t len, const uint16_t* const* rows,
    int used, float* out, Prefetch* pf) {
  int64_t k = 0;
  for (; k + kDotNK <= r; k += kDotNK)
    for (int b = 0; b < used; b += kDotMR)
      dot_tile<kDotMR, kDotNK, kAdd>(M, ldm, r, j0, len, k, rows + b, used - b, out + b * r, pf);
  if (k < r)
    for (int b = 0; b < used; b += kDotMR)
      dot_rest<kDotNK - 1, kAdd>(static_cast<int>(r - k), M, ldm, r, j0, len, k, rows + b, used - b,
                                 out + b * r, pf);
}

template <int NK>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void accumulate_ranks(
    float* P, int64_t r, int64_t d, int64_t k0, const uint32_t* cp, const uint32_t* const* Rp,
    int pairs, Prefetch* pf) {
  for (int64_t j = 0; j < d; j += 16 * kAccNC)
    accumulate_tile<NK, kAccNC>(P, r, d, k0, j, d - j, cp, Rp, pairs, pf);
}

template <int NK>
LOR2C_TARGET_BF16 __attribute__((always_inline)) inline void accumulate_rest(
    int rem, float* P, int64_t r, int64_t d, int64_t k0, const uint32_t* cp,
    const uint32_t* const* Rp, int pairs, Prefetch* pf) {
  if constexpr (NK > 0) {
    if (rem == NK) return accumulate_ranks<NK>(P, r, d, k0, cp, Rp, pairs, pf);
    accumulate_rest<NK - 1>(rem, P, r, d, k0, cp, Rp, pairs, pf);
  }
}

// Rows wider than kDotChunk columns run chunk by chunk (every rank of one chunk, then the next),
// so that the 8 rows' chunk stays in L1 while the ranks go by: a whole 4096-column row block
// (64 KB) does not fit, and was read from L2 once per rank pair. Measured (one core, AMD EPYC
// Zen 4, rank 64, 8-row blocks streamed from memory): 110 GFLOP/s at d = 4096 unchunked, 125 in
// chunks of 1024 (512: 113, 256: 100, 2048: 129), 150 with the weights' padded stride too
// (bf16_row_stride), against 175-183 at d = 768. The chunks' partial sums add up in fp32.
constexpr int64_t kDotChunk = 1024;

LOR2C_TARGET_BF16 __attribute__((noinline)) void dot_rows_impl(const uint16_t* M, int64_t ldm,
                                                               int64_t r, int64_t d,
                                                               const uint16_t* const* rows,
                                                               int used, float* out, Prefetch* pf) {
  dot_chunk<false>(M, ldm, r, 0, std::min(kDotChunk, d), rows, used, out, pf);
  for (int64_t j0 = kDotChunk; j0 < d; j0 += kDotChunk)
    dot_chunk<true>(M, ldm, r, j0, std::min(kDotChunk, d - j0), rows, used, out, pf);
}

LOR2C_TARGET_BF16 __attribute__((noinline)) void combine_rows_impl(
    const uint32_t* Mp, int64_t ldm, int64_t r, int64_t d, const uint32_t* cp,
    const uint16_t* const* base, const float* const* mul, int used, uint16_t* const* out,
    Prefetch* pf) {
  const int64_t pairs = (r + 1) / 2;
  for (int b = 0; b < used; b += kCombMR)
    for (int64_t j = 0; j < d; j += 16 * kCombNC)
      combine_tile<kCombMR, kCombNC>(Mp, pairs, ldm, j, d - j, cp + b * pairs,
                                     base ? base + b : nullptr, mul ? mul + b : nullptr, used - b,
                                     out + b, pf);
}

LOR2C_TARGET_BF16 __attribute__((noinline)) void accumulate_outer_impl(float* P, int64_t r,
                                                                       int64_t d,
                                                                       const uint32_t* cp,
                                                                       const uint32_t* const* Rp,
                                                                       int pairs, Prefetch* pf) {
  int64_t k = 0;
  for (; k + kAccNK <= r; k += kAccNK) accumulate_ranks<kAccNK>(P, r, d, k, cp, Rp, pairs, pf);
  if (k < r) accumulate_rest<kAccNK - 1>(static_cast<int>(r - k), P, r, d, k, cp, Rp, pairs, pf);
}

LOR2C_TARGET_BF16 __attribute__((noinline)) void dropout_bf16_impl(const uint16_t* x,
                                                                   const float* mask, int64_t d,
                                                                   uint16_t* out) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 mk = lanes(d - j);
    const __m512 v = _mm512_mul_ps(widen16(mk, x + j), _mm512_maskz_loadu_ps(mk, mask + j));
    _mm256_mask_storeu_epi16(out + j, mk, narrow16(v));
  }
}

const char* detect_missing() {
  if (isa() != Isa::kAvx512) return "the AVX-512 path is not in use (LOR2C_CPU_ISA or the CPU)";
  if (!__builtin_cpu_supports("avx512bf16")) return "this CPU has no AVX512-BF16";
  const char* env = std::getenv("LOR2C_CPU_BF16_DOT");
  if (env != nullptr && std::strcmp(env, "0") == 0) return "LOR2C_CPU_BF16_DOT=0";
  TORCH_CHECK(env == nullptr || env[0] == 0 || std::strcmp(env, "1") == 0,
              "LOR2C_CPU_BF16_DOT: expected 0 or 1, got '", env, "'");
  return nullptr;
}

}  // namespace

const char* bf16_dot_missing() {
  static const char* const missing = detect_missing();
  return missing;
}

bool bf16_dot() { return bf16_dot_missing() == nullptr; }

void dot_rows_bf16(const uint16_t* M, int64_t ldm, int64_t r, int64_t d,
                   const uint16_t* const* rows, int used, float* out, Prefetch* pf) {
  dot_rows_impl(M, ldm, r, d, rows, used, out, pf);
}

void combine_rows_bf16(const uint32_t* Mp, int64_t ldm, int64_t r, int64_t d, const uint32_t* cp,
                       const uint16_t* const* base, const float* const* mul, int used,
                       uint16_t* const* out, Prefetch* pf) {
  combine_rows_impl(Mp, ldm, r, d, cp, base, mul, used, out, pf);
}

void accumulate_outer_bf16(float* P, int64_t r, int64_t d, const uint32_t* cp,
                           const uint32_t* const* Rp, int pairs, Prefetch* pf) {
  accumulate_outer_impl(P, r, d, cp, Rp, pairs, pf);
}

void dropout_bf16(const uint16_t* x, const float* mask, int64_t d, uint16_t* out) {
  dropout_bf16_impl(x, mask, d, out);
}

#else  // not x86-64 with GCC/Clang: never selected

const char* bf16_dot_missing() { return "not an x86-64 build"; }
bool bf16_dot() { return false; }
void dot_rows_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t* const*, int, float*,
                   Prefetch*) {
  TORCH_CHECK(false, "dot_rows_bf16: ", bf16_dot_missing());
}
void combine_rows_bf16(const uint32_t*, int64_t, int64_t, int64_t, const uint32_t*,
                       const uint16_t* const*, const float* const*, int, uint16_t* const*,
                       Prefetch*) {
  TORCH_CHECK(false, "combine_rows_bf16: ", bf16_dot_missing());
}
void accumulate_outer_bf16(float*, int64_t, int64_t, const uint32_t*, const uint32_t* const*, int,
                           Prefetch*) {
  TORCH_CHECK(false, "accumulate_outer_bf16: ", bf16_dot_missing());
}
void dropout_bf16(const uint16_t*, const float*, int64_t, uint16_t*) {
  TORCH_CHECK(false, "dropout_bf16: ", bf16_dot_missing());
}

#endif

void pack_rank_pairs(const uint16_t* M, int64_t r, int64_t d, uint32_t* Mp, int64_t ldp) {
  for (int64_t k = 0; k < r; k += 2)
    interleave_rows(M + k * d, k + 1 < r ? M + (k + 1) * d : nullptr, d, Mp + (k / 2) * ldp);
}

#if defined(LOR2C_X86)
// 16 columns a step (widened to 32 bits, b's shifted into the high halves), the tail masked.
LOR2C_TARGET_BF16 void interleave_rows(const uint16_t* a, const uint16_t* b, int64_t d,
                                       uint32_t* out) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 mk = lanes(d - j);
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, a + j));
    if (b != nullptr)
      v = _mm512_or_si512(
          v, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, b + j)), 16));
    _mm512_mask_storeu_epi32(out + j, mk, v);
  }
}
#else
void interleave_rows(const uint16_t* a, const uint16_t* b, int64_t d, uint32_t* out) {
  for (int64_t j = 0; j < d; ++j) out[j] = uint32_t{a[j]} | (b ? uint32_t{b[j]} << 16 : 0u);
}
#endif

}  // namespace cpu
}  // namespace lor2c
