// LoR2C backward on CUDA: the two main kernels, the deterministic reduction of their partial
// sums, the launch plan and the launchers, for the plain op (lor2c_bwd_plan / lor2c_bwd_launch)
// and multi-adapter batches (lor2c_multi_bwd_plan / lor2c_multi_bwd_launch). Raw pointers, no
// torch.
//
//   lor2c_bwd_g_kernel   kernel 1, one block per range of `g_rows` rows, all d_out columns, at
//                        most ~1-2 blocks per SM (more ranges: several launches): reads grad
//                        once, u = grad @ B (P1, accumulated in shared memory, written once) and
//                        the block's partial dB.T = t.T @ grad (P3).
//   lor2c_bwd_x_kernel   kernel 2, one block per (128 columns, `x_rows` rows): reads x once (mask
//                        regenerated), dx = s * (u @ A) * mask (P2) and the block's partial
//                        dA = u.T @ (x * mask) (P3).
//   lor2c_reduce_kernel  sums the partials in a fixed order (no atomics), scales, casts.
// MULTI = true (multi-adapter batches): blocks work on units of rows of one adapter
// (lor2c_multi_plan.cuh); the plan kernel runs first, lor2c_multi_none_kernel writes dx = 0 for
// the rows without an adapter, and the reduction sums each adapter's slices into its bank row.
// With LOR2C_CUDA_MMA=1 and fp16 / bf16 activations kernels 1 and 2 are lor2c_bwd_g_mma_kernel
// and lor2c_bwd_x_mma_kernel (lor2c_mma.cuh, tensor cores): same grids, plan and workspace; kernel
// 1 walks its rows in shared-memory ranges that fit its own layout (a divisor of g_rows).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "lor2c_kernels.h"
#include "lor2c_mma.cuh"
#include "lor2c_multi_plan.cuh"
#include "lor2c_params.cuh"
#include "lor2c_products.cuh"

namespace lor2c {
namespace cuda {
namespace {

// ---- backward kernel 1: reads grad ----------------------------------------------------------
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

  const DropoutParams none{};
  TileIO<T, kSub, kTile> gt;
  if (steps > 0) gt.load(p.g, p.ldg, rows, 0, 0, d_out, p.vec_g);
  int64_t step = 0;
  for (int64_t jc = 0; jc < nj; ++jc) {
    const int64_t col0 = jc * kTile;
    if (p.need_u) {  // consecutive threads read consecutive ranks of one row of B
      for (int e = threadIdx.x; e < kTile * RT; e += kThreads) {
        const int k = e % RT, kk = e / RT;
        const int64_t rank = rc * RT + k, col = col0 + kk;
        Bc[kk * Q1::kLdw + k] = rank < r && col < d_out ? to_float(B[col * r + rank]) : 0.f;
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
__device__ __forceinline__ void stage_A(float* As, const W* A, int64_t rc, int64_t r, int64_t col0,
                                        int64_t d_in) {
  // As[k][c] = A[rc*RT + k, col0 + c]; consecutive threads read consecutive columns.
  for (int e = threadIdx.x; e < RT * kTile; e += kThreads) {
    const int c = e % kTile, k = e / kTile;
    const int64_t rank = rc * RT + k, col = col0 + c;
    As[k * (kTile + 4) + c] = rank < r && col < d_in ? to_float(A[rank * d_in + col]) : 0.f;
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
  const DropoutParams dp = load_dropout(p.dropout);

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
          store_vec<4>(p.dx + i * d_in + j, j, d_in, p.vec_dx, v);
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
  x_block_rows<MULTI>(p, [&](const W* A, const auto& rows, int64_t count, int64_t slice) {
    x_split<T, W, RT>(p, smem, A, rows, count, slice);
  });
}

// ---- deterministic reduction of the per-split partial sums -----------------------------------
// out = scale * sum_s ws[s] (ws: splits x (R x C)), element (i, j) written to out[i*C + j], or
// to out[j*R + i] when `transpose`. Block (32, 16): 32 consecutive elements x 16 split lanes,
// combined in a fixed order.
// SEG (multi-adapter batches): out is a bank (G, R x C); adapter a sums slices bp[a + 1] ..
// bp[a + 2] - 1 (its units: see MultiTable), zero when it has none. Blocks (x, y) handle
// adapters y, y + gridDim.y, ...
template <typename OutT, bool SEG>
__global__ void __launch_bounds__(512)
    lor2c_reduce_kernel(const float* ws, int64_t splits, int64_t R, int64_t C, float scale,
                        OutT* out, bool transpose, const int64_t* bp, int64_t G) {
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
      out[a * total + (transpose ? j * R + i : e)] = from_float<OutT>(v * scale);
    }
    __syncthreads();  // red is rewritten for the next adapter
  }
}

// ---- host side ---------------------------------------------------------------------------------
// bp: the unit table whose units own the slices (SEG), else null: out = one (R x C) result.
template <typename OutT>
cudaError_t reduce_launch(const float* ws, int64_t splits, int64_t R, int64_t C, float scale,
                          void* out, bool transpose, const int64_t* bp, int64_t G,
                          cudaStream_t stream) {
  const int64_t blocks = ceil_div(R * C, 32);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (bp == nullptr) {
    lor2c_reduce_kernel<OutT, false>
        <<<dim3(static_cast<unsigned>(blocks)), dim3(32, 16), 0, stream>>>(
            ws, splits, R, C, scale, static_cast<OutT*>(out), transpose, nullptr, 1);
  } else {
    const unsigned gy = static_cast<unsigned>(G < kMaxGridY ? G : kMaxGridY);
    lor2c_reduce_kernel<OutT, true>
        <<<dim3(static_cast<unsigned>(blocks), gy), dim3(32, 16), 0, stream>>>(
            ws, splits, R, C, scale, static_cast<OutT*>(out), transpose, bp, G);
  }
  return cudaGetLastError();
}

// Kernel 1 of the tensor-core path: rows per shared-memory range, the largest multiple of kSub
// dividing plan.g_rows (so it divides every unit and range) whose layout fits the device; 0 when
// none does.
template <int RT>
int64_t g_mma_rows(const BwdPlan& plan, const DeviceInfo& dev) {
  const int64_t units = plan.g_rows / kSub;
  for (int64_t k = units; k >= 1; --k)
    if (units % k == 0 &&
        static_cast<int64_t>(MmaGSmem<RT>::bytes(k * kSub)) <= dev.max_smem_per_block)
      return k * kSub;
  return 0;
}

// Kernel 1 (MMA: the tensor-core one, over shared-memory ranges of g_mma_rows rows).
template <typename T, typename W, int RT, bool MULTI, bool MMA>
cudaError_t g_launch(const BwdArgs& a, const BwdPlan& plan, const MultiTable& table, bool need_u,
                     bool part_dB, float* u, float* ws_dB, const DeviceInfo& dev,
                     cudaStream_t stream) {
  BwdGParams<T, W> p =
      g_params<T, W>(a, plan.g_rows, table, need_u, part_dB, u, ws_dB, MMA ? kMmaLanes : kLanes);
  size_t smem = plan.g_smem;
  if constexpr (MMA) {
    p.rows = g_mma_rows<RT>(plan, dev);
    if (p.rows <= 0) return cudaErrorInvalidConfiguration;
    smem = MmaGSmem<RT>::bytes(p.rows);
  }
  const unsigned nrc = static_cast<unsigned>(ceil_div(a.r, RT));
  auto waves = [&](auto kernel) -> cudaError_t {
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    if constexpr (MULTI) {  // one launch: g_splits bounds the units, one slice each
      if (plan.g_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
      kernel<<<dim3(static_cast<unsigned>(plan.g_splits), nrc), dim3(kThreads), smem, stream>>>(p);
      return cudaGetLastError();
    } else {
      // Waves of at most g_splits blocks (one per workspace slice); a single wave unless n is
      // very large. Later waves add to the slices, in launch order.
      const int64_t ranges = ceil_div(a.n, plan.g_rows);
      for (int64_t range0 = 0; range0 < ranges; range0 += plan.g_splits) {
        const int64_t blocks = ranges - range0 < plan.g_splits ? ranges - range0 : plan.g_splits;
        p.range0 = range0;
        p.accumulate = range0 > 0;
        kernel<<<dim3(static_cast<unsigned>(blocks), nrc), dim3(kThreads), smem, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      return cudaSuccess;
    }
  };
  if constexpr (MMA)
    return waves(lor2c_bwd_g_mma_kernel<T, W, RT, MULTI>);
  else
    return waves(lor2c_bwd_g_kernel<T, W, RT, MULTI>);
}

// Kernel 2 (MMA: the tensor-core one).
template <typename T, typename W, int RT, bool MULTI, bool MMA>
cudaError_t x_launch(const BwdArgs& a, const BwdPlan& plan, const MultiTable& table, float* u,
                     float* ws_dA, cudaStream_t stream) {
  const BwdXParams<T, W> p =
      x_params<T, W>(a, plan.x_rows, table, u, ws_dA, MMA ? kMmaLanes : kLanes);
  // MULTI: blocks loop over the units past the grid.y limit
  const int64_t gy = MULTI && plan.x_splits > kMaxGridY ? kMaxGridY : plan.x_splits;
  if (ceil_div(a.d_in, kTile) > 0x7fffffff || gy > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.d_in, kTile)), static_cast<unsigned>(gy),
                  static_cast<unsigned>(a.need_dA ? ceil_div(a.r, RT) : 1));
  if constexpr (MMA)
    return launch_kernel(lor2c_bwd_x_mma_kernel<T, W, RT, MULTI>, grid, MmaXSmem<RT>::kBytes,
                         stream, p);
  else
    return launch_kernel(lor2c_bwd_x_kernel<T, W, RT, MULTI>, grid, plan.x_smem, stream, p);
}

// MMA: kernels 1 and 2 are the tensor-core ones (RT is then 16, 32 or 64; T is 16-bit).
template <typename T, typename W, int RT, bool MULTI, bool MMA>
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

  if (plan.g_splits > 0 && (need_u || part_dB) &&
      (err = g_launch<T, W, RT, MULTI, MMA>(a, plan, g_table, need_u, part_dB, u, ws_dB, dev,
                                            stream)) != cudaSuccess)
    return err;
  if (plan.x_splits > 0 && need_u && (a.need_dx || a.need_dA)) {
    if ((err = x_launch<T, W, RT, MULTI, MMA>(a, plan, x_table, u, ws_dA, stream)) != cudaSuccess)
      return err;
  } else if (a.need_dx && a.n * a.d_in > 0) {  // r == 0 or nothing to multiply: dx = 0
    if ((err = cudaMemsetAsync(a.dx, 0, sizeof(T) * a.n * a.d_in, stream)) != cudaSuccess)
      return err;
  }
  if constexpr (MULTI) {
    if (a.need_dx && a.n * a.d_in > 0) {  // rows without an adapter: dx = 0
      NoneArgs none{};
      none.dx = a.dx;
      none.d_in = a.d_in;
      if ((err = multi_none_launch(*m, a.act, a.n, none, dev, stream)) != cudaSuccess) return err;
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

template <typename T, typename W, bool MULTI, bool MMA>
cudaError_t bwd_rank(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                     const DeviceInfo& dev, cudaStream_t s) {
  const int rt = MMA ? mma_rank_tile(a.r) : rank_tile(a.r);
  if constexpr (!MMA) {
    if (rt == 8) return bwd_launch_t<T, W, 8, MULTI, MMA>(a, plan, m, dev, s);
  }
  switch (rt) {
    case 16:
      return bwd_launch_t<T, W, 16, MULTI, MMA>(a, plan, m, dev, s);
    case 32:
      return bwd_launch_t<T, W, 32, MULTI, MMA>(a, plan, m, dev, s);
    default:
      return bwd_launch_t<T, W, 64, MULTI, MMA>(a, plan, m, dev, s);
  }
}

template <typename T, bool MULTI>
cudaError_t bwd_weights(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                        const DeviceInfo& dev, cudaStream_t s) {
  if constexpr (!std::is_same<T, float>::value) {
    if (lor2c_mma_enabled())
      return a.weights_fp32 ? bwd_rank<T, float, MULTI, true>(a, plan, m, dev, s)
                            : bwd_rank<T, T, MULTI, true>(a, plan, m, dev, s);
  }
  return a.weights_fp32 ? bwd_rank<T, float, MULTI, false>(a, plan, m, dev, s)
                        : bwd_rank<T, T, MULTI, false>(a, plan, m, dev, s);
}

template <bool MULTI>
cudaError_t bwd_dispatch(const BwdArgs& a, const BwdPlan& plan, const MultiArgs* m,
                         const DeviceInfo& dev, cudaStream_t s) {
  return dispatch_dtype(a.act, [&](auto tag) -> cudaError_t {
    return bwd_weights<decltype(tag), MULTI>(a, plan, m, dev, s);
  });
}

}  // namespace

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
      case 8:
        fixed = g_smem_bytes<8>(0);
        break;
      case 16:
        fixed = g_smem_bytes<16>(0);
        break;
      case 32:
        fixed = g_smem_bytes<32>(0);
        break;
      default:
        fixed = g_smem_bytes<64>(0);
        break;
    }
    const int64_t per_row = 2 * sizeof(float) * (rt + 4);
    const int64_t room = dev.max_smem_per_block - static_cast<int64_t>(fixed);
    int64_t max_rows = room > 0 ? room / per_row / kSub * kSub : 0;
    const int64_t cap = rt == 8 ? 1024 : rt == 16 ? 512 : 256;
    if (max_rows > cap) max_rows = cap;
    if (max_rows < kSub) max_rows = kSub;     // smallest configuration (~101 KB at rt = 64)
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
      case 8:
        plan.x_smem = XSmem<8>::kBytes;
        break;
      case 16:
        plan.x_smem = XSmem<16>::kBytes;
        break;
      case 32:
        plan.x_smem = XSmem<32>::kBytes;
        break;
      default:
        plan.x_smem = XSmem<64>::kBytes;
        break;
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

cudaError_t lor2c_multi_bwd_launch(const BwdArgs& args, const MultiArgs& multi, const BwdPlan& plan,
                                   const DeviceInfo& dev, cudaStream_t stream) {
  if (multi.G <= 0) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (args.n <= 0 || args.r <= 0) {  // nothing to multiply: every gradient is zero
    const size_t act = dtype_size(args.act);
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
  if ((err = multi_plan_launch(multi, args.n, plan.g_split_rows, plan.x_rows, stream)) !=
      cudaSuccess)
    return err;
  return bwd_dispatch<true>(args, plan, &multi, dev, stream);
}

}  // namespace cuda
}  // namespace lor2c
