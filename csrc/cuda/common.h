// What every CUDA launcher of the extension (LoR2C: lor2c_kernels.h, DCFT: dcft_kernels.h) and
// its ATen binding share: the activation dtype, the dropout arguments and the device limits.
// Plain C++ and the CUDA runtime API only (no torch, no device code), so the launchers' headers
// compile with nvcc alone and the bindings include them with the host compiler.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lor2c {
namespace cuda {

// The activations' dtype (x, layer_out, grad, out, dx). Weights are either this dtype or fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The dropout of one call. The seed tensor stays on the device: the kernels read (seed, offset)
// themselves (load_dropout in common.cuh), so no launch synchronises with the host. threshold
// and inv_keep come from csrc/philox.h's dropout_threshold (binding_common.h: dropout_args).
struct DropoutArgs {
  const int64_t* seed;  // device pointer to int64[2] = (seed, offset); read only when enabled
  uint32_t threshold;   // floor(p * 2^16): kept iff its 16-bit draw >= threshold (philox.h)
  float inv_keep;       // 1 / (1 - p)
  bool enabled;         // p > 0
};

// What launch configurations depend on; the bindings fill it from cudaDeviceProp
// (multiProcessorCount, sharedMemPerBlockOptin).
struct DeviceInfo {
  int num_sms;
  int64_t max_smem_per_block;  // bytes of dynamic shared memory one block may opt in to
};

}  // namespace cuda
}  // namespace lor2c
