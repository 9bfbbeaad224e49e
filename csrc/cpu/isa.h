// The instruction-set path of the CPU kernels, picked once per process.
//
// Every vectorised CPU kernel is compiled three times: for x86-64-v4 (AVX-512 F/BW/DQ/VL/CD),
// x86-64-v3 (AVX2, FMA, F16C) and the build's baseline (x86-64, SSE2). The path in use is the
// widest this CPU runs, unless the environment variable LOR2C_CPU_ISA=avx512|avx2|baseline,
// read when the library is loaded, forces one (so that the AVX2 and baseline code can be tested
// and benchmarked on an AVX-512 machine). Asking for a path the CPU cannot run is an error at
// the first kernel call, never a silent fallback. Python: torch.ops.lor2c_ops_ext.cpu_isa()
// names the path in use, cpu_isa_runnable() the paths this CPU runs. Off x86 (aarch64) the
// three copies are the same portable vector code and the path is always baseline; x86-only code
// (intrinsics, inline assembly) stays behind LOR2C_X86 (scripts/check_aarch64_compile.sh).
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define LOR2C_X86 1
#define LOR2C_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define LOR2C_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define LOR2C_TARGET_AVX512
#define LOR2C_TARGET_AVX2
#endif

namespace lor2c {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The path in use; throws (c10::Error) if LOR2C_CPU_ISA is invalid or names a path this CPU
// cannot run.
Isa isa();

// The widest path this CPU runs (ignores LOR2C_CPU_ISA).
Isa widest_isa();

const char* isa_name(Isa isa);

// Tile shapes and vector width of each path, for the kernels templated on it. W floats per
// vector; the register file has `regs` vector registers.
struct Avx512 {
  static constexpr Isa kIsa = Isa::kAvx512;
  static constexpr int W = 16;
  static constexpr int regs = 32;
};
struct Avx2 {
  static constexpr Isa kIsa = Isa::kAvx2;
  static constexpr int W = 8;
  static constexpr int regs = 16;
};
struct Baseline {
  static constexpr Isa kIsa = Isa::kBaseline;
  static constexpr int W = 4;
  static constexpr int regs = 16;
};

// Makes the non-temporal stores this thread issued (x86: weakly ordered) visible before the
// stores that follow: a kernel that streamed its output calls it once before handing the output
// over. Off x86 the kernels' streaming stores are plain stores and there is nothing to order.
inline void stream_fence() {
#ifdef LOR2C_X86
  asm volatile("sfence" ::: "memory");
#endif
}

}  // namespace cpu
}  // namespace lor2c

// Defines `void name params` that runs name##_body<Arch> args compiled for the path in use:
// one copy per path, each with its target attribute (the body must be an always_inline
// template so that it is compiled inside each copy, for that copy's instruction set).
#define LOR2C_MULTIVERSION(name, params, args)                              \
  LOR2C_TARGET_AVX512 __attribute__((noinline)) void name##_avx512 params { \
    name##_body<::lor2c::cpu::Avx512> args;                                 \
  }                                                                         \
  LOR2C_TARGET_AVX2 __attribute__((noinline)) void name##_avx2 params {     \
    name##_body<::lor2c::cpu::Avx2> args;                                   \
  }                                                                         \
  __attribute__((noinline)) void name##_baseline params {                   \
    name##_body<::lor2c::cpu::Baseline> args;                               \
  }                                                                         \
  void name params {                                                        \
    switch (::lor2c::cpu::isa()) {                                          \
      case ::lor2c::cpu::Isa::kAvx512:                                      \
        return name##_avx512 args;                                          \
      case ::lor2c::cpu::Isa::kAvx2:                                        \
        return name##_avx2 args;                                            \
      default:                                                              \
        return name##_baseline args;                                        \
    }                                                                       \
  }
