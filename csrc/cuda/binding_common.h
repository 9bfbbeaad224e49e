// ATen helpers shared by the CUDA bindings of the LoR2C and DCFT ops (lor2c_binding.cpp,
// dcft_binding.cpp): the one definition each of the dtype mapping, the dropout arguments, the
// device limits, the device checks and the launch-error check. The argument checks shared with
// the CPU entry points are in ../lor2c_common.h and ../dcft_common.h. Compiled only into CUDA
// builds (with the host compiler; scripts/check_cuda_bindings.sh type-checks it without one).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "../lor2c_common.h"
#include "common.h"

namespace lor2c {
namespace cuda {

// The kernels' dtype of the activations x (and everything of x's dtype).
inline DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::kFloat32;  // not reached
}

// The dropout arguments of a call with probability p. `seed` is the op's int64[2] (seed, offset)
// tensor, contiguous and on the device; it stays there (the kernels read it) and must be alive
// until the launch is enqueued. threshold and 1/(1-p) as everywhere: dropout_params
// (../lor2c_common.h) with csrc/philox.h's dropout_threshold.
inline DropoutArgs dropout_args(const at::Tensor& seed, double p) {
  const DropoutParams dp = dropout_params(p, 0, 0);  // threshold and 1/(1-p) only
  return {seed.data_ptr<int64_t>(), dp.threshold, dp.inv_keep, dp.enabled};
}

// What the launch configurations depend on, for the current device.
inline DeviceInfo device_info() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return {prop->multiProcessorCount, static_cast<int64_t>(prop->sharedMemPerBlockOptin)};
}

// x, the tensor whose device every other tensor of a call must be on, is a CUDA tensor.
inline void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, ": expected a tensor on ", device,
              " (the device of x), got ", t.device());
}

// Throws torch's CUDA error (torch.AcceleratorError, a RuntimeError) when a launcher did not
// return cudaSuccess: what C10_CUDA_CHECK does, with `what` (the launcher) named in place of the
// calling function.
inline void check_launch(cudaError_t err, const char* what) {
  c10::cuda::c10_cuda_check_implementation(static_cast<int32_t>(err), __FILE__, what,
                                           static_cast<uint32_t>(__LINE__), true);
}

}  // namespace cuda
}  // namespace lor2c
