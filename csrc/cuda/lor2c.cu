// LoR2C residual op on CUDA: raw-pointer kernels and their host launchers. No torch/ATen here
// (csrc/cuda/lor2c_binding.cpp is the glue), so this file compiles with nvcc alone.
//
//   forward   lor2c_fwd_kernel   one block per BM rows. Phase 1 streams x in 64-column chunks
//                                (dropout applied while staging) into t = dropout(x) @ A.T;
//                                phase 2 streams layer_out in 128-column tiles and writes
//                                out = layer_out + s * t @ B.T.
//   backward  lor2c_bwd_g_kernel kernel 1, one block per range of `g_rows` rows, all d_out
//                                columns, at most ~1-2 blocks per SM (more ranges: several
//                                launches): reads grad once, u = grad @ B (accumulated in
//                                shared memory, written once) and the block's partial
//                                dB.T = t.T @ grad.
//             lor2c_bwd_x_kernel kernel 2, one block per (128 columns, `x_rows` rows): reads x
//                                once (mask regenerated), dx = s * (u @ A) * mask and the
//                                block's partial dA = u.T @ (x * mask).
//             lor2c_reduce_kernel sums the partials in a fixed order, scales, casts.
// Multi-adapter batches (lor2c_multi_*) run the same kernels with MULTI = true: rows are visited
// grouped by adapter through a device-side sorted order (lor2c_multi_plan_kernel builds the
// per-adapter tables), each block works on rows of one adapter, lor2c_multi_none_kernel handles
// rows without an adapter, and the reduction sums each adapter's partials into its bank row.
// Accumulation is fp32 throughout; every global index is 64-bit; the dropout mask follows
// csrc/philox.h and is never stored. README.md in this folder has the sizes and what was verified.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../philox.h"
#include "lor2c_kernels.h"

namespace lor2c {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads of every kernel but the reduction: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;  // forward phase 1: columns of x per pipeline step
constexpr int kTile = 128;  // columns per tile: forward phase 2 and both backward kernels
constexpr int kSub = 64;    // rows per pipeline step of backward kernel 1
constexpr int kSubX = 32;   // rows per pipeline step of backward kernel 2
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridY = 65535;  // grid.y (and grid.z) limit

// ---- element conversion: explicit intrinsics only (torch builds with __CUDA_NO_HALF_*) ----
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return Cvt<T>::to_float(v);
}

// Four consecutive elements, aligned so that a single 8- or 16-byte access moves them.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Loads columns j..j+3 of one row (p points at column j), zero past column d; one vector
// access when the caller vouched for the alignment and the group is whole.
template <typename T>
__device__ __forceinline__ Vec4<T> load4(const T* p, int64_t j, int64_t d, bool vec) {
  Vec4<T> v;
  if (vec && j + 4 <= d) {
    v = *reinterpret_cast<const Vec4<T>*>(p);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) v.v[c] = j + c < d ? p[c] : Cvt<T>::from_float(0.f);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t j, int64_t d, bool vec, const float v[4]) {
  if (vec && j + 4 <= d) {
    Vec4<T> w;
#pragma unroll
    for (int c = 0; c < 4; ++c) w.v[c] = Cvt<T>::from_float(v[c]);
    *reinterpret_cast<Vec4<T>*>(p) = w;
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (j + c < d) p[c] = Cvt<T>::from_float(v[c]);
  }
}

// ---- dropout ---------------------------------------------------------------------------------
// The kernels' dropout parameters are csrc/philox.h's DropoutParams; the mask is drawn in
// TileIO::store, one Philox call per 8 columns shared by a pair of lanes (dropout_pair_keep8).
using Dropout = DropoutParams;

// Reads (seed, offset) from device memory: no host synchronisation anywhere.
__device__ __forceinline__ Dropout load_dropout(const DropoutArgs& a) {
  Dropout d{};
  d.enabled = a.enabled;
  d.threshold = a.threshold;
  d.inv_keep = a.inv_keep;
  if (a.enabled) dropout_seed(d, a.seed[0], a.seed[1]);
  return d;
}

// ---- row maps ------------------------------------------------------------------------------
// Which tensor rows a block works on: rows(l) is the index in x / layer_out / grad (and in t, u,
// out, dx) of the block's l-th row, or -1 past the block's `count` rows. The plain op uses
// consecutive rows (Rows<false>: pos0 + l); a multi-adapter batch visits the rows grouped by
// adapter, through the sorted order (Rows<true>: order[pos0 + l]). Either way the dropout mask
// of a row is drawn with its index in the tensor, so visiting order never changes it.
template <bool GATHER>
struct Rows {
  const int64_t* order;  // GATHER only: row indices, sorted by adapter id
  int64_t pos0, count;

  __device__ __forceinline__ int64_t operator()(int64_t l) const {
    if (l >= count) return -1;
    if constexpr (GATHER) {
      return order[pos0 + l];
    } else {
      return pos0 + l;
    }
  }
};

// ---- multi-adapter batches: which rows a block works on ---------------------------------------
// lor2c_multi_plan_kernel cuts the sorted row positions 0..n-1 into S = G + 2 slots: slot 0 holds
// the ids < 0 (-1: no adapter), slot 1 + a adapter a, slot G + 1 the ids >= G (out of range:
// treated like -1, so a bad id can never index past the banks). seg[s] .. seg[s+1] are slot s's
// positions. A table for units of `rows` rows holds bp[s], the number of units before slot s; a
// unit is up to `rows` consecutive positions of one adapter slot (slots 0 and G + 1 get none:
// lor2c_multi_none_kernel handles their rows). Grids are sized by an upper bound on the number
// of units, ceil(n / rows) + G, and the blocks past the last unit return at once.
struct MultiTable {
  const int64_t* order;  // (n,) row indices sorted by adapter id
  const int64_t* seg;    // S + 1 positions
  const int64_t* bp;     // S + 1 unit counts (exclusive prefix sums)
  int64_t slots;         // S = G + 2
  int64_t rows;          // rows per unit
};

struct Unit {
  int64_t adapter;  // bank row
  int64_t pos0;     // first position in `order`
  int64_t count;    // 1 .. rows
};

// Unit b, or false when b is past the last unit. Every thread of a block computes the same.
__device__ __forceinline__ bool find_unit(const MultiTable& m, int64_t b, Unit& u) {
  if (b >= m.bp[m.slots]) return false;
  int64_t lo = 0, hi = m.slots;  // bp[lo] <= b < bp[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (m.bp[mid] <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  u.adapter = lo - 1;
  u.pos0 = m.seg[lo] + (b - m.bp[lo]) * m.rows;
  const int64_t left = m.seg[lo + 1] - u.pos0;
  u.count = left < m.rows ? left : m.rows;
  return true;
}

// ---- activation tile staging -------------------------------------------------------------
// A ROWS x COLS tile of a row-major (n, d) activation, moved global -> registers -> shared
// memory (fp32, dropout applied). Columns go in groups of four aligned to multiples of 4.
// Thread tid owns groups tid, tid + 256, ... in row-major order: consecutive threads read
// consecutive groups of a row (coalesced) and write consecutive 16-byte slots (conflict-free).
// Loading a tile into registers before the current one is consumed keeps the next tile's global
// reads in flight during compute. Dropout: the groups of lanes 2k and 2k+1 are the two halves of
// one 8-column Philox group (COLS is a multiple of 8, tiles start at multiples of 8), so the pair
// shares its calls: for steps q, q+1 the even lane draws step q's 8 columns and the odd lane step
// q+1's (dropout_pair_keep8). Every thread of the block must call store() together.
template <typename T, int ROWS, int COLS>
struct TileIO {
  static constexpr int kGroupsPerRow = COLS / 4;
  static constexpr int kGroups = ROWS * kGroupsPerRow / kThreads;
  static_assert(kGroups * kThreads == ROWS * kGroupsPerRow, "tile must split evenly");
  static_assert(kGroupsPerRow % 2 == 0 && kGroups % 2 == 0,
                "lane pairs share 8-column Philox groups over pairs of steps");
  Vec4<T> reg[kGroups];

  // Rows rows(l0), rows(l0 + 1), ... (see Rows), columns col0.. (< d) of base (row stride ld);
  // zeros outside.
  template <typename RowMap>
  __device__ __forceinline__ void load(const T* base, int64_t ld, const RowMap& rows, int64_t l0,
                                       int64_t col0, int64_t d, bool vec) {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      const int g = static_cast<int>(threadIdx.x) + q * kThreads;
      const int64_t i = rows(l0 + g / kGroupsPerRow);
      const int64_t j = col0 + 4 * (g % kGroupsPerRow);
      if (i >= 0 && j < d) {
        reg[q] = load4(base + i * ld + j, j, d, vec);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) reg[q].v[c] = Cvt<T>::from_float(0.f);
      }
    }
  }

  // Writes the tile to S (row stride lds) as fp32 times the dropout multipliers; when `bits`
  // is not null, bits[row * COLS/4 + group] receives the group's keep flags (bits 0..3).
  // The mask of element (i, j) uses i = rows(l0 + row), the row's index in the tensor.
  // col0 must be a multiple of 8.
  template <typename RowMap>
  __device__ __forceinline__ void store(float* S, int lds, const RowMap& rows, int64_t l0,
                                        int64_t col0, int64_t d, const Dropout& dp,
                                        uint8_t* bits) const {
    const int half = static_cast<int>(threadIdx.x & 1u);  // this lane's half of its 8 columns
#pragma unroll
    for (int q0 = 0; q0 < kGroups; q0 += 2) {
      unsigned keep8[2] = {0xFFu, 0xFFu};  // steps q0 and q0 + 1, all 8 columns
      if (dp.enabled) {  // uniform over the block
        const int g = static_cast<int>(threadIdx.x) + (q0 + half) * kThreads;  // step q0 + half
        const int64_t i = rows(l0 + g / kGroupsPerRow);
        const int64_t j8 = col0 + 8 * ((g % kGroupsPerRow) / 2);
        dropout_pair_keep8(dp, i >= 0 && j8 < d, i, j8 >> 3, keep8);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int q = q0 + s;
        const int g = static_cast<int>(threadIdx.x) + q * kThreads;
        const int row = g / kGroupsPerRow, grp = g % kGroupsPerRow;
        const unsigned keep = (keep8[s] >> (4 * half)) & 0xFu;
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) v[c] = to_f(reg[q].v[c]);
        if (dp.enabled) {
#pragma unroll
          for (int c = 0; c < 4; ++c)  // x * 0 (not 0) keeps NaN/inf as the CPU does
            v[c] *= ((keep >> c) & 1u) ? dp.inv_keep : 0.f;
        }
        *reinterpret_cast<float4*>(S + row * lds + 4 * grp) = make_float4(v[0], v[1], v[2], v[3]);
        if (bits != nullptr) bits[g] = static_cast<uint8_t>(keep);
      }
    }
  }
};

// ---- the three block-level products --------------------------------------------------------
// P1: acc (BM rows x RT ranks) += X (BM x CH) . W (CH x RT), a reduction over columns.
// X is row-major in shared memory with stride CH + 4; W is stored W[col][rank], stride kLdw.
// Warp w owns rows w*TM .. w*TM+TM-1. In a warp, lane = ks + KS*cg: cg picks ranks
// cg + CG*q (q < TN), ks takes the column groups ks, ks + KS, ... (4 columns each). The X
// reads of one instruction are a broadcast of KS distinct 16-byte slots of one row; the W
// reads hit 32 distinct banks, because kLdw = CG/4 (mod 8) puts ks's offset 4*ks*kLdw at
// ks*CG (mod 32). reduce() then sums the KS column slices with a xor butterfly.
template <int RT, int BM, int CH>
struct P1 {
  static constexpr int TN = 2;
  static constexpr int CG = RT / TN;
  static constexpr int KS = 32 / CG;
  static constexpr int TM = BM / kWarps;
  static constexpr int kLdx = CH + 4;
  static constexpr int kLdw = RT == 64 ? RT + 1 : RT + RT / 8;
  static_assert(CG * KS == 32 && TM * kWarps == BM && CH % (4 * KS) == 0, "P1 shape");
  float acc[TM][TN];

  __device__ __forceinline__ static int ks() { return (threadIdx.x & 31) % KS; }
  __device__ __forceinline__ static int cg() { return (threadIdx.x & 31) / KS; }
  __device__ __forceinline__ static int row(int m) { return (threadIdx.x >> 5) * TM + m; }
  __device__ __forceinline__ static int rank(int q) { return cg() + CG * q; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int q = 0; q < TN; ++q) acc[m][q] = 0.f;
  }

  __device__ __forceinline__ void run(const float* Xs, const float* Ws) {
    const float* xr = Xs + row(0) * kLdx;
    const float* wc = Ws + cg();
#pragma unroll 1
    for (int gk = ks(); gk < CH / 4; gk += KS) {
      float wv[4][TN];  // the group's 4 columns x TN ranks first, then the rows stream by
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int q = 0; q < TN; ++q) wv[c][q] = wc[(4 * gk + c) * kLdw + q * CG];
#pragma unroll
      for (int m = 0; m < TM; ++m) {
        const float4 xv = *reinterpret_cast<const float4*>(xr + m * kLdx + 4 * gk);
#pragma unroll
        for (int q = 0; q < TN; ++q) {
          acc[m][q] = fmaf(xv.x, wv[0][q], acc[m][q]);
          acc[m][q] = fmaf(xv.y, wv[1][q], acc[m][q]);
          acc[m][q] = fmaf(xv.z, wv[2][q], acc[m][q]);
          acc[m][q] = fmaf(xv.w, wv[3][q], acc[m][q]);
        }
      }
    }
  }

  // Afterwards every lane holds the full sums (xor butterfly: same order in every lane).
  __device__ __forceinline__ void reduce() {
#pragma unroll
    for (int off = 1; off < KS; off <<= 1)
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int q = 0; q < TN; ++q) acc[m][q] += __shfl_xor_sync(kFullMask, acc[m][q], off);
  }
};

// P2: acc (BM rows x 128 columns) += R (BM x RT) . W (RT x 128), a reduction over ranks.
// R is row-major with stride RT + 4 (t or u); W is W[rank][col] with stride 132 (B.T or A).
// Warp w owns rows w*TM + m, lane l the columns 4l..4l+3: the R reads (two ranks per 8-byte
// load) are warp-wide broadcasts, each W read one contiguous 512-byte row (conflict-free).
template <int RT, int BM>
struct P2 {
  static constexpr int TM = BM / kWarps;
  static constexpr int kLdr = RT + 4;
  static constexpr int kLdw = kTile + 4;
  static_assert(TM * kWarps == BM && RT % 2 == 0, "P2 shape");
  float acc[TM][4];

  __device__ __forceinline__ static int row(int m) { return (threadIdx.x >> 5) * TM + m; }
  __device__ __forceinline__ static int col() { return 4 * (threadIdx.x & 31); }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][e] = 0.f;
  }

  __device__ __forceinline__ void run(const float* Rs, const float* Ws) {
    const float* rr = Rs + row(0) * kLdr;
    const float* wc = Ws + col();
#pragma unroll 1
    for (int k2 = 0; k2 < RT / 2; ++k2) {
      // two ranks' weights first, then the rows stream by
      const float4 w0 = *reinterpret_cast<const float4*>(wc + (2 * k2) * kLdw);
      const float4 w1 = *reinterpret_cast<const float4*>(wc + (2 * k2 + 1) * kLdw);
#pragma unroll
      for (int m = 0; m < TM; ++m) {
        const float2 rv = *reinterpret_cast<const float2*>(rr + m * kLdr + 2 * k2);
        acc[m][0] = fmaf(rv.y, w1.x, fmaf(rv.x, w0.x, acc[m][0]));
        acc[m][1] = fmaf(rv.y, w1.y, fmaf(rv.x, w0.y, acc[m][1]));
        acc[m][2] = fmaf(rv.y, w1.z, fmaf(rv.x, w0.z, acc[m][2]));
        acc[m][3] = fmaf(rv.y, w1.w, fmaf(rv.x, w0.w, acc[m][3]));
      }
    }
  }
};

// P3: acc (RT ranks x 128 columns) += R (BM x RT).T . X (BM x 128), a reduction over rows.
// Warp w owns ranks 8*(w % NRG) .. +7 and rows w / NRG, + KSR, ...; lane l the columns
// 4l..4l+3. R reads are broadcasts, X reads contiguous 512-byte rows. The KSR warps that share
// ranks are summed through shared memory, in a fixed order, by finish().
template <int RT, int BM>
struct P3 {
  static constexpr int NRG = RT / 8;
  static constexpr int KSR = kWarps / NRG;
  static constexpr int kLdr = RT + 4;
  static constexpr int kLdx = kTile + 4;
  static constexpr int kRedFloats = KSR * RT * kTile;
  static_assert(NRG * KSR == kWarps && BM % KSR == 0, "P3 shape");
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int k = 0; k < 8; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][e] = 0.f;
  }

  __device__ __forceinline__ void run(const float* Rs, const float* Xs) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = w % NRG, ks = w / NRG;
#pragma unroll 1
    for (int i = ks; i < BM; i += KSR) {
      const float4 xv = *reinterpret_cast<const float4*>(Xs + i * kLdx + 4 * lane);
      const float4 r0 = *reinterpret_cast<const float4*>(Rs + i * kLdr + 8 * rg);
      const float4 r1 = *reinterpret_cast<const float4*>(Rs + i * kLdr + 8 * rg + 4);
      const float rk[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        acc[k][0] = fmaf(rk[k], xv.x, acc[k][0]);
        acc[k][1] = fmaf(rk[k], xv.y, acc[k][1]);
        acc[k][2] = fmaf(rk[k], xv.z, acc[k][2]);
        acc[k][3] = fmaf(rk[k], xv.w, acc[k][3]);
      }
    }
  }

  // Writes (or, with `accumulate`, adds) sum(partials)[k][c] to out[k * ld + c] for
  // k < rank_valid, c < col_valid; element (k, c) always goes through the same thread.
  // `red` (kRedFloats) may alias the X tile: the caller has a barrier after its last run().
  // Starts writing red at once and ends with a barrier.
  __device__ __forceinline__ void finish(float* red, float* out, int64_t ld, int64_t rank_valid,
                                         int64_t col_valid, bool accumulate) const {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = w % NRG, ks = w / NRG;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      *reinterpret_cast<float4*>(red + (ks * RT + 8 * rg + k) * kTile + 4 * lane) =
          make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
    __syncthreads();
    for (int o = threadIdx.x; o < RT * kTile; o += kThreads) {
      const int k = o / kTile, c = o % kTile;
      float s = 0.f;
#pragma unroll
      for (int h = 0; h < KSR; ++h) s += red[(h * RT + k) * kTile + c];
      if (k < rank_valid && c < col_valid) out[k * ld + c] = accumulate ? out[k * ld + c] + s : s;
    }
    __syncthreads();
  }
};

// ---- forward -------------------------------------------------------------------------------
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

// Shared memory of the forward kernel, in floats: ts [BM][RT+4] for the whole kernel, then
// phase 1's Xs [BM][kChunk+4] + Ws [kChunk][kLdw], reused by phase 2's Bs [RT][kTile+4].
template <int RT, int BM>
struct FwdSmem {
  static constexpr int kTs = BM * (RT + 4);
  static constexpr int kPhase1 = BM * (kChunk + 4) + kChunk * P1<RT, BM, kChunk>::kLdw;
  static constexpr int kPhase2 = RT * (kTile + 4);
  static constexpr size_t kBytes = sizeof(float) * (kTs + (kPhase1 > kPhase2 ? kPhase1 : kPhase2));
};

// MULTI: block b is unit b of p.multi (rows of one adapter, BM rows per unit).
template <typename T, typename W, int RT, int BM, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_fwd_kernel(const FwdParams<T, W> p) {
  using Q1 = P1<RT, BM, kChunk>;
  using Q2 = P2<RT, BM>;
  constexpr int kLdt = RT + 4;
  extern __shared__ float4 smem4[];
  float* const ts = reinterpret_cast<float*>(smem4);
  float* const work = ts + FwdSmem<RT, BM>::kTs;
  float* const Xs = work;
  float* const Ws = work + BM * Q1::kLdx;
  float* const Bs = work;
  __shared__ int64_t ridx[MULTI ? BM : 1];  // MULTI: the block's row indices

  const int64_t n = p.n, d_in = p.d_in, d_out = p.d_out, r = p.r;
  const W* A = p.A;
  const W* B = p.B;
  Rows<MULTI> rows;
  if constexpr (MULTI) {
    Unit u;
    if (!find_unit(p.multi, blockIdx.x, u)) return;  // uniform over the block
    A += u.adapter * r * d_in;
    B += u.adapter * d_out * r;
    for (int l = threadIdx.x; l < BM; l += kThreads)
      ridx[l] = l < u.count ? p.multi.order[u.pos0 + l] : -1;
    __syncthreads();
    rows = {ridx, 0, u.count};
  } else {
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    rows = {nullptr, row0, n - row0 < BM ? n - row0 : BM};
  }
  const int64_t nrc = (r + RT - 1) / RT;  // rank chunks (1 unless r > 64)
  const int64_t nk = (d_in + kChunk - 1) / kChunk;
  const Dropout dp = load_dropout(p.dropout);

  // Phase 1: t = dropout(x) @ A.T for the block's rows, RT ranks per pass over x.
  TileIO<T, BM, kChunk> xt;
  for (int64_t rc = 0; rc < nrc; ++rc) {
    Q1 q1;
    q1.zero();
    if (nk > 0) xt.load(p.x, p.ldx, rows, 0, 0, d_in, p.vec_x);
    for (int64_t kc = 0; kc < nk; ++kc) {
      const int64_t col0 = kc * kChunk;
      xt.store(Xs, Q1::kLdx, rows, 0, col0, d_in, dp, nullptr);
      // Ws[kk][k] = A[rc*RT + k, col0 + kk]; consecutive threads read consecutive columns.
      for (int e = threadIdx.x; e < kChunk * RT; e += kThreads) {
        const int kk = e % kChunk, k = e / kChunk;
        const int64_t rank = rc * RT + k, col = col0 + kk;
        Ws[kk * Q1::kLdw + k] = rank < r && col < d_in ? to_f(A[rank * d_in + col]) : 0.f;
      }
      __syncthreads();
      if (kc + 1 < nk) xt.load(p.x, p.ldx, rows, 0, col0 + kChunk, d_in, p.vec_x);
      q1.run(Xs, Ws);
      __syncthreads();  // Xs / Ws are rewritten by the next step
    }
    q1.reduce();
    if (Q1::ks() == 0) {
#pragma unroll
      for (int m = 0; m < Q1::TM; ++m)
#pragma unroll
        for (int q = 0; q < Q1::TN; ++q) {
          const int row = Q1::row(m), k = Q1::rank(q);
          const int64_t i = rows(row), rank = rc * RT + k;
          if (i >= 0 && rank < r) p.t[i * r + rank] = q1.acc[m][q];
          if (nrc == 1) ts[row * kLdt + k] = q1.acc[m][q];  // zero for padded ranks / rows
        }
    }
  }
  __syncthreads();  // ts and this block's rows of t are complete

  // Phase 2: out = layer_out + scale * t @ B.T, 128 columns at a time.
  const int64_t njt = (d_out + kTile - 1) / kTile;
  for (int64_t jt = 0; jt < njt; ++jt) {
    const int64_t j = jt * kTile + Q2::col();
    Vec4<T> lo[Q2::TM];  // issued first: in flight while B is staged and multiplied
#pragma unroll
    for (int m = 0; m < Q2::TM; ++m) {
      const int64_t i = rows(Q2::row(m));
      if (i >= 0 && j < d_out) lo[m] = load4(p.lo + i * p.ldl + j, j, d_out, p.vec_lo);
    }
    Q2 q2;
    q2.zero();
    for (int64_t rc = 0; rc < nrc; ++rc) {
      if (nrc > 1) {  // r > 64: this chunk of t back from global memory (written above)
        for (int e = threadIdx.x; e < BM * RT; e += kThreads) {
          const int row = e / RT, k = e % RT;
          const int64_t i = rows(row), rank = rc * RT + k;
          ts[row * kLdt + k] = i >= 0 && rank < r ? p.t[i * r + rank] : 0.f;
        }
      }
      // Bs[k][jj] = B[jt*128 + jj, rc*RT + k]; consecutive threads read consecutive ranks.
      for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
        const int k = e % RT, jj = e / RT;
        const int64_t rank = rc * RT + k, col = jt * kTile + jj;
        Bs[k * Q2::kLdw + jj] = rank < r && col < d_out ? to_f(B[col * r + rank]) : 0.f;
      }
      __syncthreads();
      q2.run(ts, Bs);
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < Q2::TM; ++m) {
      const int64_t i = rows(Q2::row(m));
      if (i >= 0 && j < d_out) {
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) v[c] = to_f(lo[m].v[c]) + p.scale * q2.acc[m][c];
        store4(p.out + i * p.ldo + j, j, d_out, p.vec_out, v);
      }
    }
  }
}

// ---- backward kernel 1: reads grad ----------------------------------------------------------
template <typename T, typename W>
struct BwdGParams {
  const T* g;
  int64_t ldg;
  const W* B;  // MULTI: the bank (G, d_out, r)
  const float* t;
  float* u;      // (n, r) fp32; null when !need_u
  float* ws_dB;  // (g_splits, r, d_out) fp32 partial sums of dB.T; null when !need_dB
  int64_t n, d_out, r;
  int64_t rows;    // rows per range, a multiple of kSub
  int64_t range0;  // block b handles row range range0 + b
  bool accumulate;  // add the dB.T partials to ws_dB (waves after the first) instead of storing
  bool need_u, need_dB, vec_g;
  MultiTable multi;  // MULTI only: units of p.multi.rows rows (a multiple of `rows`)
};

// Shared memory of kernel 1, in floats: us and tr [rows][RT+4], Gs [kSub][kTile+4] (also P3's
// reduction buffer), Bc [kTile][kLdw].
template <int RT>
size_t g_smem_bytes(int64_t rows) {
  return sizeof(float) * static_cast<size_t>(2 * rows * (RT + 4) + kSub * (kTile + 4) +
                                             kTile * P1<RT, kSub, kTile>::kLdw);
}

// One range of `nrows` (<= p.rows) rows, given by `rows`, for ranks rc*RT .. rc*RT+RT-1
// (rc = blockIdx.y), all d_out columns: u of the rows is accumulated in shared memory over the
// column tiles and written once; the range's dB.T partial goes to (or, with `accumulate`, is
// added to) workspace slice blockIdx.x.
template <typename T, typename W, int RT, typename RowMap>
__device__ __forceinline__ void g_range(const BwdGParams<T, W>& p, float* smem, const W* B,
                                        const RowMap& rows, int64_t nrows, bool accumulate) {
  using Q1 = P1<RT, kSub, kTile>;
  using Q3 = P3<RT, kSub>;
  constexpr int kLdr = RT + 4;
  constexpr int kLdg = kTile + 4;
  static_assert(Q3::kRedFloats <= kSub * kLdg, "P3 reduction buffer must fit in the grad tile");
  float* const us = smem;                // u of the block's rows, accumulated
  float* const tr = us + p.rows * kLdr;  // t of the block's rows
  float* const Gs = tr + p.rows * kLdr;  // grad tile, fp32
  float* const Bc = Gs + kSub * kLdg;    // Bc[kk][k] = B[col0 + kk, rc*RT + k]

  const int64_t d_out = p.d_out, r = p.r;
  const int64_t rc = blockIdx.y;  // rank chunk: ranks rc*RT .. rc*RT+RT-1
  const int nsub = static_cast<int>((nrows + kSub - 1) / kSub);
  const int64_t nj = (d_out + kTile - 1) / kTile;
  const int64_t steps = nj * nsub;  // pipeline steps: column tile major, row step minor

  for (int e = threadIdx.x; e < nsub * kSub * RT; e += kThreads) {
    const int row = e / RT, k = e % RT;
    const int64_t rank = rc * RT + k;
    us[row * kLdr + k] = 0.f;
    float tv = 0.f;
    if (p.need_dB && rank < r) {
      const int64_t i = rows(row);
      if (i >= 0) tv = p.t[i * r + rank];
    }
    tr[row * kLdr + k] = tv;
  }

  const Dropout none{};
  TileIO<T, kSub, kTile> gt;
  if (steps > 0) gt.load(p.g, p.ldg, rows, 0, 0, d_out, p.vec_g);
  int64_t step = 0;
  for (int64_t jc = 0; jc < nj; ++jc) {
    const int64_t col0 = jc * kTile;
    if (p.need_u) {  // consecutive threads read consecutive ranks of one row of B
      for (int e = threadIdx.x; e < kTile * RT; e += kThreads) {
        const int k = e % RT, kk = e / RT;
        const int64_t rank = rc * RT + k, col = col0 + kk;
        Bc[kk * Q1::kLdw + k] = rank < r && col < d_out ? to_f(B[col * r + rank]) : 0.f;
      }
    }
    Q3 q3;
    q3.zero();
    for (int sb = 0; sb < nsub; ++sb, ++step) {
      gt.store(Gs, kLdg, rows, sb * kSub, col0, d_out, none, nullptr);
      __syncthreads();
      if (step + 1 < steps) {  // next tile in flight during this one's products
        const int64_t nx = step + 1;
        gt.load(p.g, p.ldg, rows, (nx % nsub) * kSub, (nx / nsub) * kTile, d_out, p.vec_g);
      }
      if (p.need_u) {  // u[rows] += grad tile @ B[col0 .. col0+127, ranks]
        Q1 q1;
        q1.zero();
        q1.run(Gs, Bc);
        q1.reduce();
        if (Q1::ks() == 0) {  // each (row, rank) has exactly one owner: no race
#pragma unroll
          for (int m = 0; m < Q1::TM; ++m)
#pragma unroll
            for (int q = 0; q < Q1::TN; ++q)
              us[(sb * kSub + Q1::row(m)) * kLdr + Q1::rank(q)] += q1.acc[m][q];
        }
      }
      if (p.need_dB) q3.run(tr + sb * kSub * kLdr, Gs);  // dB.T[ranks, cols] += t.T @ grad
      __syncthreads();
    }
    if (p.need_dB) {
      float* out = p.ws_dB + (static_cast<int64_t>(blockIdx.x) * r + rc * RT) * d_out + col0;
      q3.finish(Gs, out, d_out, r - rc * RT, d_out - col0, accumulate);
    }
  }
  __syncthreads();
  if (p.need_u) {
    for (int e = threadIdx.x; e < nsub * kSub * RT; e += kThreads) {
      const int row = e / RT, k = e % RT;
      const int64_t rank = rc * RT + k;
      if (row < nrows && rank < r) p.u[rows(row) * r + rank] = us[row * kLdr + k];
    }
  }
}

// Plain op: block (b, rc) handles row range range0 + b. When n needs more ranges than there are
// workspace slices, the launcher runs waves of at most g_splits blocks that add into the same
// slices (fixed order: deterministic, and no two blocks of a wave share a slice).
// MULTI: block (b, rc) handles unit b of p.multi (up to p.multi.rows rows of one adapter) as
// consecutive ranges of p.rows rows, adding them into its own slice b in order.
template <typename T, typename W, int RT, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_bwd_g_kernel(const BwdGParams<T, W> p) {
  extern __shared__ float4 smem4[];
  float* const smem = reinterpret_cast<float*>(smem4);
  if constexpr (MULTI) {
    Unit u;
    if (!find_unit(p.multi, blockIdx.x, u)) return;  // uniform over the block
    const W* B = p.B + u.adapter * p.d_out * p.r;
    for (int64_t off = 0; off < u.count; off += p.rows) {
      if (off > 0) __syncthreads();  // the previous range's last reads of us are done
      const int64_t cnt = u.count - off < p.rows ? u.count - off : p.rows;
      g_range<T, W, RT>(p, smem, B, Rows<true>{p.multi.order, u.pos0 + off, cnt}, cnt, off > 0);
    }
  } else {
    const int64_t row0 = (p.range0 + blockIdx.x) * p.rows;
    const int64_t nrows = p.rows < p.n - row0 ? p.rows : p.n - row0;
    g_range<T, W, RT>(p, smem, p.B, Rows<false>{nullptr, row0, nrows}, nrows, p.accumulate);
  }
}

// ---- backward kernel 2: reads x ---------------------------------------------------------------
template <typename T, typename W>
struct BwdXParams {
  const T* x;
  int64_t ldx;
  const W* A;  // MULTI: the bank (G, r, d_in)
  const float* u;
  T* dx;         // (n, d_in) contiguous; null when !do_dx
  float* ws_dA;  // (splits, r, d_in) fp32 partial sums of dA; null when !do_dA
  int64_t n, d_in, r;
  int64_t rows;  // rows per block, a multiple of kSubX
  float scale;
  DropoutArgs dropout;
  bool do_dx, do_dA, vec_x, vec_dx;
  MultiTable multi;  // MULTI only: units of `rows` rows
};

// Shared memory of kernel 2, in floats: Xs [kSubX][kTile+4], Us [kSubX][RT+4], As [RT][kTile+4],
// overlaid after the row loop by P3's reduction buffer; then the keep flags [kSubX][kTile/4]
// (bytes). 32-row steps keep kernel 2 within 128 registers (two blocks per SM).
template <int RT>
struct XSmem {
  static constexpr int kMain = kSubX * (kTile + 4) + kSubX * (RT + 4) + RT * (kTile + 4);
  static constexpr int kRed = P3<RT, kSubX>::kRedFloats;
  static constexpr int kFloats = kMain > kRed ? kMain : kRed;
  static constexpr size_t kBytes = sizeof(float) * kFloats + kSubX * (kTile / 4);
};

template <typename W, int RT>
__device__ __forceinline__ void stage_A(float* As, const W* A, int64_t rc, int64_t r,
                                        int64_t col0, int64_t d_in) {
  // As[k][c] = A[rc*RT + k, col0 + c]; consecutive threads read consecutive columns.
  for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
    const int c = e % kTile, k = e / kTile;
    const int64_t rank = rc * RT + k, col = col0 + c;
    As[k * (kTile + 4) + c] = rank < r && col < d_in ? to_f(A[rank * d_in + col]) : 0.f;
  }
}

// The 128 columns from blockIdx.x * 128 of `nrows` rows given by `rows`, with weights A: dx of
// those rows and the dA partial of ranks chunk blockIdx.z, written to workspace slice `slice`.
template <typename T, typename W, int RT, typename RowMap>
__device__ __forceinline__ void x_split(const BwdXParams<T, W>& p, float* smem, const W* A,
                                        const RowMap& rows, int64_t nrows, int64_t slice) {
  using Q2 = P2<RT, kSubX>;
  using Q3 = P3<RT, kSubX>;
  constexpr int kLdx = kTile + 4;
  constexpr int kLdr = RT + 4;
  float* const Xs = smem;               // x * mask, fp32
  float* const Us = Xs + kSubX * kLdx;  // u rows of the step, ranks of the chunk
  float* const As = Us + kSubX * kLdr;  // A[ranks of the chunk, col0 ..]
  float* const red = Xs;                // P3's reduction buffer, after the loop
  uint8_t* const bits = reinterpret_cast<uint8_t*>(Xs + XSmem<RT>::kFloats);  // keep flags

  const int64_t d_in = p.d_in, r = p.r;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t zc = blockIdx.z;  // rank chunk of dA owned by this block
  const int nsub = static_cast<int>((nrows + kSubX - 1) / kSubX);
  const int64_t nrc = (r + RT - 1) / RT;
  // dx sums over all ranks: with r > 64 the z == 0 blocks do it, looping over the chunks.
  const bool do_dx = p.do_dx && zc == 0;
  const bool do_dA = p.do_dA;
  const Dropout dp = load_dropout(p.dropout);

  if (do_dx && nrc == 1) stage_A<W, RT>(As, A, 0, r, col0, d_in);
  TileIO<T, kSubX, kTile> xt;
  if (nsub > 0) xt.load(p.x, p.ldx, rows, 0, col0, d_in, p.vec_x);
  Q3 q3;
  q3.zero();
  for (int sb = 0; sb < nsub; ++sb) {
    const int64_t l0 = static_cast<int64_t>(sb) * kSubX;  // the step's first row in `rows`
    xt.store(Xs, kLdx, rows, l0, col0, d_in, dp, bits);
    if (sb + 1 < nsub) xt.load(p.x, p.ldx, rows, l0 + kSubX, col0, d_in, p.vec_x);
    Q2 q2;
    q2.zero();
    for (int64_t rc = 0; rc < nrc; ++rc) {
      const bool use_dA = do_dA && rc == zc;
      if (!do_dx && !use_dA) continue;  // uniform over the block
      for (int e = threadIdx.x; e < kSubX * RT; e += kThreads) {
        const int row = e / RT, k = e % RT;
        const int64_t rank = rc * RT + k;
        float uv = 0.f;
        if (rank < r) {
          const int64_t i = rows(l0 + row);
          if (i >= 0) uv = p.u[i * r + rank];
        }
        Us[row * kLdr + k] = uv;
      }
      if (do_dx && nrc > 1) stage_A<W, RT>(As, A, rc, r, col0, d_in);
      __syncthreads();
      if (do_dx) q2.run(Us, As);
      if (use_dA) q3.run(Us, Xs);
      __syncthreads();
    }
    if (do_dx) {
      const int64_t j = col0 + Q2::col();
#pragma unroll
      for (int m = 0; m < Q2::TM; ++m) {
        const int row = Q2::row(m);
        const int64_t i = rows(l0 + row);
        if (i >= 0 && j < d_in) {
          const unsigned keep = bits[row * (kTile / 4) + (threadIdx.x & 31)];
          float v[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float mult = dp.enabled ? (((keep >> c) & 1u) ? dp.inv_keep : 0.f) : 1.f;
            v[c] = p.scale * q2.acc[m][c] * mult;
          }
          store4(p.dx + i * d_in + j, j, d_in, p.vec_dx, v);
        }
      }
    }
    __syncthreads();  // Xs and bits are rewritten by the next step
  }
  if (do_dA) {
    float* out = p.ws_dA + (slice * r + zc * RT) * d_in + col0;
    q3.finish(red, out, d_in, r - zc * RT, d_in - col0, false);
  }
}

// Plain op: block (c, b, z) handles rows b * p.rows .. and writes dA slice b.
// MULTI: it handles units b, b + gridDim.y, ... of p.multi (rows of one adapter each), writing
// dA slice b for unit b (the launcher caps gridDim.y at 65535).
template <typename T, typename W, int RT, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) lor2c_bwd_x_kernel(const BwdXParams<T, W> p) {
  extern __shared__ float4 smem4[];
  float* const smem = reinterpret_cast<float*>(smem4);
  if constexpr (MULTI) {
    for (int64_t b = blockIdx.y;; b += gridDim.y) {
      Unit u;
      if (!find_unit(p.multi, b, u)) return;  // uniform over the block
      if (b != blockIdx.y) __syncthreads();   // shared memory of the previous unit is free
      x_split<T, W, RT>(p, smem, p.A + u.adapter * p.r * p.d_in,
                        Rows<true>{p.multi.order, u.pos0, u.count}, u.count, b);
    }
  } else {
    const int64_t row0 = static_cast<int64_t>(blockIdx.y) * p.rows;
    const int64_t nrows = p.rows < p.n - row0 ? p.rows : p.n - row0;
    x_split<T, W, RT>(p, smem, p.A, Rows<false>{nullptr, row0, nrows}, nrows, blockIdx.y);
  }
}

// ---- multi-adapter batches: the plan and the rows without an adapter --------------------------
// One block. plan[0 .. S] = seg (S = G + 2 slots, see MultiTable) from the stably sorted ids:
// seg[s] = first position whose id is >= s - 1 (seg[0] = 0, seg[S] = n). Then, for each of the
// (up to two) unit sizes rows_k > 0, plan[(k + 1) * (S + 1) ..] = bp: units of rows_k rows per
// adapter slot (1 .. G), as exclusive prefix sums.
constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads) lor2c_multi_plan_kernel(const int64_t* sorted,
                                                                        int64_t n, int64_t G,
                                                                        int64_t rows0,
                                                                        int64_t rows1,
                                                                        int64_t* plan) {
  __shared__ int64_t scan[kPlanThreads];
  const int tid = threadIdx.x;
  const int64_t S = G + 2;
  int64_t* const seg = plan;
  for (int64_t s = tid; s <= S; s += kPlanThreads) {
    int64_t v = n;
    if (s == 0) {
      v = 0;
    } else if (s < S) {  // lower bound of id s - 1
      const int64_t key = s - 1;
      int64_t lo = 0, hi = n;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < key) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      v = lo;
    }
    seg[s] = v;
  }
  __syncthreads();  // seg is visible to the whole block
  for (int k = 0; k < 2; ++k) {
    const int64_t rows = k == 0 ? rows0 : rows1;
    if (rows <= 0) continue;  // uniform
    int64_t* const bp = plan + (k + 1) * (S + 1);
    if (tid == 0) bp[0] = 0;
    int64_t carry = 0;
    for (int64_t base = 0; base < S; base += kPlanThreads) {
      const int64_t s = base + tid;
      scan[tid] = s >= 1 && s <= G ? (seg[s + 1] - seg[s] + rows - 1) / rows : 0;
      __syncthreads();
      for (int off = 1; off < kPlanThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
        const int64_t add = tid >= off ? scan[tid - off] : 0;
        __syncthreads();
        scan[tid] += add;
        __syncthreads();
      }
      if (s < S) bp[s + 1] = carry + scan[tid];
      carry += scan[kPlanThreads - 1];
      __syncthreads();  // everyone has read scan before the next chunk rewrites it
    }
  }
}

// Rows whose id is not an adapter (slots 0 and G + 1): forward out = layer_out, t = 0;
// backward dx = 0. Block b handles those rows b, b + gridDim.x, ...; threads the columns.
template <typename T>
struct NoneParams {
  const int64_t* order;
  const int64_t* seg;
  int64_t slots;
  const T* lo;  // forward: layer_out (row stride ldl) -> out (n, d_out); else null
  int64_t ldl;
  T* out;
  int64_t d_out;
  float* t;  // forward: t (n, r) -> 0; else null
  int64_t r;
  T* dx;  // backward: dx (n, d_in) -> 0; else null
  int64_t d_in;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) lor2c_multi_none_kernel(const NoneParams<T> p) {
  const int64_t a0 = p.seg[0], c0 = p.seg[1] - a0;
  const int64_t b0 = p.seg[p.slots - 1], total = c0 + (p.seg[p.slots] - b0);
  const T zero = Cvt<T>::from_float(0.f);
  for (int64_t k = blockIdx.x; k < total; k += gridDim.x) {
    const int64_t i = p.order[k < c0 ? a0 + k : b0 + (k - c0)];
    if (p.out != nullptr)
      for (int64_t j = threadIdx.x; j < p.d_out; j += kThreads)
        p.out[i * p.d_out + j] = p.lo[i * p.ldl + j];
    if (p.t != nullptr)
      for (int64_t j = threadIdx.x; j < p.r; j += kThreads) p.t[i * p.r + j] = 0.f;
    if (p.dx != nullptr)
      for (int64_t j = threadIdx.x; j < p.d_in; j += kThreads) p.dx[i * p.d_in + j] = zero;
  }
}

// ---- deterministic reduction of the per-split partial sums -----------------------------------
// out = scale * sum_s ws[s] (ws: splits x (R x C)), element (i, j) written to out[i*C + j], or
// to out[j*R + i] when `transpose`. Block (32, 16): 32 consecutive elements x 16 split lanes,
// combined in a fixed order.
// SEG (multi-adapter batches): out is a bank (G, R x C); adapter a sums slices bp[a + 1] ..
// bp[a + 2] - 1 (its units: see MultiTable), zero when it has none. Blocks (x, y) handle
// adapters y, y + gridDim.y, ...
template <typename OutT, bool SEG>
__global__ void __launch_bounds__(512) lor2c_reduce_kernel(const float* ws, int64_t splits,
                                                           int64_t R, int64_t C, float scale,
                                                           OutT* out, bool transpose,
                                                           const int64_t* bp, int64_t G) {
  __shared__ float red[16][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t total = R * C;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t adapters = SEG ? G : 1;
  for (int64_t a = SEG ? blockIdx.y : 0; a < adapters; a += gridDim.y) {
    int64_t first = 0, last = splits;
    if constexpr (SEG) {
      first = bp[a + 1];
      last = bp[a + 2];
    }
    float s = 0.f;
    if (e < total)
      for (int64_t sp = first + ty; sp < last; sp += 16) s += ws[sp * total + e];
    red[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && e < total) {
      float v = 0.f;
#pragma unroll
      for (int y = 0; y < 16; ++y) v += red[y][tx];
      const int64_t i = e / C, j = e % C;
      out[a * total + (transpose ? j * R + i : e)] = Cvt<OutT>::from_float(v * scale);
    }
    __syncthreads();  // red is rewritten for the next adapter
  }
}

// ---- host side -----------------------------------------------------------------------------
int rank_tile(int64_t r) { return r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A vector access of 4 elements at column multiples of 4 is aligned for every row.
bool vec_ok(const void* p, int64_t ld, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0 && ld % 4 == 0;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Unit tables of a multi-adapter call (null for the plain op): table k of the plan buffer.
MultiTable multi_table(const MultiArgs* m, int k, int64_t rows) {
  if (m == nullptr) return MultiTable{};
  const int64_t S = m->G + 2;
  return {m->order, m->plan, m->plan + (k + 1) * (S + 1), S, rows};
}

// Forward rows per block: 64 once there are enough blocks to fill the GPU twice, else 32.
int fwd_rows(int64_t n, const DeviceInfo& dev) {
  return ceil_div(n, 64) >= 2 * static_cast<int64_t>(dev.num_sms) ? 64 : 32;
}

template <typename T, typename W, int RT, int BM, bool MULTI>
cudaError_t fwd_launch_t(const FwdArgs& a, const MultiArgs* m, cudaStream_t stream) {
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
  p.vec_x = vec_ok(a.x, a.ldx, sizeof(T));
  p.vec_lo = vec_ok(a.layer_out, a.ldl, sizeof(T));
  p.vec_out = vec_ok(a.out, a.d_out, sizeof(T));
  p.multi = multi_table(m, 0, BM);
  // MULTI: at most ceil(n / BM) + G units (each adapter adds at most one partial block)
  const int64_t blocks = ceil_div(a.n, BM) + (MULTI ? m->G : 0);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = FwdSmem<RT, BM>::kBytes;
  auto kernel = lor2c_fwd_kernel<T, W, RT, BM, MULTI>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W, bool MULTI>
cudaError_t fwd_rank(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev,
                     cudaStream_t s) {
  const bool tall = fwd_rows(a.n, dev) == 64;
  switch (rank_tile(a.r)) {
    case 8:
      return tall ? fwd_launch_t<T, W, 8, 64, MULTI>(a, m, s)
                  : fwd_launch_t<T, W, 8, 32, MULTI>(a, m, s);
    case 16:
      return tall ? fwd_launch_t<T, W, 16, 64, MULTI>(a, m, s)
                  : fwd_launch_t<T, W, 16, 32, MULTI>(a, m, s);
    case 32:
      return tall ? fwd_launch_t<T, W, 32, 64, MULTI>(a, m, s)
                  : fwd_launch_t<T, W, 32, 32, MULTI>(a, m, s);
    default:
      return tall ? fwd_launch_t<T, W, 64, 64, MULTI>(a, m, s)
                  : fwd_launch_t<T, W, 64, 32, MULTI>(a, m, s);
  }
}

template <typename T, bool MULTI>
cudaError_t fwd_weights(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev,
                        cudaStream_t s) {
  return a.weights_fp32 ? fwd_rank<T, float, MULTI>(a, m, dev, s)
                        : fwd_rank<T, T, MULTI>(a, m, dev, s);
}

template <bool MULTI>
cudaError_t fwd_dispatch(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev,
                         cudaStream_t s) {
  switch (a.act) {
    case DType::kFloat32:
      return fwd_weights<float, MULTI>(a, m, dev, s);
    case DType::kFloat16:
      return fwd_weights<__half, MULTI>(a, m, dev, s);
    case DType::kBFloat16:
      return fwd_weights<__nv_bfloat16, MULTI>(a, m, dev, s);
  }
  return cudaErrorInvalidValue;
}

// bp: the unit table whose units own the slices (SEG), else null: out = one (R x C) result.
template <typename OutT>
cudaError_t reduce_launch(const float* ws, int64_t splits, int64_t R, int64_t C, float scale,
                          void* out, bool transpose, const int64_t* bp, int64_t G,
                          cudaStream_t stream) {
  const int64_t blocks = ceil_div(R * C, 32);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (bp == nullptr) {
    lor2c_reduce_kernel<OutT, false><<<dim3(static_cast<unsigned>(blocks)), dim3(32, 16), 0,
                                       stream>>>(ws, splits, R, C, scale,
                                                 static_cast<OutT*>(out), transpose, nullptr, 1);
  } else {
    const unsigned gy = static_cast<unsigned>(G < kMaxGridY ? G : kMaxGridY);
    lor2c_reduce_kernel<OutT, true><<<dim3(static_cast<unsigned>(blocks), gy), dim3(32, 16), 0,
                                      stream>>>(ws, splits, R, C, scale,
                                                static_cast<OutT*>(out), transpose, bp, G);
  }
  return cudaGetLastError();
}

// Multi-adapter batches: the plan kernel, and the rows without an adapter.
cudaError_t plan_launch(const MultiArgs& m, int64_t n, int64_t rows0, int64_t rows1,
                        cudaStream_t stream) {
  lor2c_multi_plan_kernel<<<dim3(1), dim3(kPlanThreads), 0, stream>>>(m.sorted_ids, n, m.G,
                                                                       rows0, rows1, m.plan);
  return cudaGetLastError();
}

template <typename T>
cudaError_t none_launch(const MultiArgs& m, int64_t n, NoneParams<T> p, const DeviceInfo& dev,
                        cudaStream_t stream) {
  p.order = m.order;
  p.seg = m.plan;
  p.slots = m.G + 2;
  const int64_t cap = 8 * static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1);
  const int64_t blocks = n < cap ? n : cap;
  if (blocks <= 0) return cudaSuccess;
  lor2c_multi_none_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                               stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W, int RT, bool MULTI>
cudaError_t bwd_launch_t(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                         const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t nrc = ceil_div(a.r, RT);
  if (nrc > 65535) return cudaErrorInvalidConfiguration;
  float* const u = a.workspace;
  float* const ws_dB = u + plan.u_elems;
  float* const ws_dA = ws_dB + plan.dB_ws_elems;
  const bool need_u = plan.u_elems > 0;
  const bool part_dB = a.need_dB && plan.dB_ws_elems > 0;
  const MultiTable g_table = multi_table(m, 0, plan.g_split_rows);
  const MultiTable x_table = multi_table(m, 1, plan.x_rows);
  cudaError_t err = cudaSuccess;

  if (plan.g_splits > 0 && (need_u || part_dB)) {
    BwdGParams<T, W> p;
    p.g = static_cast<const T*>(a.grad);
    p.ldg = a.ldg;
    p.B = static_cast<const W*>(a.B);
    p.t = a.t;
    p.u = need_u ? u : nullptr;
    p.ws_dB = part_dB ? ws_dB : nullptr;
    p.n = a.n;
    p.d_out = a.d_out;
    p.r = a.r;
    p.rows = plan.g_rows;
    p.need_u = need_u;
    p.need_dB = part_dB;
    p.vec_g = vec_ok(a.grad, a.ldg, sizeof(T));
    p.multi = g_table;
    auto kernel = lor2c_bwd_g_kernel<T, W, RT, MULTI>;
    if ((err = allow_smem(kernel, plan.g_smem)) != cudaSuccess) return err;
    if constexpr (MULTI) {  // one launch: g_splits bounds the units, one slice each
      if (plan.g_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
      p.range0 = 0;
      p.accumulate = false;
      const dim3 grid(static_cast<unsigned>(plan.g_splits), static_cast<unsigned>(nrc));
      kernel<<<grid, dim3(kThreads), plan.g_smem, stream>>>(p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else {
      // Waves of at most g_splits blocks (one per workspace slice); a single wave unless n is
      // very large. Later waves add to the slices, in launch order.
      const int64_t ranges = ceil_div(a.n, plan.g_rows);
      for (int64_t range0 = 0; range0 < ranges; range0 += plan.g_splits) {
        const int64_t blocks = ranges - range0 < plan.g_splits ? ranges - range0 : plan.g_splits;
        p.range0 = range0;
        p.accumulate = range0 > 0;
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(nrc));
        kernel<<<grid, dim3(kThreads), plan.g_smem, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
  }

  if (plan.x_splits > 0 && need_u && (a.need_dx || a.need_dA)) {
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
    p.rows = plan.x_rows;
    p.scale = a.scale;
    p.dropout = a.dropout;
    p.do_dx = a.need_dx;
    p.do_dA = a.need_dA;
    p.vec_x = vec_ok(a.x, a.ldx, sizeof(T));
    p.vec_dx = vec_ok(a.dx, a.d_in, sizeof(T));
    p.multi = x_table;
    auto kernel = lor2c_bwd_x_kernel<T, W, RT, MULTI>;
    // MULTI: blocks loop over the units past the grid.y limit
    const int64_t gy = MULTI && plan.x_splits > kMaxGridY ? kMaxGridY : plan.x_splits;
    if (ceil_div(a.d_in, kTile) > 0x7fffffff || gy > kMaxGridY)
      return cudaErrorInvalidConfiguration;
    if ((err = allow_smem(kernel, plan.x_smem)) != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.d_in, kTile)), static_cast<unsigned>(gy),
                    static_cast<unsigned>(a.need_dA ? nrc : 1));
    kernel<<<grid, dim3(kThreads), plan.x_smem, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  } else if (a.need_dx && a.n * a.d_in > 0) {  // r == 0 or nothing to multiply: dx = 0
    if ((err = cudaMemsetAsync(a.dx, 0, sizeof(T) * a.n * a.d_in, stream)) != cudaSuccess)
      return err;
  }
  if constexpr (MULTI) {
    if (a.need_dx && a.n * a.d_in > 0) {  // rows without an adapter: dx = 0
      NoneParams<T> np{};
      np.dx = static_cast<T*>(a.dx);
      np.d_in = a.d_in;
      if ((err = none_launch<T>(*m, a.n, np, dev, stream)) != cudaSuccess) return err;
    }
  }

  // With no rows there are no partials (splits == 0) and the sums below are zeros; in a
  // multi-adapter batch an adapter without units gets zeros the same way.
  if (a.need_dA) {
    const int64_t splits = plan.dA_ws_elems > 0 ? plan.x_splits : 0;
    if ((err = reduce_launch<W>(ws_dA, splits, a.r, a.d_in, a.scale, a.dA, false,
                                MULTI ? x_table.bp : nullptr, MULTI ? m->G : 1, stream)) !=
        cudaSuccess)
      return err;
  }
  if (a.need_dB) {
    const int64_t splits = part_dB ? plan.g_splits : 0;
    if ((err = reduce_launch<W>(ws_dB, splits, a.r, a.d_out, a.scale, a.dB, true,
                                MULTI ? g_table.bp : nullptr, MULTI ? m->G : 1, stream)) !=
        cudaSuccess)
      return err;
  }
  return cudaSuccess;
}

template <typename T, typename W, bool MULTI>
cudaError_t bwd_rank(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                     const DeviceInfo& dev, cudaStream_t s) {
  switch (rank_tile(a.r)) {
    case 8:
      return bwd_launch_t<T, W, 8, MULTI>(a, plan, m, dev, s);
    case 16:
      return bwd_launch_t<T, W, 16, MULTI>(a, plan, m, dev, s);
    case 32:
      return bwd_launch_t<T, W, 32, MULTI>(a, plan, m, dev, s);
    default:
      return bwd_launch_t<T, W, 64, MULTI>(a, plan, m, dev, s);
  }
}

template <typename T, bool MULTI>
cudaError_t bwd_weights(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                        const DeviceInfo& dev, cudaStream_t s) {
  return a.weights_fp32 ? bwd_rank<T, float, MULTI>(a, plan, m, dev, s)
                        : bwd_rank<T, T, MULTI>(a, plan, m, dev, s);
}

template <bool MULTI>
cudaError_t bwd_dispatch(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                         const DeviceInfo& dev, cudaStream_t s) {
  switch (a.act) {
    case DType::kFloat32:
      return bwd_weights<float, MULTI>(a, plan, m, dev, s);
    case DType::kFloat16:
      return bwd_weights<__half, MULTI>(a, plan, m, dev, s);
    case DType::kBFloat16:
      return bwd_weights<__nv_bfloat16, MULTI>(a, plan, m, dev, s);
  }
  return cudaErrorInvalidValue;
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace

cudaError_t lor2c_fwd_launch(const FwdArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (ceil_div(args.n, 32) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return fwd_dispatch<false>(args, nullptr, dev, stream);
}

BwdPlan lor2c_bwd_plan(int64_t n, int64_t d_in, int64_t d_out, int64_t r, bool need_dx,
                       bool need_dA, bool need_dB, const DeviceInfo& dev) {
  BwdPlan plan{};
  if (n <= 0 || r <= 0) return plan;
  const int rt = rank_tile(r);
  const int64_t nrc = ceil_div(r, rt);
  const int64_t sms = dev.num_sms > 0 ? dev.num_sms : 1;
  const bool need_u = (need_dx || need_dA) && d_in > 0;

  if (need_u || need_dB) {
    // Kernel 1: one block per range of `rows` rows, at most `want` blocks (1-2 per SM) per
    // launch. u and t of a range live in shared memory (2 * rows * (rt + 4) floats), so large
    // n gets ranges as tall as fit (up to a cap). The dB workspace is g_splits * r * d_out
    // floats: bounded by the SM count, not by n.
    size_t fixed = 0;
    switch (rt) {
      case 8: fixed = g_smem_bytes<8>(0); break;
      case 16: fixed = g_smem_bytes<16>(0); break;
      case 32: fixed = g_smem_bytes<32>(0); break;
      default: fixed = g_smem_bytes<64>(0); break;
    }
    const int64_t per_row = 2 * sizeof(float) * (rt + 4);
    const int64_t room = dev.max_smem_per_block - static_cast<int64_t>(fixed);
    int64_t max_rows = room > 0 ? room / per_row / kSub * kSub : 0;
    const int64_t cap = rt == 8 ? 1024 : rt == 16 ? 512 : 256;
    if (max_rows > cap) max_rows = cap;
    if (max_rows < kSub) max_rows = kSub;  // smallest configuration (~101 KB at rt = 64)
    const int64_t per_sm = rt == 64 ? 1 : 2;  // <= 128 registers: at most 2 blocks per SM
    int64_t want = sms * per_sm / nrc;
    if (want < 1) want = 1;
    int64_t rows = round_up(ceil_div(n, want), kSub);
    if (rows > max_rows) rows = max_rows;
    if (rows < kSub) rows = kSub;
    const int64_t ranges = ceil_div(n, rows);
    plan.g_rows = rows;
    plan.g_splits = ranges < want ? ranges : want;  // blocks per launch = workspace slices
    plan.g_smem = fixed + static_cast<size_t>(per_row * rows);
  }
  if (need_u) {
    // Kernel 2: 128 columns x x_rows rows per block, about two blocks per SM in total.
    const int64_t col_tiles = ceil_div(d_in, kTile);
    const int64_t z = need_dA ? nrc : 1;
    int64_t splits = ceil_div(2 * sms, col_tiles * z);
    if (splits < 1) splits = 1;
    int64_t rows = round_up(ceil_div(n, splits), kSubX);
    const int64_t min_rows = round_up(ceil_div(n, 65535), kSubX);  // grid.y limit
    if (rows < min_rows) rows = min_rows;
    plan.x_rows = rows;
    plan.x_splits = ceil_div(n, rows);
    switch (rt) {
      case 8: plan.x_smem = XSmem<8>::kBytes; break;
      case 16: plan.x_smem = XSmem<16>::kBytes; break;
      case 32: plan.x_smem = XSmem<32>::kBytes; break;
      default: plan.x_smem = XSmem<64>::kBytes; break;
    }
    plan.u_elems = n * r;
  }
  if (need_dB && plan.g_splits > 0) plan.dB_ws_elems = plan.g_splits * r * d_out;
  if (need_dA && plan.x_splits > 0) plan.dA_ws_elems = plan.x_splits * r * d_in;
  return plan;
}

cudaError_t lor2c_bwd_launch(const BwdArgs& args, const BwdPlan& plan, const DeviceInfo& dev,
                             cudaStream_t stream) {
  return bwd_dispatch<false>(args, plan, nullptr, dev, stream);
}

// ---- multi-adapter batches ------------------------------------------------------------------
int64_t lor2c_multi_plan_elems(int64_t G) { return 3 * (G + 3); }

cudaError_t lor2c_multi_fwd_launch(const FwdArgs& args, const MultiArgs& multi,
                                   const DeviceInfo& dev, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (multi.G <= 0) return cudaErrorInvalidValue;
  cudaError_t err = plan_launch(multi, args.n, fwd_rows(args.n, dev), 0, stream);
  if (err != cudaSuccess) return err;
  if ((err = fwd_dispatch<true>(args, &multi, dev, stream)) != cudaSuccess) return err;
  switch (args.act) {  // rows without an adapter: out = layer_out, t = 0
    case DType::kFloat32:
      return none_launch<float>(multi, args.n,
                                {nullptr, nullptr, 0, static_cast<const float*>(args.layer_out),
                                 args.ldl, static_cast<float*>(args.out), args.d_out, args.t,
                                 args.r, nullptr, 0},
                                dev, stream);
    case DType::kFloat16:
      return none_launch<__half>(
          multi, args.n,
          {nullptr, nullptr, 0, static_cast<const __half*>(args.layer_out), args.ldl,
           static_cast<__half*>(args.out), args.d_out, args.t, args.r, nullptr, 0},
          dev, stream);
    case DType::kBFloat16:
      return none_launch<__nv_bfloat16>(
          multi, args.n,
          {nullptr, nullptr, 0, static_cast<const __nv_bfloat16*>(args.layer_out), args.ldl,
           static_cast<__nv_bfloat16*>(args.out), args.d_out, args.t, args.r, nullptr, 0},
          dev, stream);
  }
  return cudaErrorInvalidValue;
}

BwdPlan lor2c_multi_bwd_plan(int64_t n, int64_t d_in, int64_t d_out, int64_t r, int64_t G,
                             bool need_dx, bool need_dA, bool need_dB, const DeviceInfo& dev) {
  BwdPlan plan = lor2c_bwd_plan(n, d_in, d_out, r, need_dx, need_dA, need_dB, dev);
  if (n <= 0 || r <= 0) return plan;
  if (plan.g_splits > 0) {
    // Kernel 1 units: rows of one adapter, a multiple of g_rows and >= n / g_splits rows, so
    // there are at most g_splits + G of them (dense: g_splits blocks per wave).
    plan.g_split_rows = round_up(ceil_div(n, plan.g_splits), plan.g_rows);
    plan.g_splits = ceil_div(n, plan.g_split_rows) + G;
    plan.dB_ws_elems = need_dB ? plan.g_splits * r * d_out : 0;
  }
  if (plan.x_splits > 0) {  // kernel 2 units: x_rows rows of one adapter
    plan.x_splits = ceil_div(n, plan.x_rows) + G;
    plan.dA_ws_elems = need_dA ? plan.x_splits * r * d_in : 0;
  }
  return plan;
}

cudaError_t lor2c_multi_bwd_launch(const BwdArgs& args, const MultiArgs& multi,
                                   const BwdPlan& plan, const DeviceInfo& dev,
                                   cudaStream_t stream) {
  if (multi.G <= 0) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (args.n <= 0 || args.r <= 0) {  // nothing to multiply: every gradient is zero
    const size_t act = args.act == DType::kFloat32 ? 4 : 2;
    const size_t w = args.weights_fp32 ? 4 : act;
    if (args.need_dx && args.n * args.d_in > 0 &&
        (err = cudaMemsetAsync(args.dx, 0, act * args.n * args.d_in, stream)) != cudaSuccess)
      return err;
    if (args.need_dA && multi.G * args.r * args.d_in > 0 &&
        (err = cudaMemsetAsync(args.dA, 0, w * multi.G * args.r * args.d_in, stream)) !=
            cudaSuccess)
      return err;
    if (args.need_dB && multi.G * args.d_out * args.r > 0 &&
        (err = cudaMemsetAsync(args.dB, 0, w * multi.G * args.d_out * args.r, stream)) !=
            cudaSuccess)
      return err;
    return cudaSuccess;
  }
  if ((err = plan_launch(multi, args.n, plan.g_split_rows, plan.x_rows, stream)) != cudaSuccess)
    return err;
  return bwd_dispatch<true>(args, plan, &multi, dev, stream);
}

}  // namespace cuda
}  // namespace lor2c
