// Philox4x32-10 dropout masks on the CPU: one call per 8 columns, 16-bit draws (csrc/philox.h).
// Vector paths run 16 (AVX-512), 8 (AVX2) or 4 (SSE2, the baseline path) counters at once, with
// 32x32->64-bit multiplies on even/odd lanes (the compiler's own vectorisation falls back to slow
// 64x64 multiplies). Then a 4 x 16 (4 x 8, 4 x 4) transpose puts word w of counter g at 32-bit
// slot 4g + w: read as 16-bit lanes, half h of that word sits at 8g + 2w + h, which is its
// column. So the draws are compared as unsigned 16-bit lanes, in column order, and the
// comparison masks widen to the fp32 mask. The scalar code (dropout_keep8) is the fallback off
// x86 and the reference the tests hold the vector paths to (LOR2C_CPU_MASK_PATH=scalar).
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

// 128 columns per step (16 counters), the last step 64 columns when mask_padded(d) asks so.
__attribute__((target("avx512f,avx512bw"))) void draw_avx512(int64_t row, int64_t d,
                                                             const DropoutParams& dp, float* mask) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(dp.threshold));  // <= 65535
  const __m512 keep = _mm512_set1_ps(dp.inv_keep);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t cols = mask_padded(d);
  for (int64_t col = 0; col < cols; col += 128) {
    const int64_t g0 = col / kDropoutGroup;
    __m512i c0 = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(g0)));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(row));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(dp.off0));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(dp.off1));
    uint32_t k0 = dp.key0, k1 = dp.key1;
    for (int round = 0; round < 10; ++round) {
      const __m512i e0 = _mm512_mul_epu32(c0, m0);
      const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i e1 = _mm512_mul_epu32(c2, m1);
      const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e1, 32), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, e1, _mm512_slli_epi64(o1, 32));
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    // 4 x 16 transpose of the words: after the unpacks, 128-bit lane L of u_i holds counter
    // 4L + i; the stores' order is then slot 4g + w (as floats: only shuffles, no arithmetic).
    const __m512 q0 = _mm512_castsi512_ps(c0), q1 = _mm512_castsi512_ps(c1);
    const __m512 q2 = _mm512_castsi512_ps(c2), q3 = _mm512_castsi512_ps(c3);
    const __m512 t0 = _mm512_unpacklo_ps(q0, q1), t1 = _mm512_unpackhi_ps(q0, q1);
    const __m512 t2 = _mm512_unpacklo_ps(q2, q3), t3 = _mm512_unpackhi_ps(q2, q3);
    const __m512 u0 =
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 u1 =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 u2 =
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const __m512 u3 =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const __m512 s0 = _mm512_shuffle_f32x4(u0, u1, 0x44), s1 = _mm512_shuffle_f32x4(u0, u1, 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(u2, u3, 0x44), s3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
    const __m512 words[4] = {_mm512_shuffle_f32x4(s0, s2, 0x88), _mm512_shuffle_f32x4(s0, s2, 0xDD),
                             _mm512_shuffle_f32x4(s1, s3, 0x88),
                             _mm512_shuffle_f32x4(s1, s3, 0xDD)};
    // words[k] holds counters 4k .. 4k+3, i.e. the draws of columns col + 32k .. col + 32k + 31.
    const int parts = cols - col >= 128 ? 4 : 2;
    float* out = mask + col;
    for (int k = 0; k < parts; ++k) {
      const __mmask32 kept = _mm512_cmpge_epu16_mask(_mm512_castps_si512(words[k]), thr);
      _mm512_storeu_ps(out + 32 * k, _mm512_maskz_mov_ps(static_cast<__mmask16>(kept), keep));
      _mm512_storeu_ps(out + 32 * k + 16,
                       _mm512_maskz_mov_ps(static_cast<__mmask16>(kept >> 16), keep));
    }
  }
}

// 64 columns (8 counters) per step.
__attribute__((target("avx2"))) void draw_avx2(int64_t row, int64_t d, const DropoutParams& dp,
                                               float* mask) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(dp.threshold));  // <= 65535
  const __m256 keep = _mm256_set1_ps(dp.inv_keep);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t cols = mask_padded(d);
  for (int64_t col = 0; col < cols; col += 64) {
    const int64_t g0 = col / kDropoutGroup;
    __m256i c0 = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(g0)));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(row));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(dp.off0));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(dp.off1));
    uint32_t k0 = dp.key0, k1 = dp.key1;
    for (int round = 0; round < 10; ++round) {
      const __m256i e0 = _mm256_mul_epu32(c0, m0);
      const __m256i o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i e1 = _mm256_mul_epu32(c2, m1);
      const __m256i o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    // 4 x 8 transpose of the words into slot 4g + w (see the AVX-512 path).
    const __m256 q0 = _mm256_castsi256_ps(c0), q1 = _mm256_castsi256_ps(c1);
    const __m256 q2 = _mm256_castsi256_ps(c2), q3 = _mm256_castsi256_ps(c3);
    const __m256 t0 = _mm256_unpacklo_ps(q0, q1), t1 = _mm256_unpackhi_ps(q0, q1);
    const __m256 t2 = _mm256_unpacklo_ps(q2, q3), t3 = _mm256_unpackhi_ps(q2, q3);
    const __m256 u0 =
        _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u1 =
        _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u2 =
        _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 u3 =
        _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 words[4] = {
        _mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u2, u3, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31), _mm256_permute2f128_ps(u2, u3, 0x31)};
    // words[k]: counters 2k, 2k+1, the draws of columns col + 16k .. col + 16k + 15.
    float* out = mask + col;
    for (int k = 0; k < 4; ++k) {
      const __m256i w = _mm256_castps_si256(words[k]);
      const __m256i ge = _mm256_cmpeq_epi16(_mm256_max_epu16(w, thr), w);  // draw >= thr: ~0
      const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(ge));
      const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(ge, 1));
      _mm256_storeu_ps(out + 16 * k, _mm256_and_ps(_mm256_castsi256_ps(lo), keep));
      _mm256_storeu_ps(out + 16 * k + 8, _mm256_and_ps(_mm256_castsi256_ps(hi), keep));
    }
  }
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
// 27.1-27.6 ms, this 6.1-6.6 ms (4.3x), AVX2 4.8 ms. Two independent chains (a*, b*) keep the
// multiplier busy; a step of 8 counters spills the 16 xmm registers: 8.1-8.7 ms against this
// code's 6.1-6.5 ms in a standalone loop over the same rows (wall time).
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
