// The multi-adapter row plan of the LoR2C kernels, on the device (lor2c_multi_plan.cuh has the
// tables the kernels read): lor2c_multi_plan_kernel turns the stably sorted adapter ids into the
// per-adapter slots and unit tables, and lor2c_multi_none_kernel writes the rows without an
// adapter. One plan launch precedes each multi-adapter forward and backward (lor2c_fwd.cu,
// lor2c_bwd.cu); nothing is read back to the host. nvcc only, no torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "lor2c_kernels.h"
#include "lor2c_multi_plan.cuh"
#include "lor2c_products.cuh"

namespace lor2c {
namespace cuda {
namespace {

// ---- the plan ----------------------------------------------------------------------------------
// One block. plan[0 .. S] = seg (S = G + 2 slots, see MultiTable) from the stably sorted ids:
// seg[s] = first position whose id is >= s - 1 (seg[0] = 0, seg[S] = n). Then, for each of the
// (up to two) unit sizes rows_k > 0, plan[(k + 1) * (S + 1) ..] = bp: units of rows_k rows per
// adapter slot (1 .. G), as exclusive prefix sums.
constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads)
    lor2c_multi_plan_kernel(const int64_t* sorted, int64_t n, int64_t G, int64_t rows0,
                            int64_t rows1, int64_t* plan) {
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

// ---- rows without an adapter ------------------------------------------------------------------
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
  const T zero = from_float<T>(0.f);
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

}  // namespace

int64_t lor2c_multi_plan_elems(int64_t G) { return 3 * (G + 3); }

cudaError_t multi_plan_launch(const MultiArgs& m, int64_t n, int64_t rows0, int64_t rows1,
                              cudaStream_t stream) {
  lor2c_multi_plan_kernel<<<dim3(1), dim3(kPlanThreads), 0, stream>>>(m.sorted_ids, n, m.G, rows0,
                                                                      rows1, m.plan);
  return cudaGetLastError();
}

cudaError_t multi_none_launch(const MultiArgs& m, DType act, int64_t n, const NoneArgs& a,
                              const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t cap = 8 * static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1);
  const int64_t blocks = n < cap ? n : cap;
  if (blocks <= 0) return cudaSuccess;
  return dispatch_dtype(act, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    NoneParams<T> p;
    p.order = m.order;
    p.seg = m.plan;
    p.slots = m.G + 2;
    p.lo = static_cast<const T*>(a.layer_out);
    p.ldl = a.ldl;
    p.out = static_cast<T*>(a.out);
    p.d_out = a.d_out;
    p.t = a.t;
    p.r = a.r;
    p.dx = static_cast<T*>(a.dx);
    p.d_in = a.d_in;
    lor2c_multi_none_kernel<T>
        <<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lor2c
