// Output allocation for the CPU kernels.
//
// A fresh multi-megabyte tensor is mmap'd by the C library, and first-touching it costs one page
// fault per 4 KiB page: for an n x d output that is several times the cost of writing it (seen:
// 6.8 ms to allocate and fill 32 MiB vs 0.6 ms to refill it). Where transparent huge pages are
// available on request (the common "madvise" setting), asking for them before the first touch
// makes that 2 MiB per fault. It is a hint only: nothing changes where the kernel declines.
//
// At tiny sizes the allocations themselves are the cost (a dispatched at::empty is some 2,000
// instructions, a kernel call's own work a few thousand): outputs are allocated with
// at::detail::empty_cpu (no dispatch), and per-call scratch (packed weights, partial sums) comes
// from buffers each thread keeps from call to call (reusable_floats).
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lor2c {
namespace cpu {

// An uninitialised CPU tensor (no dispatch: the kernels run below autograd already).
inline at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// Scratch slots of reusable_floats: one per buffer that a kernel call holds at the same time.
enum ScratchSlot { kPackedA = 0, kPackedB = 1, kPartials = 2, kSlots = 3 };

// `count` floats owned by the calling thread, reused by its next kernel call (their contents are
// whatever that call left); nullptr above 256 KiB, where the caller allocates: a fresh
// allocation costs nothing next to the work at such sizes, and no thread keeps megabytes.
inline float* reusable_floats(ScratchSlot slot, int64_t count) {
  constexpr int64_t kMaxFloats = int64_t{1} << 16;
  if (count > kMaxFloats) return nullptr;
  thread_local std::vector<float> buffers[kSlots];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = empty_cpu(sizes, options.dtype().toScalarType());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace lor2c
