// Philox4x32-10 dropout masks on the CPU, 64 columns (16 counters x 4 draws) per step.
// Vector paths use 32x32->64-bit multiplies on even/odd lanes (the compiler's own
// vectorisation falls back to slow 64x64 multiplies), then transpose the four draw vectors
// into column order, since draw q of counter g belongs to column 4g + q.
#include "dropout.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LOR2C_X86 1
#endif

namespace lor2c {
namespace cpu {
namespace {

void draw_scalar(int64_t row, int64_t d, const DropoutParams& dp, float* mask) {
  const int64_t groups = mask_padded(d) / 4;
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(row), dp.off0, dp.off1};
    philox4x32_10(c, dp.key0, dp.key1);
    for (int q = 0; q < 4; ++q) mask[4 * g + q] = c[q] >= dp.threshold ? dp.inv_keep : 0.f;
  }
}

#ifdef LOR2C_X86

__attribute__((target("avx512f"))) void draw_avx512(int64_t row, int64_t d,
                                                    const DropoutParams& dp, float* mask) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  // Unsigned >= threshold, as a signed compare after flipping the sign bits.
  const __m512i flip = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(dp.threshold ^ 0x80000000u));
  const __m512 keep = _mm512_set1_ps(dp.inv_keep);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t groups = mask_padded(d) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
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
    const __m512 zero = _mm512_setzero_ps();
    const __m512 q0 = _mm512_mask_mov_ps(zero, _mm512_cmpge_epi32_mask(_mm512_xor_si512(c0, flip), thr), keep);
    const __m512 q1 = _mm512_mask_mov_ps(zero, _mm512_cmpge_epi32_mask(_mm512_xor_si512(c1, flip), thr), keep);
    const __m512 q2 = _mm512_mask_mov_ps(zero, _mm512_cmpge_epi32_mask(_mm512_xor_si512(c2, flip), thr), keep);
    const __m512 q3 = _mm512_mask_mov_ps(zero, _mm512_cmpge_epi32_mask(_mm512_xor_si512(c3, flip), thr), keep);
    // 4 x 16 transpose: after the unpacks, 128-bit lane L of u_i holds counter 4L + i.
    const __m512 t0 = _mm512_unpacklo_ps(q0, q1), t1 = _mm512_unpackhi_ps(q0, q1);
    const __m512 t2 = _mm512_unpacklo_ps(q2, q3), t3 = _mm512_unpackhi_ps(q2, q3);
    const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const __m512 s0 = _mm512_shuffle_f32x4(u0, u1, 0x44), s1 = _mm512_shuffle_f32x4(u0, u1, 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(u2, u3, 0x44), s3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
    float* out = mask + 4 * g0;
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(s0, s2, 0x88));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(s0, s2, 0xDD));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(s1, s3, 0x88));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(s1, s3, 0xDD));
  }
}

__attribute__((target("avx2"))) void draw_avx2(int64_t row, int64_t d, const DropoutParams& dp,
                                               float* mask) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // keep iff draw >= thr  <=>  not (thr > draw), compared as signed after flipping sign bits.
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(dp.threshold ^ 0x80000000u));
  const __m256 keep = _mm256_set1_ps(dp.inv_keep);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t groups = mask_padded(d) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
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
    __m256 q[4];
    const __m256i cs[4] = {c0, c1, c2, c3};
    for (int i = 0; i < 4; ++i) {
      const __m256i below = _mm256_cmpgt_epi32(thr, _mm256_xor_si256(cs[i], flip));
      q[i] = _mm256_andnot_ps(_mm256_castsi256_ps(below), keep);
    }
    const __m256 t0 = _mm256_unpacklo_ps(q[0], q[1]), t1 = _mm256_unpackhi_ps(q[0], q[1]);
    const __m256 t2 = _mm256_unpacklo_ps(q[2], q[3]), t3 = _mm256_unpackhi_ps(q[2], q[3]);
    const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    float* out = mask + 4 * g0;
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

#endif  // LOR2C_X86

using DrawFn = void (*)(int64_t, int64_t, const DropoutParams&, float*);

DrawFn pick_draw() {
#ifdef LOR2C_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return draw_avx512;
  if (__builtin_cpu_supports("avx2")) return draw_avx2;
#endif
  return draw_scalar;
}

}  // namespace

void draw_dropout_row(int64_t row, int64_t d, const DropoutParams& dp, float* mask) {
  static const DrawFn draw = pick_draw();
  draw(row, d, dp, mask);
}

}  // namespace cpu
}  // namespace lor2c
