// The block-level building blocks of the LoR2C kernels (lor2c_fwd.cu, lor2c_bwd.cu): the
// launch constants, 4-element vector access, the row maps, the activation tile staging (TileIO,
// which applies the dropout mask) and the three block-level products over shared memory:
//   P1  acc (rows x ranks)    += X (rows x cols) . W (cols x ranks)   reduction over columns
//   P2  acc (rows x 128 cols) += R (rows x ranks) . W (ranks x 128)   reduction over ranks
//   P3  acc (ranks x 128 cols) += R (rows x ranks).T . X (rows x 128) reduction over rows
// forward: t = P1(x, A.T), out = layer_out + s * P2(t, B.T); backward kernel 1: u = P1(grad, B),
// dB.T partial = P3(t, grad); kernel 2: dx = s * P2(u, A) * mask, dA partial = P3(u, x * mask).
// Every block runs kThreads = 256 threads; accumulation is fp32, global indices 64-bit.
// nvcc only, no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace lor2c {
namespace cuda {

constexpr int kThreads = 256;  // threads of every kernel but the reduction: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;  // forward phase 1: columns of x per pipeline step
constexpr int kTile = 128;  // columns per tile: forward phase 2 and both backward kernels
constexpr int kSub = 64;    // rows per pipeline step of backward kernel 1
constexpr int kSubX = 32;   // rows per pipeline step of backward kernel 2

// The rank tile RT of a call: the smallest of 8/16/32/64 that is >= r (r > 64: chunks of 64).
inline int rank_tile(int64_t r) { return r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }

// ---- vector access of rows ---------------------------------------------------------------------
// N consecutive elements, aligned so that a single access moves them: 4 elements for the
// CUDA-core kernels (8 or 16 bytes), 8 16-bit elements for the tensor-core ones (16 bytes).
template <typename T, int N>
struct alignas(N * sizeof(T)) Vec {
  T v[N];
};
template <typename T>
using Vec4 = Vec<T, 4>;
template <typename T>
using Vec8 = Vec<T, 8>;

// Loads columns j..j+N-1 of one row (p points at column j), zero past column d; one vector
// access when the caller vouched for the alignment (vec_ok) and the group is whole.
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, int64_t j, int64_t d, bool vec) {
  Vec<T, N> v;
  if (vec && j + N <= d) {
    v = *reinterpret_cast<const Vec<T, N>*>(p);
  } else {
#pragma unroll
    for (int c = 0; c < N; ++c) v.v[c] = j + c < d ? p[c] : from_float<T>(0.f);
  }
  return v;
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t j, int64_t d, bool vec, const float v[N]) {
  if (vec && j + N <= d) {
    Vec<T, N> w;
#pragma unroll
    for (int c = 0; c < N; ++c) w.v[c] = from_float<T>(v[c]);
    *reinterpret_cast<Vec<T, N>*>(p) = w;
  } else {
#pragma unroll
    for (int c = 0; c < N; ++c)
      if (j + c < d) p[c] = from_float<T>(v[c]);
  }
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

// ---- activation tile staging -------------------------------------------------------------
// The register side of a tile's staging (TileIO here, TileIO8 in lor2c_mma.cuh): a ROWS x COLS
// tile of a row-major activation in groups of N columns, thread tid holding groups tid, tid + 256,
// ... in row-major order (consecutive threads read consecutive groups of a row: coalesced).
template <typename T, int ROWS, int COLS, int N>
struct TileRegs {
  static constexpr int kGroupsPerRow = COLS / N;
  static constexpr int kGroups = ROWS * kGroupsPerRow / kThreads;
  static_assert(kGroups * kThreads == ROWS * kGroupsPerRow, "tile must split evenly");
  Vec<T, N> reg[kGroups];

  // Rows rows(l0), rows(l0 + 1), ... (see Rows), columns col0.. (< d) of base (row stride ld);
  // zeros outside.
  template <typename RowMap>
  __device__ __forceinline__ void load(const T* base, int64_t ld, const RowMap& rows, int64_t l0,
                                       int64_t col0, int64_t d, bool vec) {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      const int g = static_cast<int>(threadIdx.x) + q * kThreads;
      const int64_t i = rows(l0 + g / kGroupsPerRow);
      const int64_t j = col0 + N * (g % kGroupsPerRow);
      if (i >= 0 && j < d) {
        reg[q] = load_vec<N>(base + i * ld + j, j, d, vec);
      } else {
#pragma unroll
        for (int c = 0; c < N; ++c) reg[q].v[c] = from_float<T>(0.f);
      }
    }
  }
};

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
struct TileIO : TileRegs<T, ROWS, COLS, 4> {
  using Regs = TileRegs<T, ROWS, COLS, 4>;
  using Regs::kGroups;
  using Regs::kGroupsPerRow;
  using Regs::reg;
  static_assert(kGroupsPerRow % 2 == 0 && kGroups % 2 == 0,
                "lane pairs share 8-column Philox groups over pairs of steps");

  // Writes the tile to S (row stride lds) as fp32 times the dropout multipliers; when `bits`
  // is not null, bits[row * COLS/4 + group] receives the group's keep flags (bits 0..3).
  // The mask of element (i, j) uses i = rows(l0 + row), the row's index in the tensor.
  // col0 must be a multiple of 8.
  template <typename RowMap>
  __device__ __forceinline__ void store(float* S, int lds, const RowMap& rows, int64_t l0,
                                        int64_t col0, int64_t d, const DropoutParams& dp,
                                        uint8_t* bits) const {
    const int half = static_cast<int>(threadIdx.x & 1u);  // this lane's half of its 8 columns
#pragma unroll
    for (int q0 = 0; q0 < kGroups; q0 += 2) {
      unsigned keep8[2] = {0xFFu, 0xFFu};  // steps q0 and q0 + 1, all 8 columns
      if (dp.enabled) {                    // uniform over the block
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
        for (int c = 0; c < 4; ++c) v[c] = to_float(reg[q].v[c]);
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

}  // namespace cuda
}  // namespace lor2c
