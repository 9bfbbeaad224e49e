// The dropout mask of one row, regenerated on the fly (never stored between forward and
// backward). Shared by every CPU kernel that applies dropout to its input.
#pragma once
#include <cstdint>

#include "../philox.h"

namespace lor2c {
namespace cpu {

// Mask buffers are padded to a multiple of this many columns: 8 Philox counters of 8 columns
// (the AVX-512 path's smallest step; it runs 256 columns per step, AVX2 96 and then 32, SSE2 32).
constexpr int64_t kMaskStep = 64;

inline int64_t mask_padded(int64_t d) { return (d + kMaskStep - 1) / kMaskStep * kMaskStep; }

// mask[j] = (draw(row, j) >= threshold) ? inv_keep : 0 for j < mask_padded(d), following the
// mask convention of csrc/philox.h. Uses AVX-512 (F + BW), AVX2 or SSE2 code, following the
// kernels' path (csrc/cpu/isa.h, LOR2C_CPU_ISA; SSE2 on the baseline path, scalar code off x86);
// LOR2C_CPU_MASK_PATH=scalar|avx2 (read once) caps the mask's path alone, for tests.
void draw_dropout_row(int64_t row, int64_t d, const DropoutParams& dp, float* mask);

}  // namespace cpu
}  // namespace lor2c
