// DCFT CUDA kernels (docs/math.md section 4) and their launchers, raw pointers only, no torch; see
// dcft_kernels.h for the decomposition. Element conversion, the dropout parameters and the dtype
// dispatch are the LoR2C kernels' (common.cuh).
//
// Row kernels: each warp owns kWarpRows rows. Lanes stride over the columns in groups of four,
// each lane accumulating RCH rank components for every row it owns; a warp reduction finishes the
// dot products. One Philox call gives the dropout draws of eight adjacent columns (csrc/philox.h),
// so lanes 2k and 2k+1, which hold the two halves of such a group, share the calls: each draws
// half of the warp's rows and they swap keep flags (dropout_pair_keep8). The small per-row
// products (T @ Ck, V @ Ck.T) go through shared memory, then lanes stride over the columns again
// to expand with Be or Ae. The weight-gradient kernel gives each thread four adjacent columns and
// a range of rows (a split), and accumulates rank x 4 sums in registers (lane pairs share the
// Philox calls of two rows at a time); partials per split are reduced by the binding. Everything
// accumulates in fp32; row offsets are 64-bit.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "dcft_kernels.h"

namespace lor2c {
namespace cuda {
namespace {

constexpr int kWarpRows = 4;  // rows per warp in the row kernels
constexpr int kMaxWarps = 8;  // warps per block in the row kernels
constexpr int kOuterThreads = 128;
constexpr size_t kSharedLimit = 48 * 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// keep[rr] = the keep flags (bits 0..3; 0xF without dropout) of columns 4 * grp .. 4 * grp + 3
// of row row0 + rr, rr < kWarpRows (rows >= nr: not drawn). grp has the lane's parity, so lanes
// 2k and 2k+1 hold the two halves of the 8-column Philox group grp / 2 and share its calls
// (dropout_pair_keep8): the even lane draws rows rr, the odd lane rows rr + 1. The whole warp
// must call it together.
__device__ __forceinline__ void keep4_rows(const DropoutParams& dp, int64_t row0, int nr,
                                           int64_t grp, int64_t d, unsigned keep[kWarpRows]) {
  static_assert(kWarpRows % 2 == 0, "rows are drawn in pairs");
  const int half = static_cast<int>(grp & 1);
#pragma unroll
  for (int rr = 0; rr < kWarpRows; rr += 2) {
    unsigned keep8[2] = {0xFFu, 0xFFu};
    if (dp.enabled) {  // uniform
      const int mine = rr + half;
      dropout_pair_keep8(dp, mine < nr && (grp >> 1) * 8 < d, row0 + mine, grp >> 1, keep8);
    }
    keep[rr] = (keep8[0] >> (4 * half)) & 0xFu;
    keep[rr + 1] = (keep8[1] >> (4 * half)) & 0xFu;
  }
}

// The multiplier of column q (< 4) of a group with keep flags `keep`: 1 without dropout.
__device__ __forceinline__ float keep_mult(const DropoutParams& dp, unsigned keep, int q) {
  return dp.enabled ? (((keep >> q) & 1u) ? dp.inv_keep : 0.f) : 1.f;
}

// sums[rr * rk + R0 + R] = sum over columns c of W[(R0 + R) * d + c] * v(rr, c), R < RCH, for the
// warp's rows; v(rr, c) = rows[(row0 + rr) * ld + c] * mask. Result in shared memory `sums`.
// The whole warp must call it together.
template <typename T, int RCH>
__device__ __forceinline__ void warp_project(const T* __restrict__ rows, int64_t ld, int64_t row0,
                                             int nr, const float* __restrict__ W, int64_t d, int rk,
                                             const DropoutParams& dp, int lane, float* sums) {
  for (int R0 = 0; R0 < rk; R0 += RCH) {
    float acc[kWarpRows][RCH];
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr)
#pragma unroll
      for (int R = 0; R < RCH; ++R) acc[rr][R] = 0.f;
    for (int64_t base = 0; base * 4 < d; base += 32) {  // uniform trip count: keep4_rows
      const int64_t grp = base + lane;
      unsigned keep[kWarpRows];
      keep4_rows(dp, row0, nr, grp, d, keep);
      float v[kWarpRows][4];
#pragma unroll
      for (int rr = 0; rr < kWarpRows; ++rr) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t c = grp * 4 + q;
          v[rr][q] = (rr < nr && c < d)
                         ? to_float(rows[(row0 + rr) * ld + c]) * keep_mult(dp, keep[rr], q)
                         : 0.f;
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t c = grp * 4 + q;
        if (c >= d) break;
#pragma unroll
        for (int R = 0; R < RCH; ++R) {
          if (R0 + R < rk) {
            const float w = W[(R0 + R) * d + c];
#pragma unroll
            for (int rr = 0; rr < kWarpRows; ++rr) acc[rr][R] += w * v[rr][q];
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr)
#pragma unroll
      for (int R = 0; R < RCH; ++R) {
        const float total = warp_sum(acc[rr][R]);
        if (lane == 0 && R0 + R < rk) sums[rr * rk + R0 + R] = total;
      }
  }
}

template <typename T, int RCH>
__global__ void __launch_bounds__(kMaxWarps * 32)
    dcft_forward_rows_kernel(const T* __restrict__ x, int64_t ldx, const float* __restrict__ bias,
                             const float* __restrict__ Ae, const float* __restrict__ Ck,
                             const float* __restrict__ Be, T* __restrict__ out,
                             float* __restrict__ Tsave, int64_t n, int64_t d_in, int64_t d_out,
                             int rk, float scale, DropoutArgs dp) {
  extern __shared__ float smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sT = smem + static_cast<int64_t>(warp) * 2 * kWarpRows * rk;
  float* sU = sT + kWarpRows * rk;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * warps + warp) * kWarpRows;
  if (row0 >= n) return;  // the whole warp leaves together; the kernel has no block barriers
  const int nr = static_cast<int>(n - row0 < kWarpRows ? n - row0 : kWarpRows);
  const DropoutParams params = load_dropout(dp);

  warp_project<T, RCH>(x, ldx, row0, nr, Ae, d_in, rk, params, lane, sT);  // T = xd @ Ae.T
  __syncwarp();
  for (int idx = lane; idx < kWarpRows * rk; idx += 32) {  // U = s * T @ Ck
    const int rr = idx / rk, R = idx % rk;
    float u = 0.f;
    for (int Q = 0; Q < rk; ++Q) u += sT[rr * rk + Q] * Ck[Q * rk + R];
    sU[idx] = scale * u;
    if (rr < nr) Tsave[(row0 + rr) * rk + R] = sT[idx];
  }
  __syncwarp();
  for (int64_t c = lane; c < d_out; c += 32) {  // out = bias + U @ Be
    const float b = bias ? bias[c] : 0.f;
    float y[kWarpRows];
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr) y[rr] = b;
    for (int R = 0; R < rk; ++R) {
      const float w = Be[R * d_out + c];
#pragma unroll
      for (int rr = 0; rr < kWarpRows; ++rr) y[rr] += sU[rr * rk + R] * w;
    }
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr)
      if (rr < nr) out[(row0 + rr) * d_out + c] = from_float<T>(y[rr]);
  }
}

template <typename T, int RCH>
__global__ void __launch_bounds__(kMaxWarps * 32)
    dcft_backward_rows_kernel(const T* __restrict__ g, int64_t ldg, const float* __restrict__ Ae,
                              const float* __restrict__ Ck, const float* __restrict__ Be,
                              float* __restrict__ Vsave, float* __restrict__ dTsave,
                              T* __restrict__ dx, int64_t n, int64_t d_in, int64_t d_out, int rk,
                              float scale, DropoutArgs dp) {
  extern __shared__ float smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sV = smem + static_cast<int64_t>(warp) * 2 * kWarpRows * rk;
  float* sD = sV + kWarpRows * rk;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * warps + warp) * kWarpRows;
  if (row0 >= n) return;
  const int nr = static_cast<int>(n - row0 < kWarpRows ? n - row0 : kWarpRows);
  const DropoutParams params = load_dropout(dp);
  const DropoutParams none{};  // not enabled

  warp_project<T, RCH>(g, ldg, row0, nr, Be, d_out, rk, none, lane, sV);  // V = g @ Be.T
  __syncwarp();
  for (int idx = lane; idx < kWarpRows * rk; idx += 32) {  // dT = s * V @ Ck.T
    const int rr = idx / rk, R = idx % rk;
    float v = 0.f;
    for (int Q = 0; Q < rk; ++Q) v += sV[rr * rk + Q] * Ck[R * rk + Q];
    sD[idx] = scale * v;
    if (rr < nr) {
      Vsave[(row0 + rr) * rk + R] = sV[idx];
      dTsave[(row0 + rr) * rk + R] = scale * v;
    }
  }
  __syncwarp();
  if (dx == nullptr) return;
  for (int64_t base = 0; base * 4 < d_in; base += 32) {  // dx = (dT @ Ae) * mask
    const int64_t grp = base + lane;                     // uniform trip count: keep4_rows
    unsigned keep[kWarpRows];
    keep4_rows(params, row0, nr, grp, d_in, keep);
#pragma unroll
    for (int rr = 0; rr < kWarpRows; ++rr) {
      if (rr >= nr) break;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t c = grp * 4 + q;
        if (c >= d_in) break;
        float acc = 0.f;
        for (int R = 0; R < rk; ++R) acc += sD[rr * rk + R] * Ae[R * d_in + c];
        dx[(row0 + rr) * d_in + c] = from_float<T>(acc * keep_mult(params, keep[rr], q));
      }
    }
  }
}

template <typename T, int RCH>
__global__ void __launch_bounds__(kOuterThreads)
    dcft_outer_partials_kernel(const T* __restrict__ rows, int64_t ld,
                               const float* __restrict__ coef, float* __restrict__ P, int64_t n,
                               int64_t d, int rk, int64_t rows_per_split, DropoutArgs dp) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * rows_per_split;
  const int64_t end = begin + rows_per_split < n ? begin + rows_per_split : n;
  // No barriers below; whole warps past d leave, the others stay together for the shuffles.
  if ((grp & ~int64_t{31}) * 4 >= d) return;
  const DropoutParams params = load_dropout(dp);
  const int half = static_cast<int>(grp & 1);
  for (int R0 = 0; R0 < rk; R0 += RCH) {
    float acc[RCH][4];
#pragma unroll
    for (int R = 0; R < RCH; ++R)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[R][q] = 0.f;
    for (int64_t i0 = begin; i0 < end; i0 += 2) {
      // Rows i0 and i0 + 1: lanes 2k and 2k+1 hold the halves of one 8-column Philox group and
      // share its calls (dropout_pair_keep8), the even lane drawing row i0, the odd one i0 + 1.
      unsigned keep8[2] = {0xFFu, 0xFFu};
      if (params.enabled)
        dropout_pair_keep8(params, i0 + half < end && (grp >> 1) * 8 < d, i0 + half, grp >> 1,
                           keep8);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = i0 + h;
        if (i >= end) break;
        const unsigned keep = (keep8[h] >> (4 * half)) & 0xFu;
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t c = grp * 4 + q;
          v[q] = c < d ? to_float(rows[i * ld + c]) * keep_mult(params, keep, q) : 0.f;
        }
#pragma unroll
        for (int R = 0; R < RCH; ++R) {
          const float cf = R0 + R < rk ? coef[i * rk + R0 + R] : 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[R][q] += cf * v[q];
        }
      }
    }
#pragma unroll
    for (int R = 0; R < RCH; ++R) {
      if (R0 + R >= rk) break;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t c = grp * 4 + q;
        if (c < d) P[(split * rk + R0 + R) * d + c] = acc[R][q];
      }
    }
  }
}

// Warps per block of the row kernels: as many as fit the shared memory, at most kMaxWarps.
int row_warps(int64_t rk) {
  const size_t per_warp = 2 * kWarpRows * static_cast<size_t>(rk) * sizeof(float);
  int warps = static_cast<int>(kSharedLimit / per_warp);
  return warps > kMaxWarps ? kMaxWarps : (warps < 1 ? 1 : warps);
}

// Calls body(T{}, RCH) with the activation type and the rank chunk for rk.
template <typename F>
cudaError_t dispatch(DType act, int64_t rk, F&& body) {
  return dispatch_dtype(act, [&](auto tag) -> cudaError_t {
    if (rk <= 2) return body(tag, std::integral_constant<int, 2>{});
    if (rk <= 4) return body(tag, std::integral_constant<int, 4>{});
    if (rk <= 8) return body(tag, std::integral_constant<int, 8>{});
    return body(tag, std::integral_constant<int, 16>{});
  });
}

}  // namespace

int64_t dcft_outer_column_blocks(int64_t d) {
  const int64_t groups = (d + 3) / 4;
  return (groups + kOuterThreads - 1) / kOuterThreads;
}

cudaError_t dcft_forward_rows(DType act, const void* x, int64_t ldx, const float* bias,
                              const float* Ae, const float* Ck, const float* Be, void* out,
                              float* T, int64_t n, int64_t d_in, int64_t d_out, int64_t rk,
                              float scale, DropoutArgs dp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (rk < 1 || rk > kDcftMaxRank) return cudaErrorInvalidValue;
  const int warps = row_warps(rk);
  const int64_t rows_per_block = static_cast<int64_t>(warps) * kWarpRows;
  const dim3 grid(static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block));
  const size_t shared = static_cast<size_t>(warps) * 2 * kWarpRows * rk * sizeof(float);
  return dispatch(act, rk, [&](auto tag, auto rch) -> cudaError_t {
    using Tp = decltype(tag);
    dcft_forward_rows_kernel<Tp, decltype(rch)::value><<<grid, warps * 32, shared, stream>>>(
        static_cast<const Tp*>(x), ldx, bias, Ae, Ck, Be, static_cast<Tp*>(out), T, n, d_in, d_out,
        static_cast<int>(rk), scale, dp);
    return cudaGetLastError();
  });
}

cudaError_t dcft_backward_rows(DType act, const void* g, int64_t ldg, const float* Ae,
                               const float* Ck, const float* Be, float* V, float* dT, void* dx,
                               int64_t n, int64_t d_in, int64_t d_out, int64_t rk, float scale,
                               DropoutArgs dp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (rk < 1 || rk > kDcftMaxRank) return cudaErrorInvalidValue;
  const int warps = row_warps(rk);
  const int64_t rows_per_block = static_cast<int64_t>(warps) * kWarpRows;
  const dim3 grid(static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block));
  const size_t shared = static_cast<size_t>(warps) * 2 * kWarpRows * rk * sizeof(float);
  return dispatch(act, rk, [&](auto tag, auto rch) -> cudaError_t {
    using Tp = decltype(tag);
    dcft_backward_rows_kernel<Tp, decltype(rch)::value><<<grid, warps * 32, shared, stream>>>(
        static_cast<const Tp*>(g), ldg, Ae, Ck, Be, V, dT, static_cast<Tp*>(dx), n, d_in, d_out,
        static_cast<int>(rk), scale, dp);
    return cudaGetLastError();
  });
}

cudaError_t dcft_outer_partials(DType act, const void* rows, int64_t ld, const float* coef,
                                float* P, int64_t n, int64_t d, int64_t rk, int64_t splits,
                                int64_t rows_per_split, DropoutArgs dp, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  if (rk < 1 || splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(dcft_outer_column_blocks(d)),
                  static_cast<unsigned>(splits));
  return dispatch(act, rk, [&](auto tag, auto rch) -> cudaError_t {
    using Tp = decltype(tag);
    dcft_outer_partials_kernel<Tp, decltype(rch)::value><<<grid, kOuterThreads, 0, stream>>>(
        static_cast<const Tp*>(rows), ld, coef, P, n, d, static_cast<int>(rk), rows_per_split, dp);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lor2c
