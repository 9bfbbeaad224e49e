// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU and CUDA kernels; lor2c_ops/triton/philox.py and lor2c_ops/ref/philox.py
// implement the same function so every backend draws the same dropout mask.
//
// Mask convention (normative for every backend): for element (row i, column j) of x viewed as
// (n, d_in), counter = (j >> 2, i, offset_lo, offset_hi), key = (seed_lo, seed_hi); of the four
// outputs take number (j & 3); the element is kept iff that output >= threshold, where
// threshold = floor(p * 2^32). Kept elements are scaled by 1 / (1 - p).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LOR2C_HD __host__ __device__ __forceinline__
#else
#define LOR2C_HD inline
#endif

namespace lor2c {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

LOR2C_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// In place: c[0..3] <- Philox4x32-10(counter = c, key = (k0, k1)).
LOR2C_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
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

// The per-call dropout parameters, decoded once on the host from the op's seed tensor.
struct DropoutParams {
  uint32_t key0, key1;   // seed
  uint32_t off0, off1;   // offset
  uint32_t threshold;    // keep iff draw >= threshold
  float inv_keep;        // 1 / (1 - p)
  bool enabled;          // p > 0
};

}  // namespace lor2c
