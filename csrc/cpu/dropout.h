// The dropout mask of one row, regenerated on the fly (never stored between forward and
// backward). Shared by every CPU kernel that applies dropout to its input.
#pragma once
#include <cstdint>

#include "../philox.h"

namespace lor2c {
namespace cpu {

// Columns per call of the vectorised generator; mask buffers are padded to a multiple of it.
constexpr int64_t kMaskStep = 64;

inline int64_t mask_padded(int64_t d) { return (d + kMaskStep - 1) / kMaskStep * kMaskStep; }

// mask[j] = (draw(row, j) >= threshold) ? inv_keep : 0 for j < mask_padded(d), following the
// mask convention of csrc/philox.h. Uses AVX-512 or AVX2 when the CPU has them.
void draw_dropout_row(int64_t row, int64_t d, const DropoutParams& dp, float* mask);

}  // namespace cpu
}  // namespace lor2c
