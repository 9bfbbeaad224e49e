// What every CUDA kernel of the extension (LoR2C and DCFT) shares: element conversion, the
// dropout parameters read on the device, the dtype dispatch of the launchers and a few launch
// helpers. nvcc only (device code); no torch. The types are in common.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../philox.h"
#include "common.h"

namespace lor2c {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp (shuffles)
constexpr int64_t kMaxGridY = 65535;         // grid.y (and grid.z) limit

// ---- element conversion: explicit intrinsics only (torch builds with __CUDA_NO_HALF_*) ----------
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
__device__ __forceinline__ float to_float(T v) {
  return Cvt<T>::to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Cvt<T>::from_float(v);
}

// ---- dropout -----------------------------------------------------------------------------------
// The call's dropout parameters (csrc/philox.h's DropoutParams), with (seed, offset) read from
// device memory: no host synchronisation anywhere. Kernels call it once per thread and draw the
// mask with dropout_keep8 / dropout_pair_keep8 (philox.h).
__device__ __forceinline__ DropoutParams load_dropout(const DropoutArgs& a) {
  DropoutParams d{};
  d.enabled = a.enabled;
  d.threshold = a.threshold;
  d.inv_keep = a.inv_keep;
  if (a.enabled) dropout_seed(d, a.seed[0], a.seed[1]);
  return d;
}

// ---- host side ---------------------------------------------------------------------------------
// Calls body(T{}) with T the C++ type of `act` (float, __half, __nv_bfloat16) and returns its
// status; cudaErrorInvalidValue for an unknown dtype.
template <typename F>
cudaError_t dispatch_dtype(DType act, F&& body) {
  switch (act) {
    case DType::kFloat32:
      return body(float{});
    case DType::kFloat16:
      return body(__half{});
    case DType::kBFloat16:
      return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline size_t dtype_size(DType act) { return act == DType::kFloat32 ? 4 : 2; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// A vector access of `lanes` elements at column multiples of `lanes` is aligned for every row.
inline bool vec_ok(const void* p, int64_t ld, size_t elem, int lanes = 4) {
  return reinterpret_cast<uintptr_t>(p) % (lanes * elem) == 0 && ld % lanes == 0;
}

// Opts `kernel` in to `bytes` of dynamic shared memory when that is over the default 48 KB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace lor2c
