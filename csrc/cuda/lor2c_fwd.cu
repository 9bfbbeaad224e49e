// LoR2C forward on CUDA: lor2c_fwd_kernel and its launchers, for the plain op
// (lor2c_fwd_launch) and multi-adapter batches (lor2c_multi_fwd_launch). Raw pointers, no torch.
//
//   lor2c_fwd_kernel  one block per BM rows (64 when that gives >= 2 blocks per SM, else 32).
//                     Phase 1 streams x in 64-column chunks (dropout applied while staging) into
//                     t = dropout(x) @ A.T (P1); phase 2 streams layer_out in 128-column tiles and
//                     writes out = layer_out + s * t @ B.T (P2).
// MULTI = true (multi-adapter batches): block b is unit b of the plan (BM rows of one adapter,
// lor2c_multi_plan.cuh); the plan kernel runs first and the rows without an adapter are written
// by lor2c_multi_none_kernel afterwards (lor2c_multi_plan.cu).
// With LOR2C_CUDA_MMA=1 and fp16 / bf16 activations the launchers run lor2c_fwd_mma_kernel
// (lor2c_mma.cuh, tensor cores) instead: same grid, same rows per block, same outputs.
#include <cuda_runtime.h>

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

// ---- the kernel --------------------------------------------------------------------------------
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
  if (!fwd_block_rows<BM, MULTI>(p.multi, n, r, d_in, d_out, ridx, A, B, rows))
    return;                               // uniform over the block
  const int64_t nrc = (r + RT - 1) / RT;  // rank chunks (1 unless r > 64)
  const int64_t nk = (d_in + kChunk - 1) / kChunk;
  const DropoutParams dp = load_dropout(p.dropout);

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
        Ws[kk * Q1::kLdw + k] = rank < r && col < d_in ? to_float(A[rank * d_in + col]) : 0.f;
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
      if (i >= 0 && j < d_out) lo[m] = load_vec<4>(p.lo + i * p.ldl + j, j, d_out, p.vec_lo);
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
        Bs[k * Q2::kLdw + jj] = rank < r && col < d_out ? to_float(B[col * r + rank]) : 0.f;
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
        for (int c = 0; c < 4; ++c) v[c] = to_float(lo[m].v[c]) + p.scale * q2.acc[m][c];
        store_vec<4>(p.out + i * p.ldo + j, j, d_out, p.vec_out, v);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------
// Forward rows per block: 64 once there are enough blocks to fill the GPU twice, else 32.
// The tensor-core kernel (mma) takes 64 rows once there is one block per SM: every block reads
// all of A and B (from L2), so taller blocks halve that traffic, and its products are cheap.
int fwd_rows(int64_t n, const DeviceInfo& dev, bool mma) {
  const int64_t want = (mma ? 1 : 2) * static_cast<int64_t>(dev.num_sms);
  return ceil_div(n, 64) >= want ? 64 : 32;
}

// Whether this call runs the tensor-core kernel (LOR2C_CUDA_MMA=1, 16-bit activations).
bool use_mma(DType act) { return act != DType::kFloat32 && lor2c_mma_enabled(); }

// MMA: the tensor-core kernel (lor2c_mma.cuh, LOR2C_CUDA_MMA=1; RT is then 16, 32 or 64).
template <typename T, typename W, int RT, int BM, bool MULTI, bool MMA>
cudaError_t fwd_launch_t(const FwdArgs& a, const MultiArgs* m, cudaStream_t stream) {
  const FwdParams<T, W> p = fwd_params<T, W>(a, multi_table(m, 0, BM), MMA ? kMmaLanes : kLanes);
  // MULTI: at most ceil(n / BM) + G units (each adapter adds at most one partial block)
  const int64_t blocks = ceil_div(a.n, BM) + (MULTI ? m->G : 0);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if constexpr (MMA)
    return launch_kernel(lor2c_fwd_mma_kernel<T, W, RT, BM, MULTI>, grid,
                         MmaFwdSmem<RT, BM>::kBytes, stream, p);
  else
    return launch_kernel(lor2c_fwd_kernel<T, W, RT, BM, MULTI>, grid, FwdSmem<RT, BM>::kBytes,
                         stream, p);
}

template <typename T, typename W, int RT, bool MULTI, bool MMA>
cudaError_t fwd_tall(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev, cudaStream_t s) {
  // the multi plan's units use the same rows (lor2c_multi_fwd_launch)
  return fwd_rows(a.n, dev, MMA) == 64 ? fwd_launch_t<T, W, RT, 64, MULTI, MMA>(a, m, s)
                                       : fwd_launch_t<T, W, RT, 32, MULTI, MMA>(a, m, s);
}

template <typename T, typename W, bool MULTI, bool MMA>
cudaError_t fwd_rank(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev, cudaStream_t s) {
  const int rt = MMA ? mma_rank_tile(a.r) : rank_tile(a.r);
  if constexpr (!MMA) {
    if (rt == 8) return fwd_tall<T, W, 8, MULTI, MMA>(a, m, dev, s);
  }
  switch (rt) {
    case 16:
      return fwd_tall<T, W, 16, MULTI, MMA>(a, m, dev, s);
    case 32:
      return fwd_tall<T, W, 32, MULTI, MMA>(a, m, dev, s);
    default:
      return fwd_tall<T, W, 64, MULTI, MMA>(a, m, dev, s);
  }
}

template <typename T, bool MULTI>
cudaError_t fwd_weights(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev,
                        cudaStream_t s) {
  if constexpr (!std::is_same<T, float>::value) {
    if (use_mma(a.act))
      return a.weights_fp32 ? fwd_rank<T, float, MULTI, true>(a, m, dev, s)
                            : fwd_rank<T, T, MULTI, true>(a, m, dev, s);
  }
  return a.weights_fp32 ? fwd_rank<T, float, MULTI, false>(a, m, dev, s)
                        : fwd_rank<T, T, MULTI, false>(a, m, dev, s);
}

template <bool MULTI>
cudaError_t fwd_dispatch(const FwdArgs& a, const MultiArgs* m, const DeviceInfo& dev,
                         cudaStream_t s) {
  return dispatch_dtype(a.act, [&](auto tag) -> cudaError_t {
    return fwd_weights<decltype(tag), MULTI>(a, m, dev, s);
  });
}

}  // namespace

cudaError_t lor2c_fwd_launch(const FwdArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (ceil_div(args.n, 32) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return fwd_dispatch<false>(args, nullptr, dev, stream);
}

cudaError_t lor2c_multi_fwd_launch(const FwdArgs& args, const MultiArgs& multi,
                                   const DeviceInfo& dev, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (multi.G <= 0) return cudaErrorInvalidValue;
  cudaError_t err =
      multi_plan_launch(multi, args.n, fwd_rows(args.n, dev, use_mma(args.act)), 0, stream);
  if (err != cudaSuccess) return err;
  if ((err = fwd_dispatch<true>(args, &multi, dev, stream)) != cudaSuccess) return err;
  NoneArgs none{};  // rows without an adapter: out = layer_out, t = 0
  none.layer_out = args.layer_out;
  none.ldl = args.ldl;
  none.out = args.out;
  none.d_out = args.d_out;
  none.t = args.t;
  none.r = args.r;
  return multi_none_launch(multi, args.act, args.n, none, dev, stream);
}

}  // namespace cuda
}  // namespace lor2c
