// Rows of bfloat16 / float16 widened to fp32 and narrowed back, vectorised per instruction-set
// path (csrc/cpu/isa.h). The scalar conversions (c10::BFloat16, c10::Half) compiled for the
// baseline ran at about 1 ns per element: some 30 ms of a bf16 forward+backward at n = 8192,
// d = 768, more than the rank-64 products themselves. Results are bit-identical to c10's
// conversions (round to nearest even; a NaN narrows to a quiet NaN).
#pragma once
#include <cstdint>

namespace lor2c {
namespace cpu {

void widen_bf16(const uint16_t* src, float* dst, int64_t n);
void narrow_bf16(const float* src, uint16_t* dst, int64_t n);
void widen_f16(const uint16_t* src, float* dst, int64_t n);
void narrow_f16(const float* src, uint16_t* dst, int64_t n);

}  // namespace cpu
}  // namespace lor2c
