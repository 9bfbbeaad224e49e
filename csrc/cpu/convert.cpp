// bfloat16 / float16 <-> fp32 rows (csrc/cpu/convert.h).
#include "convert.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "isa.h"

#ifdef LOR2C_X86
#include <immintrin.h>
#endif

namespace lor2c {
namespace cpu {
namespace {

#define LOR2C_INLINE_CVT inline __attribute__((always_inline))

template <int W>
struct Lanes {
  typedef uint16_t u16 __attribute__((vector_size(2 * W)));
  typedef uint32_t u32 __attribute__((vector_size(4 * W)));
  typedef int32_t i32 __attribute__((vector_size(4 * W)));
};

// bf16 is the top half of an fp32: a shift.
template <typename Arch>
LOR2C_INLINE_CVT void widen_bf16_impl_body(const uint16_t* __restrict src, float* __restrict dst,
                                           int64_t n) {
  constexpr int W = Arch::W;
  using L = Lanes<W>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    typename L::u16 h;
    __builtin_memcpy(&h, src + i, sizeof(h));
    const typename L::u32 w = __builtin_convertvector(h, typename L::u32) << 16;
    __builtin_memcpy(dst + i, &w, sizeof(w));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
}

// c10's round_to_nearest_even: NaN -> 0x7FC0, else (u + 0x7FFF + ((u >> 16) & 1)) >> 16.
template <typename Arch>
LOR2C_INLINE_CVT void narrow_bf16_impl_body(const float* __restrict src, uint16_t* __restrict dst,
                                            int64_t n) {
  constexpr int W = Arch::W;
  using L = Lanes<W>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    typename L::u32 u;
    __builtin_memcpy(&u, src + i, sizeof(u));
    const typename L::u32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const typename L::i32 nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // all ones where NaN
    const typename L::u32 bits =
        (rounded & ~typename L::u32(nan)) | (typename L::u32(nan) & 0x7FC0u);
    const typename L::u16 h = __builtin_convertvector(bits, typename L::u16);
    __builtin_memcpy(dst + i, &h, sizeof(h));
  }
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}

// float16: F16C's conversions (part of x86-64-v3 and v4); c10's scalar ones on the baseline.
#if defined(LOR2C_X86)
LOR2C_TARGET_AVX512 void widen_f16_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(
        dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
}

LOR2C_TARGET_AVX2 void widen_f16_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
}

LOR2C_TARGET_AVX512 void narrow_f16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}

LOR2C_TARGET_AVX2 void narrow_f16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}
#endif

LOR2C_MULTIVERSION(widen_bf16_impl, (const uint16_t* src, float* dst, int64_t n), (src, dst, n))
LOR2C_MULTIVERSION(narrow_bf16_impl, (const float* src, uint16_t* dst, int64_t n), (src, dst, n))

}  // namespace

void widen_bf16(const uint16_t* src, float* dst, int64_t n) { widen_bf16_impl(src, dst, n); }
void narrow_bf16(const float* src, uint16_t* dst, int64_t n) { narrow_bf16_impl(src, dst, n); }
void widen_f16(const uint16_t* src, float* dst, int64_t n) {
#if defined(LOR2C_X86)
  switch (isa()) {
    case Isa::kAvx512:
      return widen_f16_avx512(src, dst, n);
    case Isa::kAvx2:
      return widen_f16_avx2(src, dst, n);
    default:
      break;
  }
#endif
  for (int64_t i = 0; i < n; ++i)
    dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
}

void narrow_f16(const float* src, uint16_t* dst, int64_t n) {
#if defined(LOR2C_X86)
  switch (isa()) {
    case Isa::kAvx512:
      return narrow_f16_avx512(src, dst, n);
    case Isa::kAvx2:
      return narrow_f16_avx2(src, dst, n);
    default:
      break;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}

}  // namespace cpu
}  // namespace lor2c
