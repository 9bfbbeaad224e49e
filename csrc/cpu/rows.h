// What every CPU kernel of the library shares: the fp32 vector type of the hot loops (compiled
// once per instruction-set path, csrc/cpu/isa.h), and the staging of blocks of kRows tensor rows
// as fp32 rows (widened from half precision, dropout applied).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "../philox.h"
#include "convert.h"
#include "dropout.h"
#include "isa.h"

#define LOR2C_INLINE inline __attribute__((always_inline))

namespace lor2c {
namespace cpu {

constexpr int kRows = 8;    // rows per block: each weight element loaded serves kRows rows
constexpr int kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones

// GCC/Clang vector extensions: each target clone lowers them to its own instruction set.
typedef float vfloat __attribute__((vector_size(4 * kLanes)));

LOR2C_INLINE vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

LOR2C_INLINE void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

LOR2C_INLINE float hsum(vfloat v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline void multiply_into(float* out, const float* a, const float* b, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = a[j] * b[j];
}

template <typename T>
void widen(const T* src, float* dst, int64_t d) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    widen_bf16(reinterpret_cast<const uint16_t*>(src), dst, d);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    widen_f16(reinterpret_cast<const uint16_t*>(src), dst, d);
  } else {
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

template <typename T>
void narrow(const float* src, T* dst, int64_t d) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    narrow_bf16(src, reinterpret_cast<uint16_t*>(dst), d);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    narrow_f16(src, reinterpret_cast<uint16_t*>(dst), d);
  } else {
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// Per-thread scratch of a few rows, padded for the dropout generator's 64-column steps.
struct Scratch {
  int64_t stride;
  std::vector<float> data;
  Scratch(int64_t d, int64_t count) : stride(mask_padded(d)), data(stride * count, 0.f) {}
  float* row(int64_t i) { return data.data() + i * stride; }
};

// Float view of rows idx[0..nb) of a tensor with row stride `ld`: the tensor's own memory for
// fp32 (missing rows point at `zero`), else widened into `scratch`.
template <typename T>
void float_rows(const T* base, int64_t ld, const int64_t* idx, int nb, int64_t d, Scratch& scratch,
                const float* zero, const float* rows[kRows]) {
  for (int b = 0; b < kRows; ++b) {
    if (b >= nb) {
      rows[b] = zero;
    } else if constexpr (std::is_same_v<T, float>) {
      rows[b] = base + idx[b] * ld;
    } else {
      widen(base + idx[b] * ld, scratch.row(b), d);
      rows[b] = scratch.row(b);
    }
  }
}

// Row `row` of dropout(x) as floats into dst (src: that row of x); with dropout its mask row is
// left in `mask`. One pass for fp32 rows (x * mask); half rows are widened first. The mask is a
// function of the row's index in x, whatever order the rows are visited in.
template <typename T>
void dropped_row(const T* src, int64_t row, int64_t d, const DropoutParams& dp, float* mask,
                 float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (!dp.enabled) {
      std::copy(src, src + d, dst);
      return;
    }
    draw_dropout_row(row, d, dp, mask);
    multiply_into(dst, src, mask, d);
  } else {
    widen(src, dst, d);
    if (!dp.enabled) return;
    draw_dropout_row(row, d, dp, mask);
    multiply_into(dst, dst, mask, d);
  }
}

// Rows of dropout(x) as floats (dropped_row; without dropout float_rows: fp32 rows in place).
template <typename T>
void dropped_rows(const T* x, int64_t ld, const int64_t* idx, int nb, int64_t d,
                  const DropoutParams& dp, Scratch& xs, Scratch& mask, const float* zero,
                  const float* rows[kRows]) {
  if (!dp.enabled) return float_rows(x, ld, idx, nb, d, xs, zero, rows);
  for (int b = 0; b < kRows; ++b) {
    if (b >= nb) {
      rows[b] = zero;
      continue;
    }
    dropped_row(x + idx[b] * ld, idx[b], d, dp, mask.row(b), xs.row(b));
    rows[b] = xs.row(b);
  }
}

// Calls body(T{}) with T the activations' element type. Weights of either dtype are widened to
// fp32 once per call, so only x's dtype picks a kernel instantiation.
template <typename F>
auto dispatch_activation(const at::Tensor& x, F&& body) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return body(float{});
    case at::kHalf:
      return body(at::Half{});
    case at::kBFloat16:
      return body(at::BFloat16{});
    default:
      TORCH_CHECK(false, "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

// idx[b] = i0 + b: the rows of a block of consecutive rows.
inline void consecutive(int64_t i0, int nb, int64_t idx[kRows]) {
  for (int b = 0; b < nb; ++b) idx[b] = i0 + b;
}

}  // namespace cpu
}  // namespace lor2c
