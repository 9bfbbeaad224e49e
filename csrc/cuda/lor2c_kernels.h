// Host launchers of the LoR2C residual CUDA kernels: lor2c_fwd.cu (forward), lor2c_bwd.cu
// (backward) and lor2c_multi_plan.cu (the multi-adapter row plan). Plain C++: raw pointers and
// sizes only, no torch types, so the kernels compile and can be checked with nvcc alone;
// csrc/cuda/lor2c_binding.cpp is the ATen glue that allocates and calls these. DType,
// DropoutArgs and DeviceInfo are shared with the DCFT kernels (common.h).
//
// Conventions: x, layer_out and grad are (n, d) with a row stride `ld*` (elements) and unit
// column stride; A (r, d_in) and B (d_out, r) are contiguous; t and u are contiguous fp32
// (n, r); every output is contiguous. All launchers only enqueue work on `stream` (no host
// synchronisation: the dropout seed is read on the device) and return the launch status.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "common.h"

namespace lor2c {
namespace cuda {

// LOR2C_CUDA_MMA=1 makes the launchers use the tensor-core kernels (lor2c_mma.cuh) for fp16 and
// bf16 activations; anything else (the default) keeps the CUDA-core kernels. Read once per
// process. The tensor-core kernels stay off by default until a GPU has verified them
// (csrc/cuda/README.md); fp32 activations always use the CUDA-core kernels.
inline bool lor2c_mma_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LOR2C_CUDA_MMA");
    return v != nullptr && v[0] == '1' && v[1] == '\0';
  }();
  return on;
}

struct FwdArgs {
  DType act;          // dtype of x, layer_out and out
  bool weights_fp32;  // A and B are fp32 (else they have dtype `act`)
  const void* x;
  int64_t ldx;
  const void* layer_out;
  int64_t ldl;
  const void* A;  // (r, d_in) contiguous
  const void* B;  // (d_out, r) contiguous
  void* out;      // (n, d_out) contiguous, dtype act
  float* t;       // (n, r) contiguous fp32: dropout(x) @ A.T
  int64_t n, d_in, d_out, r;
  float scale;
  DropoutArgs dropout;
};

// out = layer_out + scale * dropout(x) @ A.T @ B.T and t = dropout(x) @ A.T, in one kernel.
cudaError_t lor2c_fwd_launch(const FwdArgs& args, const DeviceInfo& dev, cudaStream_t stream);

// Launch configuration and fp32 workspace layout of the backward pass. The workspace is one
// buffer of u_elems + dB_ws_elems + dA_ws_elems floats: u (n, r), then the per-split partial
// sums of dB (g_splits, r, d_out), then those of dA (x_splits, r, d_in).
// For the multi-adapter op (lor2c_multi_bwd_plan), g_splits and x_splits are upper bounds on
// the numbers of units (rows of one adapter) of kernels 1 and 2, one workspace slice each.
struct BwdPlan {
  int64_t g_rows, g_splits;  // kernel 1 (reads grad): rows per block, blocks per launch
  int64_t x_rows, x_splits;  // kernel 2 (reads x): rows per block, blocks along the rows
  int64_t u_elems, dB_ws_elems, dA_ws_elems;
  size_t g_smem, x_smem;  // dynamic shared memory of kernels 1 and 2, bytes
  int64_t g_split_rows;   // multi only: rows per kernel-1 unit, a multiple of g_rows
};

BwdPlan lor2c_bwd_plan(int64_t n, int64_t d_in, int64_t d_out, int64_t r, bool need_dx,
                       bool need_dA, bool need_dB, const DeviceInfo& dev);

struct BwdArgs {
  DType act;
  bool weights_fp32;
  const void* grad;  // (n, d_out), row stride ldg
  int64_t ldg;
  const void* x;  // (n, d_in), row stride ldx
  int64_t ldx;
  const float* t;    // (n, r) contiguous fp32, as returned by the forward
  const void* A;     // (r, d_in) contiguous
  const void* B;     // (d_out, r) contiguous
  void* dx;          // (n, d_in) contiguous, dtype act; may be null when !need_dx
  void* dA;          // (r, d_in) contiguous, dtype of A; may be null when !need_dA
  void* dB;          // (d_out, r) contiguous, dtype of B; may be null when !need_dB
  float* workspace;  // plan.u_elems + plan.dB_ws_elems + plan.dA_ws_elems floats
  int64_t n, d_in, d_out, r;
  float scale;
  bool need_dx, need_dA, need_dB;
  DropoutArgs dropout;
};

// dx = scale * (grad @ B) @ A * mask, dA = scale * (grad @ B).T @ (x * mask),
// dB = scale * grad.T @ t; results are deterministic (fixed reduction order).
cudaError_t lor2c_bwd_launch(const BwdArgs& args, const BwdPlan& plan, const DeviceInfo& dev,
                             cudaStream_t stream);

// ---- multi-adapter batches (lor2c_multi_fwd / lor2c_multi_bwd) -------------------------------
// Row i uses A_bank[ids[i]] and B_bank[ids[i]]; rows with id -1 get out = layer_out, t = 0,
// dx = 0 and no gradient (an id outside [-1, G) is treated like -1: never read out of bounds).
// The caller sorts the ids on the device (stably) and passes the sorted ids and the permutation;
// everything else - the per-adapter row ranges and the block tables - is computed by the
// launchers' first kernel from the sorted ids, so nothing is read back to the host. Rows are read
// and written in place through the permutation; the dropout mask keeps using each row's index.
// The FwdArgs / BwdArgs are those of the plain op with A, B (and dA, dB) the whole banks:
// A (G, r, d_in), B (G, d_out, r) contiguous; dA, dB bank-shaped (zeros for unused adapters).
struct MultiArgs {
  const int64_t* sorted_ids;  // (n,) the ids in ascending order (stable sort)
  const int64_t* order;       // (n,) order[k] = the row whose id is sorted_ids[k]
  int64_t G;                  // adapters in the banks (>= 1)
  int64_t* plan;              // device workspace of lor2c_multi_plan_elems(G) int64
};

int64_t lor2c_multi_plan_elems(int64_t G);

cudaError_t lor2c_multi_fwd_launch(const FwdArgs& args, const MultiArgs& multi,
                                   const DeviceInfo& dev, cudaStream_t stream);

// Workspace as for the plain op (u (n, r), then dB and dA partials), except that there are up to
// g_splits = (<= 2 * SMs) + G dB slices (r, d_out) and x_splits = (~2 * SMs / column tiles) + G
// dA slices (r, d_in): at most one partly filled unit per adapter more than the plain op.
BwdPlan lor2c_multi_bwd_plan(int64_t n, int64_t d_in, int64_t d_out, int64_t r, int64_t G,
                             bool need_dx, bool need_dA, bool need_dB, const DeviceInfo& dev);

cudaError_t lor2c_multi_bwd_launch(const BwdArgs& args, const MultiArgs& multi, const BwdPlan& plan,
                                   const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace lor2c
