// Philox4x32-10 dropout masks on the CPU: one call per 8 columns, 16-bit draws (csrc/philox.h).
// Vector paths run 32 (AVX-512), 12 (AVX2) or 4 (SSE2, the baseline path) counters at once, with
// 32x32->64-bit multiplies on counters held in 64-bit lanes (the compiler's own vectorisation
// falls back to slow 64x64 multiplies). The draws then go to 16-bit lanes in column order, are
// compared as unsigned 16-bit lanes, and the comparison masks widen to the fp32 mask. The scalar
// code (dropout_keep8) is the fallback off x86 and the reference the tests hold the vector paths
// to (LOR2C_CPU_MASK_PATH=scalar).
#include "dropout.h"

#include <cstdlib>
#include <cstring>

#include "isa.h"

#ifdef LOR2C_X86
#include <immintrin.h>
#endif

namespace lor2c {
namespace cpu {
namespace {

void draw_scalar(int64_t row, int64_t d, const DropoutParams& dp, float* mask) {
  const int64_t groups = mask_padded(d) / kDropoutGroup;
  for (int64_t g = 0; g < groups; ++g) dropout_keep8(dp, row, g, mask + kDropoutGroup * g);
}

#ifdef LOR2C_X86

// The vector paths keep each Philox counter's four words in the low halves of 64-bit lanes (the
// high halves carry junk that nothing reads), so that _mm*_mul_epu32 multiplies them in place:
// the product's low word is the new word's low half and one shift brings its high word down. A
// "chain" is one vector of counters (8 for AVX-512, 4 for AVX2); a step runs C chains at once, so
// that C independent multiplies are in flight. Measured (mask of 8192 x 1024 on one thread, AMD
// EPYC Zen 4, standalone loop over the rows, best of 5): the earlier layout, 16 (8) counters in
// 32-bit lanes with even/odd multiplies and blends, took 2.75-2.85 ms with AVX-512 and 3.9-4.0 ms
// with AVX2; this one 1.65-1.75 ms with 4 AVX-512 chains (2.2-2.3 with one chain, 1.9-2.0 with
// two) and 3.1-3.4 ms with 3 AVX2 chains (4.1-4.5 with one, 3.4-3.5 with two). Moving the high
// word down with a shuffle instead of a shift made no difference: the multiplies bound it.
//
// After the rounds, word w of counter g sits in 64-bit lane g of state vector w. A masked shuffle
// pairs words (0, 1) and (2, 3) into 64-bit lanes; interleaving the pairs puts counter g's words
// at 32-bit slots 4g .. 4g + 3: read as 16-bit lanes, half h of word w sits at 8g + 2w + h, which
// is its column. So the draws are compared as unsigned 16-bit lanes, in column order, and the
// comparison masks widen to the fp32 mask.

// GCC 12 warns that _mm512_mul_epu32's own placeholder operand "may be used uninitialized" once
// the chains are unrolled (a false positive inside the intrinsic's header).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// C chains of 8 counters (64 columns each) from group g0: mask[0 .. 64 C).
template <int C>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void step_avx512(
    int64_t row, int64_t g0, const DropoutParams& dp, const uint32_t keys[20], float* mask) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i w0[C], w1[C], w2[C], w3[C];
  for (int c = 0; c < C; ++c) {
    w0[c] = _mm512_add_epi64(lane, _mm512_set1_epi64(g0 + 8 * c));
    w1[c] = _mm512_set1_epi64(static_cast<uint32_t>(row));
    w2[c] = _mm512_set1_epi64(dp.off0);
    w3[c] = _mm512_set1_epi64(dp.off1);
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(keys[2 * round]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(keys[2 * round + 1]));
    for (int c = 0; c < C; ++c) {
      const __m512i p0 = _mm512_mul_epu32(w0[c], m0);
      const __m512i p2 = _mm512_mul_epu32(w2[c], m1);
      w0[c] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p2, 32), w1[c], k0, 0x96);  // a^b^c
      w2[c] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), w3[c], k1, 0x96);
      w1[c] = p2;
      w3[c] = p0;
    }
  }
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(dp.threshold));  // <= 65535
  const __m512 keep = _mm512_set1_ps(dp.inv_keep);
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int c = 0; c < C; ++c) {
    // 32-bit lane 2g + 1 <- lane 2g of the second vector: 64-bit lane g holds (w0, w1), (w2, w3).
    const __m512i q01 = _mm512_mask_shuffle_epi32(w0[c], 0xAAAA, w1[c], _MM_PERM_CCAA);
    const __m512i q23 = _mm512_mask_shuffle_epi32(w2[c], 0xAAAA, w3[c], _MM_PERM_CCAA);
    // Counters 0-3 and 4-7 of the chain: the draws of 32 columns each.
    const __m512i words[2] = {_mm512_permutex2var_epi64(q01, first, q23),
                              _mm512_permutex2var_epi64(q01, second, q23)};
    for (int k = 0; k < 2; ++k) {
      const __mmask32 kept = _mm512_cmpge_epu16_mask(words[k], thr);
      float* out = mask + 64 * c + 32 * k;
      _mm512_storeu_ps(out, _mm512_maskz_mov_ps(static_cast<__mmask16>(kept), keep));
      _mm512_storeu_ps(out + 16, _mm512_maskz_mov_ps(static_cast<__mmask16>(kept >> 16), keep));
    }
  }
}

#pragma GCC diagnostic pop

// The round keys: keys[2 r + h] is key word h in round r.
void round_keys(const DropoutParams& dp, uint32_t keys[20]) {
  uint32_t k0 = dp.key0, k1 = dp.key1;
  for (int round = 0; round < 10; ++round) {
    keys[2 * round] = k0;
    keys[2 * round + 1] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// 256 columns (4 chains) per step; the last 64-192 columns in steps of 2 and 1 chains.
__attribute__((target("avx512f,avx512bw"))) void draw_avx512(int64_t row, int64_t d,
                                                             const DropoutParams& dp, float* mask) {
  uint32_t keys[20];
  round_keys(dp, keys);
  const int64_t cols = mask_padded(d);
  int64_t col = 0;
  for (; col + 256 <= cols; col += 256)
    step_avx512<4>(row, col / kDropoutGroup, dp, keys, mask + col);
  if (col + 128 <= cols) {
    step_avx512<2>(row, col / kDropoutGroup, dp, keys, mask + col);
    col += 128;
  }
  if (col < cols) step_avx512<1>(row, col / kDropoutGroup, dp, keys, mask + col);
}

// C chains of 4 counters (32 columns each) from group g0: mask[0 .. 32 C). AVX2 has no
// three-way xor, and 3 chains' state is 12 of the 16 registers, so the round keys come from
// memory (kv[2 r + h]: key word h of round r, broadcast).
template <int C>
__attribute__((target("avx2"), always_inline)) inline void step_avx2(int64_t row, int64_t g0,
                                                                     const DropoutParams& dp,
                                                                     const __m256i kv[20],
                                                                     float* mask) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  __m256i w0[C], w1[C], w2[C], w3[C];
  for (int c = 0; c < C; ++c) {
    w0[c] = _mm256_add_epi64(lane, _mm256_set1_epi64x(g0 + 4 * c));
    w1[c] = _mm256_set1_epi64x(static_cast<uint32_t>(row));
    w2[c] = _mm256_set1_epi64x(dp.off0);
    w3[c] = _mm256_set1_epi64x(dp.off1);
  }
  for (int round = 0; round < 10; ++round) {
    for (int c = 0; c < C; ++c) {
      const __m256i p0 = _mm256_mul_epu32(w0[c], m0);
      const __m256i p2 = _mm256_mul_epu32(w2[c], m1);
      w0[c] = _mm256_xor_si256(_mm256_srli_epi64(p2, 32), _mm256_xor_si256(w1[c], kv[2 * round]));
      w2[c] =
          _mm256_xor_si256(_mm256_srli_epi64(p0, 32), _mm256_xor_si256(w3[c], kv[2 * round + 1]));
      w1[c] = p2;
      w3[c] = p0;
    }
  }
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(dp.threshold));  // <= 65535
  const __m256 keep = _mm256_set1_ps(dp.inv_keep);
  for (int c = 0; c < C; ++c) {
    // 64-bit lane g holds (w0, w1), (w2, w3) of counter g; the unpacks give counters 0, 2 (lo)
    // and 1, 3 (hi) in their 128-bit lanes, and the lane permutes put them in order.
    const __m256i q01 = _mm256_blend_epi32(w0[c], _mm256_slli_epi64(w1[c], 32), 0xAA);
    const __m256i q23 = _mm256_blend_epi32(w2[c], _mm256_slli_epi64(w3[c], 32), 0xAA);
    const __m256i lo = _mm256_unpacklo_epi64(q01, q23), hi = _mm256_unpackhi_epi64(q01, q23);
    // Counters 0-1 and 2-3 of the chain: the draws of 16 columns each.
    const __m256i words[2] = {_mm256_permute2x128_si256(lo, hi, 0x20),
                              _mm256_permute2x128_si256(lo, hi, 0x31)};
    for (int k = 0; k < 2; ++k) {
      const __m256i w = words[k];
      const __m256i ge = _mm256_cmpeq_epi16(_mm256_max_epu16(w, thr), w);  // draw >= thr: ~0
      const __m256i lo32 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(ge));
      const __m256i hi32 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(ge, 1));
      float* out = mask + 32 * c + 16 * k;
      _mm256_storeu_ps(out, _mm256_and_ps(_mm256_castsi256_ps(lo32), keep));
      _mm256_storeu_ps(out + 8, _mm256_and_ps(_mm256_castsi256_ps(hi32), keep));
    }
  }
}

// 96 columns (3 chains) per step, the last 32 or 64 columns one chain at a time.
__attribute__((target("avx2"))) void draw_avx2(int64_t row, int64_t d, const DropoutParams& dp,
                                               float* mask) {
  uint32_t keys[20];
  round_keys(dp, keys);
  __m256i kv[20];
  for (int k = 0; k < 20; ++k) kv[k] = _mm256_set1_epi32(static_cast<int>(keys[k]));
  const int64_t cols = mask_padded(d);
  int64_t col = 0;
  for (; col + 96 <= cols; col += 96) step_avx2<3>(row, col / kDropoutGroup, dp, kv, mask + col);
  for (; col < cols; col += 32) step_avx2<1>(row, col / kDropoutGroup, dp, kv, mask + col);
}

// 32 columns (4 counters) per step with SSE2 alone: the baseline path, x86-64 without SSE4.1 or
// AVX. Each counter keeps its four words in the low halves of 64-bit lanes (counters g, g+1 in
// the a* vectors, g+2, g+3 in the b* vectors), so _mm_mul_epu32 multiplies them in place: its
// product's high word is already in the high half (one shift brings it down) and its low word in
// the low half; the high halves of the state carry junk that nothing reads. After the rounds,
// unpacks put counter g's words w at 32-bit slot w (its 8 columns as 16-bit lanes, in order).
// draw >= threshold as unsigned 16-bit lanes: the saturating threshold - draw is 0 (no unsigned
// compare or max before SSE4.1; threshold <= 65535, so it fits the lane as it is).
// Measured (mask of 8192 x 1024 on one thread, fused forward at p = 0.1 minus p = 0, CPU time,
// median of 11 in each of 3 processes, AMD EPYC (Zen 4) shared at load 3-4): scalar code
// 27.1-27.6 ms, this 6.1-6.6 ms (4.3x), AVX2 4.8 ms (3.1-3.4 ms with the layout above). Two
// independent chains (a*, b*) keep the multiplier busy; a step of 8 counters spills the 16 xmm
// registers: 8.1-8.7 ms against this code's 6.1-6.5 ms in a standalone loop over the same rows
// (wall time).
void draw_sse2(int64_t row, int64_t d, const DropoutParams& dp, float* mask) {
  const __m128i m0 = _mm_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m128i m1 = _mm_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m128i thr = _mm_set1_epi16(static_cast<short>(dp.threshold));  // <= 65535
  const __m128i zero = _mm_setzero_si128();
  const __m128 keep = _mm_set1_ps(dp.inv_keep);
  __m128i key0[10], key1[10];
  uint32_t k0 = dp.key0, k1 = dp.key1;
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m128i c1 = _mm_set1_epi32(static_cast<int>(row));
  const __m128i c2 = _mm_set1_epi32(static_cast<int>(dp.off0));
  const __m128i c3 = _mm_set1_epi32(static_cast<int>(dp.off1));
  const __m128i lane_a = _mm_setr_epi32(0, 0, 1, 0), lane_b = _mm_setr_epi32(2, 0, 3, 0);
  const int64_t cols = mask_padded(d);
  for (int64_t col = 0; col < cols; col += 32) {
    const __m128i g0 = _mm_set1_epi32(static_cast<int>(col / kDropoutGroup));
    __m128i a0 = _mm_add_epi32(g0, lane_a), a1 = c1, a2 = c2, a3 = c3;
    __m128i b0 = _mm_add_epi32(g0, lane_b), b1 = c1, b2 = c2, b3 = c3;
    for (int round = 0; round < 10; ++round) {
      const __m128i pa0 = _mm_mul_epu32(a0, m0), pb0 = _mm_mul_epu32(b0, m0);
      const __m128i pa2 = _mm_mul_epu32(a2, m1), pb2 = _mm_mul_epu32(b2, m1);
      a0 = _mm_xor_si128(_mm_srli_epi64(pa2, 32), _mm_xor_si128(a1, key0[round]));
      b0 = _mm_xor_si128(_mm_srli_epi64(pb2, 32), _mm_xor_si128(b1, key0[round]));
      a2 = _mm_xor_si128(_mm_srli_epi64(pa0, 32), _mm_xor_si128(a3, key1[round]));
      b2 = _mm_xor_si128(_mm_srli_epi64(pb0, 32), _mm_xor_si128(b3, key1[round]));
      a1 = pa2;
      b1 = pb2;
      a3 = pa0;
      b3 = pb0;
    }
    const __m128i a01 = _mm_unpacklo_epi32(a0, a1), a23 = _mm_unpacklo_epi32(a2, a3);
    const __m128i a01h = _mm_unpackhi_epi32(a0, a1), a23h = _mm_unpackhi_epi32(a2, a3);
    const __m128i b01 = _mm_unpacklo_epi32(b0, b1), b23 = _mm_unpacklo_epi32(b2, b3);
    const __m128i b01h = _mm_unpackhi_epi32(b0, b1), b23h = _mm_unpackhi_epi32(b2, b3);
    // words[k]: counter g + k, the draws of columns col + 8k .. col + 8k + 7.
    const __m128i words[4] = {_mm_unpacklo_epi64(a01, a23), _mm_unpacklo_epi64(a01h, a23h),
                              _mm_unpacklo_epi64(b01, b23), _mm_unpacklo_epi64(b01h, b23h)};
    float* out = mask + col;
    for (int k = 0; k < 4; ++k) {
      const __m128i ge = _mm_cmpeq_epi16(_mm_subs_epu16(thr, words[k]), zero);  // kept: ~0
      _mm_storeu_ps(out + 8 * k, _mm_and_ps(_mm_castsi128_ps(_mm_unpacklo_epi16(ge, ge)), keep));
      _mm_storeu_ps(out + 8 * k + 4,
                    _mm_and_ps(_mm_castsi128_ps(_mm_unpackhi_epi16(ge, ge)), keep));
    }
  }
}

#endif  // LOR2C_X86

using DrawFn = void (*)(int64_t, int64_t, const DropoutParams&, float*);

// The path of csrc/cpu/isa.h (LOR2C_CPU_ISA): AVX-512, AVX2, or SSE2 on the baseline path (the
// scalar code off x86); LOR2C_CPU_MASK_PATH=scalar|avx2 (read once) caps the mask's own path
// further, for tests written before LOR2C_CPU_ISA and for the tests of the vector paths against
// the scalar code.
DrawFn pick_draw() {
  Isa path = isa();
  const char* force = std::getenv("LOR2C_CPU_MASK_PATH");
  if (force != nullptr && std::strcmp(force, "scalar") == 0) return draw_scalar;
  if (force != nullptr && std::strcmp(force, "avx2") == 0 && path == Isa::kAvx512)
    path = Isa::kAvx2;
#ifdef LOR2C_X86
  if (path == Isa::kAvx512) return draw_avx512;
  if (path == Isa::kAvx2) return draw_avx2;
  return draw_sse2;
#else
  (void)path;
  return draw_scalar;
#endif
}

}  // namespace

void draw_dropout_row(int64_t row, int64_t d, const DropoutParams& dp, float* mask) {
  static const DrawFn draw = pick_draw();
  draw(row, d, dp, mask);
}

}  // namespace cpu
}  // namespace lor2c
