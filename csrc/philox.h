// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU and CUDA kernels; lor2c_ops/triton/philox.py and lor2c_ops/ref/philox.py
// implement the same function so every backend draws the same dropout mask.
//
// Mask convention (normative for every backend; this is the one place that states it):
// for element (row i, column j) of x viewed as (n, d_in),
//   counter = (j >> 3, i, offset_lo, offset_hi), key = (seed_lo, seed_hi),
// where (seed, offset) are the two int64 values of the op's seed tensor, each split into its low
// and high 32 bits. Philox4x32-10 gives four 32-bit words o[0..3]; the element's draw is the
// 16-bit value
//   draw = (o[(j >> 1) & 3] >> (16 * (j & 1))) & 0xFFFF,
// i.e. word (j & 7) >> 1, its low half for even j and its high half for odd j: one Philox call
// gives the draws of the 8 adjacent columns 8g .. 8g + 7 (column 8g + 2w + h <- half h of word w).
// The element is kept iff draw >= threshold, with threshold = floor(p * 65536) (at most 65535,
// since p < 1). Kept elements are scaled by 1 / (1 - p) (fp32).
// Earlier versions drew 32 bits per element (one call per 4 columns, threshold floor(p * 2^32)),
// so their masks differ from these for the same seed.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LOR2C_HD __host__ __device__ __forceinline__
#else
#define LOR2C_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define LOR2C_UNROLL _Pragma("unroll")
#else
#define LOR2C_UNROLL
#endif

namespace lor2c {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Columns whose draws one Philox call gives (the convention above).
constexpr int kDropoutGroup = 8;

LOR2C_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// In place: c[0..3] <- Philox4x32-10(counter = c, key = (k0, k1)).
LOR2C_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  LOR2C_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c[0]);
    const uint32_t lo0 = kPhiloxM0 * c[0];
    const uint32_t hi1 = mulhi32(kPhiloxM1, c[2]);
    const uint32_t lo1 = kPhiloxM1 * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0;
    const uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The per-call dropout parameters: threshold and 1/(1-p) decoded once on the host
// (dropout_params in lor2c_common.h), key and offset from the seed tensor's values
// (dropout_seed; the CUDA kernels read those on the device).
struct DropoutParams {
  uint32_t key0, key1;  // seed
  uint32_t off0, off1;  // offset
  uint32_t threshold;   // 16-bit: keep iff draw >= threshold
  float inv_keep;       // 1 / (1 - p)
  bool enabled;         // p > 0
};

// threshold = floor(p * 65536) for 0 <= p < 1, at most 65535. The one C++ definition
// (lor2c_ops/ref/philox.py: dropout_threshold is the Python one).
inline uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0u;
  const double t = p * 65536.0;  // exact (a power-of-two scaling); truncation is floor here
  return t >= 65535.0 ? 0xFFFFu : static_cast<uint32_t>(t);
}

// Key and offset words from the seed tensor's values (seed, offset): low word first.
LOR2C_HD void dropout_seed(DropoutParams& dp, int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(offset);
  dp.key0 = static_cast<uint32_t>(s);
  dp.key1 = static_cast<uint32_t>(s >> 32);
  dp.off0 = static_cast<uint32_t>(o);
  dp.off1 = static_cast<uint32_t>(o >> 32);
}

// Bit b (b < 8) set iff column 8*group + b is kept, given the group's Philox output o.
LOR2C_HD unsigned dropout_keep_bits(const uint32_t o[4], uint32_t threshold) {
  unsigned bits = 0;
  LOR2C_UNROLL
  for (int b = 0; b < kDropoutGroup; ++b) {
    const uint32_t draw = (o[b >> 1] >> (16 * (b & 1))) & 0xFFFFu;
    bits |= (draw >= threshold ? 1u : 0u) << b;
  }
  return bits;
}

// The multipliers (0 or inv_keep) of columns 8*group .. 8*group + 7 of `row` into m[0..7], with
// one Philox call; returns their keep flags as bits 0..7. Ignores dp.enabled (callers check it).
LOR2C_HD unsigned dropout_keep8(const DropoutParams& dp, int64_t row, int64_t group, float m[8]) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(row), dp.off0, dp.off1};
  philox4x32_10(c, dp.key0, dp.key1);
  const unsigned bits = dropout_keep_bits(c, dp.threshold);
  LOR2C_UNROLL
  for (int b = 0; b < kDropoutGroup; ++b) m[b] = (bits >> b) & 1u ? dp.inv_keep : 0.f;
  return bits;
}

#if defined(__CUDACC__)
// For CUDA kernels whose threads hold 4 columns each: lanes 2k and 2k+1 of a warp share two
// Philox calls (two 8-column draws, "slots" 0 and 1, each agreed on by both lanes). The even lane
// draws slot 0 and the odd lane slot 1, each passing its own slot's (row, group) and whether it
// is needed (else its bits read as all kept); keep8[s] receives slot s's keep bits in both lanes.
// So a call serves 8 columns, as on the CPU. All 32 lanes must call it together.
__device__ __forceinline__ void dropout_pair_keep8(const DropoutParams& dp, bool need, int64_t row,
                                                   int64_t group, unsigned keep8[2]) {
  unsigned mine = 0xFFu;
  if (need) {
    float m[8];
    mine = dropout_keep8(dp, row, group, m);
  }
  const unsigned other = __shfl_xor_sync(0xffffffffu, mine, 1);
  const bool odd = (threadIdx.x & 1u) != 0;
  keep8[0] = odd ? other : mine;
  keep8[1] = odd ? mine : other;
}
#endif

}  // namespace lor2c
