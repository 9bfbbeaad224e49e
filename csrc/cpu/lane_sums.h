// Horizontal sums of W-lane fp32 vectors, W at a time: a shuffle tree folds W vectors of
// partial sums into one vector holding their W sums (log2(W) levels of two shuffles and an
// add per pair), instead of one horizontal sum (log2(W) shuffles and adds) per vector. Used by
// the dot products of the fp32 and bf16 register tiles (rank_products.cpp, bf16_products.cpp).
// Internal linkage: each file compiles them for its own instruction set.
#pragma once
#include <cstdint>

#define LOR2C_LANES_INLINE inline __attribute__((always_inline))

namespace lor2c {
namespace cpu {
namespace {

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
};

// One level of the tree: a and b hold groups of 2H lanes, each the partial sums of one input;
// the result holds groups of H lanes: group 2g is a's group g folded in half, 2g + 1 is b's.
template <int W, int H>
LOR2C_LANES_INLINE typename Vec<W>::f fold(typename Vec<W>::f a, typename Vec<W>::f b) {
  typename Vec<W>::i lo, hi;
  for (int l = 0; l < W; ++l) {
    const int group = l / H, src = (group % 2) * W + (group / 2) * 2 * H + l % H;
    lo[l] = src;
    hi[l] = src + H;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

template <int W, int H>
LOR2C_LANES_INLINE void fold_levels(typename Vec<W>::f* v, int count) {
#pragma GCC unroll 16
  for (int i = 0; i < count / 2; ++i) v[i] = fold<W, H>(v[2 * i], v[2 * i + 1]);
  if constexpr (H > 1) fold_levels<W, H / 2>(v, count / 2);
}

// The tree leaves input i in lane bitrev(i): storing input i at position bitrev(i) puts the sum
// of input l in lane l.
constexpr int bitrev(int i, int w) {
  int r = 0;
  for (int b = 1; b < w; b <<= 1) {
    r = (r << 1) | (i & 1);
    i >>= 1;
  }
  return r;
}

}  // namespace
}  // namespace cpu
}  // namespace lor2c
