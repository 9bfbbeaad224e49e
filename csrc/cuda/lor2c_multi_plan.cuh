// The multi-adapter row plan of the LoR2C kernels (lor2c_multi_fwd / lor2c_multi_bwd): how a
// block of lor2c_fwd_kernel / lor2c_bwd_g_kernel / lor2c_bwd_x_kernel<MULTI = true> finds its
// rows (MultiTable, find_unit), and the launchers of lor2c_multi_plan.cu that the forward and
// backward launchers call: the plan kernel, which builds the tables from the sorted ids, and the
// kernel for the rows without an adapter. nvcc only, no torch.
//
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "lor2c_kernels.h"

namespace lor2c {
namespace cuda {

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

// Tables k = 0, 1 of the plan buffer of a multi-adapter call as seen by the kernels, for units
// of `rows` rows; an empty table for the plain op (m == nullptr).
inline MultiTable multi_table(const MultiArgs* m, int k, int64_t rows) {
  if (m == nullptr) return MultiTable{};
  const int64_t S = m->G + 2;
  return {m->order, m->plan, m->plan + (k + 1) * (S + 1), S, rows};
}

// Enqueues lor2c_multi_plan_kernel: from m.sorted_ids, the slot positions seg and, for each of the
// unit sizes rows0 and rows1 that is > 0, its table (0 and 1 above), into m.plan.
cudaError_t multi_plan_launch(const MultiArgs& m, int64_t n, int64_t rows0, int64_t rows1,
                              cudaStream_t stream);

// The rows without an adapter (slots 0 and G + 1, from m.plan): what lor2c_multi_none_kernel
// writes. Forward: out = layer_out (a bit copy) and t = 0; backward: dx = 0. A null pointer
// skips its part.
struct NoneArgs {
  const void* layer_out;  // (n, d_out), row stride ldl, dtype act
  int64_t ldl;
  void* out;  // (n, d_out) contiguous, dtype act
  int64_t d_out;
  float* t;  // (n, r) contiguous fp32
  int64_t r;
  void* dx;  // (n, d_in) contiguous, dtype act
  int64_t d_in;
};

cudaError_t multi_none_launch(const MultiArgs& m, DType act, int64_t n, const NoneArgs& a,
                              const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace lor2c
