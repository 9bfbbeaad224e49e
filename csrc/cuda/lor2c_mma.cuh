// The tensor-core (WMMA) variants of the three LoR2C kernels, for fp16 / bf16 activations:
//   lor2c_fwd_mma_kernel    t = dropout(x) @ A.T, out = layer_out + s * t @ B.T
//   lor2c_bwd_g_mma_kernel  u = grad @ B and the per-split partial dB.T = t.T @ grad
//   lor2c_bwd_x_mma_kernel  dx = s * (u @ A) * mask and the per-split partial dA = u.T @ (x*mask)
// They are drop-in replacements of lor2c_fwd_kernel / lor2c_bwd_g_kernel / lor2c_bwd_x_kernel:
// same grids, same row maps (Rows<GATHER>, multi-adapter units), same workspace layout, same
// deterministic reduction (lor2c_reduce_kernel) after them. Only the block-level products and the
// shared-memory layouts differ. The launchers (lor2c_fwd.cu, lor2c_bwd.cu) pick them when
// LOR2C_CUDA_MMA=1 (lor2c_mma_enabled in lor2c_kernels.h) and the activations are fp16 / bf16.
//
// Products: nvcuda::wmma m16n16k16 with fp32 accumulation; every fragment is loaded from and
// stored to shared memory (no register-layout assumptions). Operands, as in the Triton kernels
// (lor2c_ops/triton/lor2c.py):
//   - activation tiles (x * keep, grad) are fed in their own dtype T: exact (keep is 0/1, the
//     1/(1-p) is applied to the fp32 results);
//   - weights in T are fed as they are; fp32 weights are split into T hi + lo (two products);
//   - t and u (fp32) against activations: split into T hi + lo (two products);
//   - t and u against weights (out and dx): both split into bf16 hi + lo (bf16 has fp32's range)
//     and three products hi.hi + lo.hi + hi.lo (two when the weights are bf16: lo = 0).
// Tiles: 16-bit tiles have a row stride of (columns + 8) elements and fp32 tiles (columns + 4),
// so that 16-row fragment loads hit distinct banks; every fragment pointer is 32-byte aligned
// (rows multiples of 16, columns multiples of 16, region offsets multiples of 128 bytes).
// Shapes that are not multiples of 16 are zero-padded in shared memory: rank tiles are 16/32/64
// (r > 64: chunks of 64), activations are staged in 128-column tiles with zeros past d.
//
// Every kernel runs kThreads = 256 threads (8 warps). nvcc only (the host check in
// scripts/cuda_host_check/ compiles this header with g++ against a scalar stand-in of
// nvcuda::wmma and an emulator of the CUDA threads); no torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <mma.h>
#endif

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "lor2c_multi_plan.cuh"
#include "lor2c_params.cuh"
#include "lor2c_products.cuh"

// The dynamic shared memory of a kernel, as bytes, 128-byte aligned (wmma needs 32-byte aligned
// tile pointers; the regions below start at multiples of 128 bytes). The host check provides
// its own.
#if !defined(LOR2C_DYNAMIC_SMEM)
#define LOR2C_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace lor2c {
namespace cuda {

namespace wmma = nvcuda::wmma;

constexpr int kMmaPadH = 8;                // 16-bit elements of padding per shared-memory row
constexpr int kMmaPadF = 4;                // fp32 elements of padding per shared-memory row
constexpr int kMmaLdh = kTile + kMmaPadH;  // 136: a 128-column tile of 16-bit elements
constexpr int kMmaLdf = kTile + kMmaPadF;  // 132: a 128-column tile of fp32
constexpr int kMmaSub = 64;                // rows per step of the grad kernel (= kSub)
constexpr int kMmaSubX = 32;  // rows per step of the x kernel (64: 600 B of spills at RT = 64)
static_assert(kMmaSub == kSub, "the plans count kernel-1 rows in these steps");

// The rank tile of the tensor-core kernels: 16, 32 or 64 (r > 64: chunks of 64).
inline int mma_rank_tile(int64_t r) {
  const int rt = rank_tile(r);
  return rt < 16 ? 16 : rt;
}

constexpr size_t align128(size_t b) { return (b + 127) / 128 * 128; }
constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

using Bf16 = __nv_bfloat16;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename S, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, S, Layout>;
template <typename S, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, S, Layout>;
using RowMajor = wmma::row_major;
using ColMajor = wmma::col_major;

// ---- operand conversion ------------------------------------------------------------------------
// v = hi + lo, hi = v rounded to S, lo = the rest rounded to S (about twice S's mantissa bits).
// When the rest is not finite (v inf or NaN, or hi past S's range) lo is 0, so that an inf stays
// an inf instead of becoming NaN through inf - inf.
template <typename S>
__device__ __forceinline__ void split2(float v, S& hi, S& lo) {
  hi = from_float<S>(v);
  const float rest = v - to_float(hi);
  lo = from_float<S>(fabsf(rest) <= FLT_MAX ? rest : 0.f);
}

// Weight w into the S operand tiles hi (and lo, unless W is S: then hi alone is exact).
template <typename S, typename W>
__device__ __forceinline__ void stage_w(S* hi, S* lo, int idx, W w) {
  if constexpr (std::is_same<W, S>::value) {
    hi[idx] = w;
  } else {
    split2(to_float(w), hi[idx], lo[idx]);
  }
}

// ---- activation tile staging, 16-bit, 128 columns ---------------------------------------------
// A ROWS x 128 tile of a row-major (n, d) activation of dtype T, moved global -> registers ->
// shared memory (still T, row stride kMmaLdh). Thread tid owns the 8-column groups tid, tid + 256,
// ... in row-major order (16-byte loads, consecutive threads on consecutive groups). Dropout: one
// Philox call per group (8 columns, csrc/philox.h); a dropped element is stored as x * 0 (so a NaN
// or inf in x still gives NaN, as on the CUDA-core path), a kept one as x: exact in T. The
// 1 / (1 - p) is the caller's, on the fp32 results.
template <typename T, int ROWS>
struct TileIO8 : TileRegs<T, ROWS, kTile, 8> {
  using Regs = TileRegs<T, ROWS, kTile, 8>;
  using Regs::kGroups;
  using Regs::kGroupsPerRow;
  using Regs::reg;

  // Writes the tile to S; when `bits` is not null, bits[row * 16 + group] receives the group's
  // keep flags (bit c: column 8 * group + c). col0 must be a multiple of 8.
  template <typename RowMap>
  __device__ __forceinline__ void store(T* S, const RowMap& rows, int64_t l0, int64_t col0,
                                        int64_t d, const DropoutParams& dp, uint8_t* bits) const {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      const int g = static_cast<int>(threadIdx.x) + q * kThreads;
      const int row = g / kGroupsPerRow, grp = g % kGroupsPerRow;
      unsigned keep = 0xFFu;
      Vec8<T> w = reg[q];
      if (dp.enabled) {  // uniform over the block
        const int64_t i = rows(l0 + row);
        const int64_t j = col0 + 8 * grp;
        if (i >= 0 && j < d) {
          float m[8];
          keep = dropout_keep8(dp, i, j >> 3, m);
        }
#pragma unroll
        for (int c = 0; c < 8; ++c)
          if (!((keep >> c) & 1u)) w.v[c] = from_float<T>(to_float(w.v[c]) * 0.f);
      }
      *reinterpret_cast<Vec8<T>*>(S + row * kMmaLdh + 8 * grp) = w;
      if (bits != nullptr) bits[g] = static_cast<uint8_t>(keep);
    }
  }
};

// ======================================================================================
// Forward
// ======================================================================================

// Shared memory of the forward kernel (bytes). Phase 1 (t): x chunk Xh [BM][136] T and the A
// chunk Ah, Al [RT][136] T (A[rank][col]: the col-major K x N operand), then the K-split partials
// [KS][BM][RT+4] fp32 over the same bytes. Phase 2 (out): Os [BM][132] fp32 over the same bytes,
// s*t as bf16 th, tl [BM][RT+8] and the B tile bh, bl [128][RT+8] bf16 (B[col][rank]).
// Phase-1 warp layout: MT x NT output tiles of 16 x 16; with fewer than 8 tiles, KS warps share a
// tile, each taking every KS-th 16-column step, and their partials are summed in a fixed order.
template <int RT, int BM>
struct MmaFwdSmem {
  static constexpr int kMT = BM / 16, kNT = RT / 16;
  static constexpr int kTiles = kMT * kNT;
  static constexpr int kKS = kTiles >= kWarps ? 1 : kWarps / kTiles;
  static constexpr int kTPW = kTiles * kKS / kWarps;  // tiles per warp
  static_assert(kTPW * kWarps == kTiles * kKS && (kTile / 16) % kKS == 0, "phase-1 warp layout");
  static_assert(kTPW == 1 || kMT % kTPW == 0, "a warp's tiles share their rank tile");
  static constexpr int kLdt = RT + kMmaPadH;
  static constexpr int kLdp = RT + kMmaPadF;
  static constexpr size_t kXh = align128(sizeof(uint16_t) * BM * kMmaLdh);
  static constexpr size_t kAh = align128(sizeof(uint16_t) * RT * kMmaLdh);
  static constexpr size_t kPart = sizeof(float) * kKS * BM * kLdp;
  static constexpr size_t kOs = sizeof(float) * BM * kMmaLdf;
  static constexpr size_t kWork = align128(cmax(kXh + 2 * kAh, cmax(kPart, kOs)));
  static constexpr size_t kT = align128(sizeof(uint16_t) * BM * kLdt);
  static constexpr size_t kB = align128(sizeof(uint16_t) * kTile * kLdt);
  static constexpr size_t kOffT = kWork;
  static constexpr size_t kOffB = kOffT + 2 * kT;
  static constexpr size_t kBytes = kOffB + 2 * kB;
};

template <typename T, typename W, int RT, int BM, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_fwd_mma_kernel(const FwdParams<T, W> p) {
  using L = MmaFwdSmem<RT, BM>;
  constexpr bool kAExact = std::is_same<W, T>::value;
  constexpr bool kBExact = std::is_same<W, Bf16>::value;
  constexpr int kLdt = L::kLdt, kLdp = L::kLdp;
  LOR2C_DYNAMIC_SMEM(sm);
  T* const Xh = reinterpret_cast<T*>(sm);
  T* const Ah = reinterpret_cast<T*>(sm + L::kXh);
  T* const Al = reinterpret_cast<T*>(sm + L::kXh + L::kAh);
  float* const part = reinterpret_cast<float*>(sm);
  float* const Os = reinterpret_cast<float*>(sm);
  Bf16* const th = reinterpret_cast<Bf16*>(sm + L::kOffT);
  Bf16* const tl = reinterpret_cast<Bf16*>(sm + L::kOffT + L::kT);
  Bf16* const bh = reinterpret_cast<Bf16*>(sm + L::kOffB);
  Bf16* const bl = reinterpret_cast<Bf16*>(sm + L::kOffB + L::kB);
  __shared__ int64_t ridx[MULTI ? BM : 1];  // MULTI: the block's row indices

  const int64_t n = p.n, d_in = p.d_in, d_out = p.d_out, r = p.r;
  const W* A = p.A;
  const W* B = p.B;
  Rows<MULTI> rows;
  if (!fwd_block_rows<BM, MULTI>(p.multi, n, r, d_in, d_out, ridx, A, B, rows))
    return;  // uniform over the block
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int64_t nrc = (r + RT - 1) / RT;  // rank chunks (1 unless r > 64)
  const int64_t nk = (d_in + kTile - 1) / kTile;
  const DropoutParams dp = load_dropout(p.dropout);
  const float keep_scale = dp.enabled ? dp.inv_keep : 1.f;

  // Phase 1: t = (x * keep) @ A.T * keep_scale, RT ranks per pass over x.
  const int ks = warp % L::kKS;
  const int tile0 = (warp / L::kKS) * L::kTPW;
  TileIO8<T, BM> xt;
  for (int64_t rc = 0; rc < nrc; ++rc) {
    FragAcc acc[L::kTPW];
#pragma unroll
    for (int tt = 0; tt < L::kTPW; ++tt) wmma::fill_fragment(acc[tt], 0.f);
    if (nk > 0) xt.load(p.x, p.ldx, rows, 0, 0, d_in, p.vec_x);
    for (int64_t kc = 0; kc < nk; ++kc) {
      const int64_t col0 = kc * kTile;
      xt.store(Xh, rows, 0, col0, d_in, dp, nullptr);
      // Ah[k][c] = A[rc*RT + k, col0 + c]; consecutive threads read consecutive columns.
      for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
        const int c = e % kTile, k = e / kTile;
        const int64_t rank = rc * RT + k, col = col0 + c;
        const W w = rank < r && col < d_in ? A[rank * d_in + col] : from_float<W>(0.f);
        stage_w<T, W>(Ah, Al, k * kMmaLdh + c, w);
      }
      __syncthreads();
      if (kc + 1 < nk) xt.load(p.x, p.ldx, rows, 0, col0 + kTile, d_in, p.vec_x);
#pragma unroll
      for (int tt = 0; tt < L::kTPW; ++tt) {
        const int ti = tile0 + tt, mt = ti % L::kMT, nt = ti / L::kMT;
#pragma unroll
        for (int kk = ks; kk < kTile / 16; kk += L::kKS) {
          FragA<T, RowMajor> a;
          FragB<T, ColMajor> b;
          wmma::load_matrix_sync(a, Xh + mt * 16 * kMmaLdh + kk * 16, kMmaLdh);
          wmma::load_matrix_sync(b, Ah + nt * 16 * kMmaLdh + kk * 16, kMmaLdh);
          wmma::mma_sync(acc[tt], a, b, acc[tt]);
          if constexpr (!kAExact) {
            wmma::load_matrix_sync(b, Al + nt * 16 * kMmaLdh + kk * 16, kMmaLdh);
            wmma::mma_sync(acc[tt], a, b, acc[tt]);
          }
        }
      }
      __syncthreads();  // Xh / Ah are rewritten by the next step
    }
#pragma unroll
    for (int tt = 0; tt < L::kTPW; ++tt) {
      const int ti = tile0 + tt, mt = ti % L::kMT, nt = ti / L::kMT;
      wmma::store_matrix_sync(part + (ks * BM + mt * 16) * kLdp + nt * 16, acc[tt], kLdp,
                              wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * RT; e += kThreads) {
      const int row = e / RT, k = e % RT;
      float s = 0.f;
#pragma unroll
      for (int h = 0; h < L::kKS; ++h) s += part[(h * BM + row) * kLdp + k];
      s *= keep_scale;
      const int64_t i = rows(row), rank = rc * RT + k;
      if (i >= 0 && rank < r) p.t[i * r + rank] = s;
      if (nrc == 1) split2(p.scale * s, th[row * kLdt + k], tl[row * kLdt + k]);
    }
    __syncthreads();  // part is rewritten by the next chunk; th / tl complete
  }

  // Phase 2: out = layer_out + (s * t) @ B.T, 128 columns at a time; warp w owns columns
  // 16w .. 16w + 15 of the tile, all BM rows.
  constexpr int kLoGroups = BM * (kTile / 8) / kThreads;
  const int64_t njt = (d_out + kTile - 1) / kTile;
  for (int64_t jt = 0; jt < njt; ++jt) {
    Vec8<T> lo[kLoGroups];  // issued first: in flight while B is staged and multiplied
#pragma unroll
    for (int q = 0; q < kLoGroups; ++q) {
      const int g = static_cast<int>(threadIdx.x) + q * kThreads;
      const int64_t i = rows(g / (kTile / 8));
      const int64_t j = jt * kTile + 8 * (g % (kTile / 8));
      if (i >= 0 && j < d_out) lo[q] = load_vec<8>(p.lo + i * p.ldl + j, j, d_out, p.vec_lo);
    }
    FragAcc acc[L::kMT];
#pragma unroll
    for (int mt = 0; mt < L::kMT; ++mt) wmma::fill_fragment(acc[mt], 0.f);
    for (int64_t rc = 0; rc < nrc; ++rc) {
      if (nrc > 1) {  // r > 64: this chunk of t back from global memory (written above)
        for (int e = threadIdx.x; e < BM * RT; e += kThreads) {
          const int row = e / RT, k = e % RT;
          const int64_t i = rows(row), rank = rc * RT + k;
          const float v = i >= 0 && rank < r ? p.t[i * r + rank] : 0.f;
          split2(p.scale * v, th[row * kLdt + k], tl[row * kLdt + k]);
        }
      }
      // bh[jj][k] = B[jt*128 + jj, rc*RT + k]; consecutive threads read consecutive ranks.
      for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
        const int k = e % RT, jj = e / RT;
        const int64_t rank = rc * RT + k, col = jt * kTile + jj;
        const W w = rank < r && col < d_out ? B[col * r + rank] : from_float<W>(0.f);
        stage_w<Bf16, W>(bh, bl, jj * kLdt + k, w);
      }
      __syncthreads();
#pragma unroll 1  // (unrolled: up to 180 B of spills at RT = 64, BM = 64)
      for (int kk = 0; kk < RT / 16; ++kk) {
        FragB<Bf16, ColMajor> bhi, blo;
        wmma::load_matrix_sync(bhi, bh + warp * 16 * kLdt + kk * 16, kLdt);
        if constexpr (!kBExact) wmma::load_matrix_sync(blo, bl + warp * 16 * kLdt + kk * 16, kLdt);
#pragma unroll
        for (int mt = 0; mt < L::kMT; ++mt) {
          FragA<Bf16, RowMajor> a;
          wmma::load_matrix_sync(a, th + mt * 16 * kLdt + kk * 16, kLdt);
          wmma::mma_sync(acc[mt], a, bhi, acc[mt]);
          if constexpr (!kBExact) wmma::mma_sync(acc[mt], a, blo, acc[mt]);
          wmma::load_matrix_sync(a, tl + mt * 16 * kLdt + kk * 16, kLdt);
          wmma::mma_sync(acc[mt], a, bhi, acc[mt]);
        }
      }
      __syncthreads();  // th / tl / bh / bl are rewritten by the next chunk or tile
    }
#pragma unroll
    for (int mt = 0; mt < L::kMT; ++mt)
      wmma::store_matrix_sync(Os + mt * 16 * kMmaLdf + warp * 16, acc[mt], kMmaLdf,
                              wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kLoGroups; ++q) {
      const int g = static_cast<int>(threadIdx.x) + q * kThreads;
      const int row = g / (kTile / 8), grp = g % (kTile / 8);
      const int64_t i = rows(row);
      const int64_t j = jt * kTile + 8 * grp;
      if (i >= 0 && j < d_out) {
        float v[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) v[c] = to_float(lo[q].v[c]) + Os[row * kMmaLdf + 8 * grp + c];
        store_vec<8>(p.out + i * p.ldo + j, j, d_out, p.vec_out, v);
      }
    }
    // Os is next written after the next tile's barriers: no barrier needed here.
  }
}

// ======================================================================================
// Backward kernel 1: reads grad
// ======================================================================================

// Shared memory of kernel 1 (bytes): a work area holding the grad tile Gh [64][136] T and the B
// tile Bh, Bl [128][RT+8] T (B[col][rank]: the row-major K x N operand), or, when a column tile is
// finished, P3's result red [RT][132] fp32; then, per row of the range, t as th, tl [rows][RT+8] T
// and the u accumulators us [KU][rows][RT+4] fp32 (KU copies when warps split the u product's
// 128-column reduction, summed at the end in a fixed order).
template <int RT>
struct MmaGSmem {
  static constexpr int kNT = RT / 16;
  static constexpr int kUTiles = (kMmaSub / 16) * kNT;  // u tiles per 64-row step
  static constexpr int kKU = kUTiles >= kWarps ? 1 : kWarps / kUTiles;
  static constexpr int kUPW = kUTiles * kKU / kWarps;  // u tiles per warp
  static_assert(kUPW * kWarps == kUTiles * kKU && (kTile / 16) % kKU == 0, "u warp layout");
  static constexpr int kLdb = RT + kMmaPadH;
  static constexpr int kLdt = RT + kMmaPadH;
  static constexpr int kLdu = RT + kMmaPadF;
  static constexpr size_t kGh = align128(sizeof(uint16_t) * kMmaSub * kMmaLdh);
  static constexpr size_t kBh = align128(sizeof(uint16_t) * kTile * kLdb);
  static constexpr size_t kRed = sizeof(float) * RT * kMmaLdf;
  static constexpr size_t kWork = align128(cmax(kGh + 2 * kBh, kRed));
  // per row: th + tl + KU copies of us (rows is a multiple of 64: every array stays aligned)
  static constexpr size_t kPerRow = 2 * sizeof(uint16_t) * kLdt + sizeof(float) * kKU * kLdu;
  static constexpr size_t bytes(int64_t rows) {
    return kWork + static_cast<size_t>(rows) * kPerRow;
  }
};

// One range of `nrows` (<= p.rows) rows given by `rows`, ranks rc*RT .. rc*RT+RT-1
// (rc = blockIdx.y), all d_out columns: u of the rows accumulates in shared memory over the
// column tiles and is written once; the range's dB.T partial goes to (with `accumulate`: is added
// to) workspace slice blockIdx.x.
template <typename T, typename W, int RT, typename RowMap>
__device__ __forceinline__ void g_range_mma(const BwdGParams<T, W>& p, unsigned char* sm,
                                            const W* B, const RowMap& rows, int64_t nrows,
                                            bool accumulate) {
  using L = MmaGSmem<RT>;
  constexpr bool kExact = std::is_same<W, T>::value;
  constexpr int kLdb = L::kLdb, kLdt = L::kLdt, kLdu = L::kLdu, kNT = L::kNT;
  T* const Gh = reinterpret_cast<T*>(sm);
  T* const Bh = reinterpret_cast<T*>(sm + L::kGh);
  T* const Bl = reinterpret_cast<T*>(sm + L::kGh + L::kBh);
  float* const red = reinterpret_cast<float*>(sm);
  T* const th = reinterpret_cast<T*>(sm + L::kWork);
  T* const tl = th + p.rows * kLdt;
  float* const us = reinterpret_cast<float*>(tl + p.rows * kLdt);
  const int64_t us_copy = p.rows * kLdu;  // floats per copy of us

  const int64_t d_out = p.d_out, r = p.r;
  const int64_t rc = blockIdx.y;  // rank chunk
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int nsub = static_cast<int>((nrows + kMmaSub - 1) / kMmaSub);
  const int64_t nj = (d_out + kTile - 1) / kTile;
  const int64_t steps = nj * nsub;  // pipeline steps: column tile major, row step minor

  for (int e = threadIdx.x; e < nsub * kMmaSub * RT; e += kThreads) {
    const int row = e / RT, k = e % RT;
    const int64_t rank = rc * RT + k;
#pragma unroll
    for (int h = 0; h < L::kKU; ++h) us[h * us_copy + row * kLdu + k] = 0.f;
    float tv = 0.f;
    if (p.need_dB && rank < r) {
      const int64_t i = rows(row);
      if (i >= 0) tv = p.t[i * r + rank];
    }
    split2(tv, th[row * kLdt + k], tl[row * kLdt + k]);
  }

  const DropoutParams none{};
  TileIO8<T, kMmaSub> gt;
  if (steps > 0) gt.load(p.g, p.ldg, rows, 0, 0, d_out, p.vec_g);
  int64_t step = 0;
  const int ku = warp % L::kKU;
  const int ut0 = (warp / L::kKU) * L::kUPW;
  for (int64_t jc = 0; jc < nj; ++jc) {
    const int64_t col0 = jc * kTile;
    if (p.need_u) {  // Bh[kk][k] = B[col0 + kk, rc*RT + k]: consecutive threads, consecutive ranks
      for (int e = threadIdx.x; e < kTile * RT; e += kThreads) {
        const int k = e % RT, kk = e / RT;
        const int64_t rank = rc * RT + k, col = col0 + kk;
        const W w = rank < r && col < d_out ? B[col * r + rank] : from_float<W>(0.f);
        stage_w<T, W>(Bh, Bl, kk * kLdb + k, w);
      }
    }
    FragAcc dacc[kNT];  // dB.T (ranks x 16 columns of warp `warp`), over the range's rows
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) wmma::fill_fragment(dacc[nt], 0.f);
    for (int sb = 0; sb < nsub; ++sb, ++step) {
      gt.store(Gh, rows, sb * kMmaSub, col0, d_out, none, nullptr);
      __syncthreads();
      if (step + 1 < steps) {  // next tile in flight during this one's products
        const int64_t nx = step + 1;
        gt.load(p.g, p.ldg, rows, (nx % nsub) * kMmaSub, (nx / nsub) * kTile, d_out, p.vec_g);
      }
      if (p.need_u) {  // u[rows] += grad tile @ B tile; each u tile (and copy) has one owner warp
#pragma unroll
        for (int tt = 0; tt < L::kUPW; ++tt) {
          const int ti = ut0 + tt, mt = ti % (kMmaSub / 16), nt = ti / (kMmaSub / 16);
          float* const up = us + ku * us_copy + (sb * kMmaSub + mt * 16) * kLdu + nt * 16;
          FragAcc ua;
          wmma::load_matrix_sync(ua, up, kLdu, wmma::mem_row_major);
#pragma unroll 2
          for (int kk = ku; kk < kTile / 16; kk += L::kKU) {
            FragA<T, RowMajor> a;
            FragB<T, RowMajor> b;
            wmma::load_matrix_sync(a, Gh + mt * 16 * kMmaLdh + kk * 16, kMmaLdh);
            wmma::load_matrix_sync(b, Bh + kk * 16 * kLdb + nt * 16, kLdb);
            wmma::mma_sync(ua, a, b, ua);
            if constexpr (!kExact) {
              wmma::load_matrix_sync(b, Bl + kk * 16 * kLdb + nt * 16, kLdb);
              wmma::mma_sync(ua, a, b, ua);
            }
          }
          wmma::store_matrix_sync(up, ua, kLdu, wmma::mem_row_major);
        }
      }
      if (p.need_dB) {  // dB.T[ranks, 16 columns] += t.T @ grad: t (row-major) is col-major t.T
#pragma unroll 1
        for (int kk = 0; kk < kMmaSub / 16; ++kk) {
          FragB<T, RowMajor> b;
          wmma::load_matrix_sync(b, Gh + kk * 16 * kMmaLdh + warp * 16, kMmaLdh);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            FragA<T, ColMajor> a;
            const int64_t off = (sb * kMmaSub + kk * 16) * kLdt + nt * 16;
            wmma::load_matrix_sync(a, th + off, kLdt);
            wmma::mma_sync(dacc[nt], a, b, dacc[nt]);
            wmma::load_matrix_sync(a, tl + off, kLdt);
            wmma::mma_sync(dacc[nt], a, b, dacc[nt]);
          }
        }
      }
      __syncthreads();
    }
    if (p.need_dB) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        wmma::store_matrix_sync(red + nt * 16 * kMmaLdf + warp * 16, dacc[nt], kMmaLdf,
                                wmma::mem_row_major);
      __syncthreads();
      float* const out = p.ws_dB + (static_cast<int64_t>(blockIdx.x) * r + rc * RT) * d_out + col0;
      const int64_t rank_valid = r - rc * RT, col_valid = d_out - col0;
      for (int o = threadIdx.x; o < RT * kTile; o += kThreads) {
        const int k = o / kTile, c = o % kTile;
        if (k < rank_valid && c < col_valid) {
          const float s = red[k * kMmaLdf + c];
          out[k * d_out + c] = accumulate ? out[k * d_out + c] + s : s;
        }
      }
      __syncthreads();  // red is overwritten by the next tile's B and grad tiles
    }
  }
  __syncthreads();
  if (p.need_u) {
    for (int e = threadIdx.x; e < nsub * kMmaSub * RT; e += kThreads) {
      const int row = e / RT, k = e % RT;
      const int64_t rank = rc * RT + k;
      if (row < nrows && rank < r) {
        float s = 0.f;
#pragma unroll
        for (int h = 0; h < L::kKU; ++h) s += us[h * us_copy + row * kLdu + k];
        p.u[rows(row) * r + rank] = s;
      }
    }
  }
}

// Plain op: block (b, rc) handles rows (range0 + b) * range_rows .. + range_rows - 1; MULTI: unit
// b of p.multi. Either way in consecutive ranges of p.rows rows, adding into its own slice.
template <typename T, typename W, int RT, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_bwd_g_mma_kernel(const BwdGParams<T, W> p) {
  LOR2C_DYNAMIC_SMEM(sm);
  const W* B = p.B;
  int64_t pos0 = 0, count = 0;
  bool accumulate = false;
  if constexpr (MULTI) {
    Unit u;
    if (!find_unit(p.multi, blockIdx.x, u)) return;  // uniform over the block
    B += u.adapter * p.d_out * p.r;
    pos0 = u.pos0;
    count = u.count;
  } else {
    pos0 = (p.range0 + blockIdx.x) * p.range_rows;
    count = p.range_rows < p.n - pos0 ? p.range_rows : p.n - pos0;
    accumulate = p.accumulate;
  }
  for (int64_t off = 0; off < count; off += p.rows) {
    if (off > 0) __syncthreads();  // the previous range's last reads of us are done
    const int64_t cnt = count - off < p.rows ? count - off : p.rows;
    g_range_mma<T, W, RT>(p, sm, B, Rows<MULTI>{MULTI ? p.multi.order : nullptr, pos0 + off, cnt},
                          cnt, accumulate || off > 0);
  }
}

// ======================================================================================
// Backward kernel 2: reads x
// ======================================================================================

// Shared memory of kernel 2 (bytes): Xh [32][136] T (x * keep), the keep flags [32][16] bytes,
// u of the step as ubh, ubl [32][RT+8] bf16 (times s / (1 - p), for dx) and uth, utl [32][RT+8] T
// (for dA), A as ah, al [RT][136] bf16 (A[rank][col]: the row-major K x N operand), and one
// 16 x 16 fp32 tile per warp for dx's epilogue. After the row loop the u and A areas hold the dA
// partial [RT][132] fp32 on its way out.
template <int RT>
struct MmaXSmem {
  static constexpr int kNT = RT / 16;
  static constexpr int kLdu = RT + kMmaPadH;
  static constexpr size_t kXh = align128(sizeof(uint16_t) * kMmaSubX * kMmaLdh);
  static constexpr size_t kBits = align128(kMmaSubX * (kTile / 8));
  static constexpr size_t kU = align128(sizeof(uint16_t) * kMmaSubX * kLdu);
  static constexpr size_t kA = align128(sizeof(uint16_t) * RT * kMmaLdh);
  static constexpr size_t kStage = sizeof(float) * 256;  // per warp
  static constexpr size_t kRed = sizeof(float) * RT * kMmaLdf;
  static_assert(kRed <= 4 * kU + 2 * kA, "the dA partial fits in the u and A areas");
  static constexpr size_t kOffBits = kXh;
  static constexpr size_t kOffU = kOffBits + kBits;
  static constexpr size_t kOffA = kOffU + 4 * kU;
  static constexpr size_t kOffStage = kOffA + 2 * kA;
  static constexpr size_t kBytes = kOffStage + kWarps * kStage;
};

template <typename W, int RT>
__device__ __forceinline__ void stage_A_mma(Bf16* ah, Bf16* al, const W* A, int64_t rc, int64_t r,
                                            int64_t col0, int64_t d_in) {
  // ah[k][c] = A[rc*RT + k, col0 + c]; consecutive threads read consecutive columns.
  for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
    const int c = e % kTile, k = e / kTile;
    const int64_t rank = rc * RT + k, col = col0 + c;
    const W w = rank < r && col < d_in ? A[rank * d_in + col] : from_float<W>(0.f);
    stage_w<Bf16, W>(ah, al, k * kMmaLdh + c, w);
  }
}

// The 128 columns from blockIdx.x * 128 of `nrows` rows given by `rows`, with weights A: dx of
// those rows and the dA partial of rank chunk blockIdx.z, written to workspace slice `slice`.
template <typename T, typename W, int RT, typename RowMap>
__device__ __forceinline__ void x_split_mma(const BwdXParams<T, W>& p, unsigned char* sm,
                                            const W* A, const RowMap& rows, int64_t nrows,
                                            int64_t slice) {
  using L = MmaXSmem<RT>;
  constexpr bool kAExact = std::is_same<W, Bf16>::value;
  constexpr int kLdu = L::kLdu, kNT = L::kNT;
  T* const Xh = reinterpret_cast<T*>(sm);
  uint8_t* const bits = reinterpret_cast<uint8_t*>(sm + L::kOffBits);
  Bf16* const ubh = reinterpret_cast<Bf16*>(sm + L::kOffU);
  Bf16* const ubl = reinterpret_cast<Bf16*>(sm + L::kOffU + L::kU);
  T* const uth = reinterpret_cast<T*>(sm + L::kOffU + 2 * L::kU);
  T* const utl = reinterpret_cast<T*>(sm + L::kOffU + 3 * L::kU);
  Bf16* const ah = reinterpret_cast<Bf16*>(sm + L::kOffA);
  Bf16* const al = reinterpret_cast<Bf16*>(sm + L::kOffA + L::kA);
  float* const red = reinterpret_cast<float*>(sm + L::kOffU);  // over u and A, after the loop

  const int64_t d_in = p.d_in, r = p.r;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t zc = blockIdx.z;  // rank chunk of dA owned by this block
  const int warp = static_cast<int>(threadIdx.x >> 5), lane = static_cast<int>(threadIdx.x & 31);
  float* const stage = reinterpret_cast<float*>(sm + L::kOffStage) + warp * 256;
  const int nsub = static_cast<int>((nrows + kMmaSubX - 1) / kMmaSubX);
  const int64_t nrc = (r + RT - 1) / RT;
  // dx sums over all ranks: with r > 64 the z == 0 blocks do it, looping over the chunks.
  const bool do_dx = p.do_dx && zc == 0;
  const bool do_dA = p.do_dA;
  const DropoutParams dp = load_dropout(p.dropout);
  const float keep_scale = dp.enabled ? dp.inv_keep : 1.f;
  const float sx = p.scale * keep_scale;  // dx = (s / (1 - p)) * (u @ A) * keep

  if (do_dx && nrc == 1) stage_A_mma<W, RT>(ah, al, A, 0, r, col0, d_in);
  TileIO8<T, kMmaSubX> xt;
  if (nsub > 0) xt.load(p.x, p.ldx, rows, 0, col0, d_in, p.vec_x);
  FragAcc dacc[kNT];  // dA (ranks x 16 columns of warp `warp`), over all rows
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) wmma::fill_fragment(dacc[nt], 0.f);
  for (int sb = 0; sb < nsub; ++sb) {
    const int64_t l0 = static_cast<int64_t>(sb) * kMmaSubX;  // the step's first row in `rows`
    xt.store(Xh, rows, l0, col0, d_in, dp, bits);
    if (sb + 1 < nsub) xt.load(p.x, p.ldx, rows, l0 + kMmaSubX, col0, d_in, p.vec_x);
    FragAcc xacc[kMmaSubX / 16];  // dx (32 rows x 16 columns of warp `warp`)
#pragma unroll
    for (int mt = 0; mt < kMmaSubX / 16; ++mt) wmma::fill_fragment(xacc[mt], 0.f);
    for (int64_t rc = 0; rc < nrc; ++rc) {
      const bool use_dA = do_dA && rc == zc;
      if (!do_dx && !use_dA) continue;  // uniform over the block
      for (int e = threadIdx.x; e < kMmaSubX * RT; e += kThreads) {
        const int row = e / RT, k = e % RT;
        const int64_t rank = rc * RT + k;
        float uv = 0.f;
        if (rank < r) {
          const int64_t i = rows(l0 + row);
          if (i >= 0) uv = p.u[i * r + rank];
        }
        if (do_dx) split2(sx * uv, ubh[row * kLdu + k], ubl[row * kLdu + k]);
        if (use_dA) split2(uv, uth[row * kLdu + k], utl[row * kLdu + k]);
      }
      if (do_dx && nrc > 1) stage_A_mma<W, RT>(ah, al, A, rc, r, col0, d_in);
      __syncthreads();
      if (do_dx) {  // dx tile += (ubh + ubl) @ (ah + al), dropping ubl @ al
#pragma unroll
        for (int kk = 0; kk < kNT; ++kk) {
          FragB<Bf16, RowMajor> bhi, blo;
          wmma::load_matrix_sync(bhi, ah + kk * 16 * kMmaLdh + warp * 16, kMmaLdh);
          if constexpr (!kAExact)
            wmma::load_matrix_sync(blo, al + kk * 16 * kMmaLdh + warp * 16, kMmaLdh);
#pragma unroll
          for (int mt = 0; mt < kMmaSubX / 16; ++mt) {
            FragA<Bf16, RowMajor> a;
            wmma::load_matrix_sync(a, ubh + mt * 16 * kLdu + kk * 16, kLdu);
            wmma::mma_sync(xacc[mt], a, bhi, xacc[mt]);
            if constexpr (!kAExact) wmma::mma_sync(xacc[mt], a, blo, xacc[mt]);
            wmma::load_matrix_sync(a, ubl + mt * 16 * kLdu + kk * 16, kLdu);
            wmma::mma_sync(xacc[mt], a, bhi, xacc[mt]);
          }
        }
      }
      if (use_dA) {  // dA[ranks, 16 columns] += u.T @ (x * keep): u (row-major) is col-major u.T
#pragma unroll
        for (int kk = 0; kk < kMmaSubX / 16; ++kk) {
          FragB<T, RowMajor> b;
          wmma::load_matrix_sync(b, Xh + kk * 16 * kMmaLdh + warp * 16, kMmaLdh);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            FragA<T, ColMajor> a;
            wmma::load_matrix_sync(a, uth + kk * 16 * kLdu + nt * 16, kLdu);
            wmma::mma_sync(dacc[nt], a, b, dacc[nt]);
            wmma::load_matrix_sync(a, utl + kk * 16 * kLdu + nt * 16, kLdu);
            wmma::mma_sync(dacc[nt], a, b, dacc[nt]);
          }
        }
      }
      __syncthreads();  // the u tiles (and A, r > 64) are rewritten by the next chunk
    }
    if (do_dx) {  // each warp writes its 16 columns, one 16 x 16 tile at a time
      const int rr = lane >> 1, half = lane & 1;  // the lane's row in the tile, 8-column half
      const int grp = 2 * warp + half;            // its 8-column group in the 128-column tile
      const int64_t j = col0 + 8 * grp;
#pragma unroll
      for (int mt = 0; mt < kMmaSubX / 16; ++mt) {
        wmma::store_matrix_sync(stage, xacc[mt], 16, wmma::mem_row_major);
        __syncwarp();
        const int row = mt * 16 + rr;
        const int64_t i = rows(l0 + row);
        if (i >= 0 && j < d_in) {
          const unsigned keep = bits[row * (kTile / 8) + grp];
          float v[8];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            v[c] = stage[rr * 16 + 8 * half + c];
            if (dp.enabled) v[c] *= ((keep >> c) & 1u) ? 1.f : 0.f;
          }
          store_vec<8>(p.dx + i * d_in + j, j, d_in, p.vec_dx, v);
        }
        __syncwarp();  // the stage tile is rewritten by the next row tile
      }
    }
    __syncthreads();  // Xh and bits are rewritten by the next step
  }
  if (do_dA) {  // the u and A areas are free: the last step ended with a barrier
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
      wmma::store_matrix_sync(red + nt * 16 * kMmaLdf + warp * 16, dacc[nt], kMmaLdf,
                              wmma::mem_row_major);
    __syncthreads();
    float* const out = p.ws_dA + (slice * r + zc * RT) * d_in + col0;
    const int64_t rank_valid = r - zc * RT, col_valid = d_in - col0;
    for (int o = threadIdx.x; o < RT * kTile; o += kThreads) {
      const int k = o / kTile, c = o % kTile;
      if (k < rank_valid && c < col_valid) out[k * d_in + c] = red[k * kMmaLdf + c] * keep_scale;
    }
  }
}

// Plain op: block (c, b, z) handles rows b * p.rows .. and writes dA slice b.
// MULTI: it handles units b, b + gridDim.y, ... of p.multi, writing dA slice b for unit b.
template <typename T, typename W, int RT, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_bwd_x_mma_kernel(const BwdXParams<T, W> p) {
  LOR2C_DYNAMIC_SMEM(sm);
  x_block_rows<MULTI>(p, [&](const W* A, const auto& rows, int64_t count, int64_t slice) {
    x_split_mma<T, W, RT>(p, sm, A, rows, count, slice);
  });
}

}  // namespace cuda
}  // namespace lor2c
