// The parameters of the three LoR2C kernels, one struct per kernel shared by the CUDA-core
// kernels (lor2c_fwd.cu, lor2c_bwd.cu) and their tensor-core variants (lor2c_mma.cuh), and one
// function per kernel that fills its struct from the launchers' arguments (FwdArgs, BwdArgs:
// lor2c_kernels.h). The launchers of both kinds and the host check of the tensor-core kernels
// (scripts/cuda_host_check/) fill them through these functions. Passed to the kernels by value.
// No torch.
#pragma once
#include <cstdint>

#include "common.cuh"
#include "lor2c_kernels.h"
#include "lor2c_multi_plan.cuh"
#include "lor2c_products.cuh"

namespace lor2c {
namespace cuda {

// Elements per vector access of activation rows: the CUDA-core kernels move 4, the tensor-core
// kernels 8 (16 bytes of their 16-bit activations). The vec_* flags below hold when a row can be
// accessed that way (vec_ok).
constexpr int kLanes = 4;
constexpr int kMmaLanes = 8;

template <typename T, typename W>
struct FwdParams {
  const T* x;
  int64_t ldx;
  const T* lo;
  int64_t ldl;
  const W* A;
  const W* B;
  T* out;
  int64_t ldo;
  float* t;
  int64_t n, d_in, d_out, r;
  float scale;
  DropoutArgs dropout;
  bool vec_x, vec_lo, vec_out;
  MultiTable multi;  // MULTI only: A and B are the banks (G, r, d_in) and (G, d_out, r)
};

// Backward kernel 1 (reads grad).
template <typename T, typename W>
struct BwdGParams {
  const T* g;
  int64_t ldg;
  const W* B;  // MULTI: the bank (G, d_out, r)
  const float* t;
  float* u;      // (n, r) fp32; null when !need_u
  float* ws_dB;  // (g_splits, r, d_out) fp32 partial sums of dB.T; null when !need_dB
  int64_t n, d_out, r;
  int64_t rows;     // rows per shared-memory range, a multiple of kSub (CUDA-core: = range_rows)
  int64_t range0;   // plain op: block b handles row range range0 + b
  bool accumulate;  // add the dB.T partials to ws_dB (waves after the first) instead of storing
  bool need_u, need_dB, vec_g;
  MultiTable multi;    // MULTI only: units of multi.rows rows (a multiple of `rows`)
  int64_t range_rows;  // rows per block range (the plan's g_rows), a multiple of `rows`
};

// Backward kernel 2 (reads x).
template <typename T, typename W>
struct BwdXParams {
  const T* x;
  int64_t ldx;
  const W* A;  // MULTI: the bank (G, r, d_in)
  const float* u;
  T* dx;         // (n, d_in) contiguous; null when !do_dx
  float* ws_dA;  // (splits, r, d_in) fp32 partial sums of dA; null when !do_dA
  int64_t n, d_in, r;
  int64_t rows;  // rows per block (the plan's x_rows; a last step may be partial)
  float scale;
  DropoutArgs dropout;
  bool do_dx, do_dA, vec_x, vec_dx;
  MultiTable multi;  // MULTI only: units of `rows` rows
};

// ---- the rows of a block, in the kernels of both kinds -----------------------------------------
// Forward: block blockIdx.x takes BM of the n rows; MULTI: unit blockIdx.x of `multi`, with its
// row indices staged in ridx[BM] and A, B moved to its adapter's bank rows. False when the block
// has no unit (MULTI; uniform over the block). The sizes come as scalars: with the whole FwdParams
// the compiler addressed the kernels' parameters differently (same PTX as before this helper).
template <int BM, bool MULTI, typename W>
__device__ __forceinline__ bool fwd_block_rows(const MultiTable& multi, int64_t n, int64_t r,
                                               int64_t d_in, int64_t d_out, int64_t* ridx,
                                               const W*& A, const W*& B, Rows<MULTI>& rows) {
  if constexpr (MULTI) {
    Unit u;
    if (!find_unit(multi, blockIdx.x, u)) return false;
    A += u.adapter * r * d_in;
    B += u.adapter * d_out * r;
    for (int l = threadIdx.x; l < BM; l += kThreads)
      ridx[l] = l < u.count ? multi.order[u.pos0 + l] : -1;
    __syncthreads();
    rows = {ridx, 0, u.count};
  } else {
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    rows = {nullptr, row0, n - row0 < BM ? n - row0 : BM};
  }
  return true;
}

// Kernel 2: split(A, rows, count, slice) for the rows of block blockIdx.y (p.rows of them, dA
// slice blockIdx.y); MULTI: for units blockIdx.y, blockIdx.y + gridDim.y, ... of p.multi, A at the
// unit's adapter, dA slice b for unit b.
template <bool MULTI, typename T, typename W, typename Split>
__device__ __forceinline__ void x_block_rows(const BwdXParams<T, W>& p, Split&& split) {
  if constexpr (MULTI) {
    for (int64_t b = blockIdx.y;; b += gridDim.y) {
      Unit u;
      if (!find_unit(p.multi, b, u)) return;  // uniform over the block
      if (b != blockIdx.y) __syncthreads();   // shared memory of the previous unit is free
      split(p.A + u.adapter * p.r * p.d_in, Rows<true>{p.multi.order, u.pos0, u.count}, u.count, b);
    }
  } else {
    const int64_t row0 = static_cast<int64_t>(blockIdx.y) * p.rows;
    const int64_t nrows = p.rows < p.n - row0 ? p.rows : p.n - row0;
    split(p.A, Rows<false>{nullptr, row0, nrows}, nrows, static_cast<int64_t>(blockIdx.y));
  }
}

template <typename T, typename W>
FwdParams<T, W> fwd_params(const FwdArgs& a, const MultiTable& multi, int lanes) {
  FwdParams<T, W> p;
  p.x = static_cast<const T*>(a.x);
  p.ldx = a.ldx;
  p.lo = static_cast<const T*>(a.layer_out);
  p.ldl = a.ldl;
  p.A = static_cast<const W*>(a.A);
  p.B = static_cast<const W*>(a.B);
  p.out = static_cast<T*>(a.out);
  p.ldo = a.d_out;
  p.t = a.t;
  p.n = a.n;
  p.d_in = a.d_in;
  p.d_out = a.d_out;
  p.r = a.r;
  p.scale = a.scale;
  p.dropout = a.dropout;
  p.vec_x = vec_ok(a.x, a.ldx, sizeof(T), lanes);
  p.vec_lo = vec_ok(a.layer_out, a.ldl, sizeof(T), lanes);
  p.vec_out = vec_ok(a.out, a.d_out, sizeof(T), lanes);
  p.multi = multi;
  return p;
}

// Kernel 1 over ranges of `rows` rows (the launcher sets range0 / accumulate per wave, and the
// tensor-core launcher a smaller shared-memory range `rows`); u is written when need_u, the dB.T
// partials into ws_dB when need_dB.
template <typename T, typename W>
BwdGParams<T, W> g_params(const BwdArgs& a, int64_t rows, const MultiTable& multi, bool need_u,
                          bool need_dB, float* u, float* ws_dB, int lanes) {
  BwdGParams<T, W> p;
  p.g = static_cast<const T*>(a.grad);
  p.ldg = a.ldg;
  p.B = static_cast<const W*>(a.B);
  p.t = a.t;
  p.u = need_u ? u : nullptr;
  p.ws_dB = need_dB ? ws_dB : nullptr;
  p.n = a.n;
  p.d_out = a.d_out;
  p.r = a.r;
  p.rows = rows;
  p.range0 = 0;
  p.accumulate = false;
  p.need_u = need_u;
  p.need_dB = need_dB;
  p.vec_g = vec_ok(a.grad, a.ldg, sizeof(T), lanes);
  p.multi = multi;
  p.range_rows = rows;
  return p;
}

// Kernel 2 over blocks of `rows` rows: dx when a.need_dx, the dA partials into ws_dA when
// a.need_dA.
template <typename T, typename W>
BwdXParams<T, W> x_params(const BwdArgs& a, int64_t rows, const MultiTable& multi, const float* u,
                          float* ws_dA, int lanes) {
  BwdXParams<T, W> p;
  p.x = static_cast<const T*>(a.x);
  p.ldx = a.ldx;
  p.A = static_cast<const W*>(a.A);
  p.u = u;
  p.dx = a.need_dx ? static_cast<T*>(a.dx) : nullptr;
  p.ws_dA = a.need_dA ? ws_dA : nullptr;
  p.n = a.n;
  p.d_in = a.d_in;
  p.r = a.r;
  p.rows = rows;
  p.scale = a.scale;
  p.dropout = a.dropout;
  p.do_dx = a.need_dx;
  p.do_dA = a.need_dA;
  p.vec_x = vec_ok(a.x, a.ldx, sizeof(T), lanes);
  p.vec_dx = vec_ok(a.dx, a.d_in, sizeof(T), lanes);
  p.multi = multi;
  return p;
}

#if defined(__CUDACC__)
// Enqueues kernel<<<grid, kThreads, smem, stream>>>(p), opted in to `smem` bytes of dynamic shared
// memory first; the launch status.
template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                          const Params& p) {
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, dim3(kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace lor2c
