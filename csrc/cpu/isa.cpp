// The CPU kernels' instruction-set path (csrc/cpu/isa.h) and the ops that report it.
#include "isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

namespace lor2c {
namespace cpu {
namespace {

struct Choice {
  Isa isa;
  std::string error;  // non-empty: LOR2C_CPU_ISA was invalid or asked for too much
};

Isa detect() {
#ifdef LOR2C_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Choice choose() {
  const Isa widest = detect();
  const char* env = std::getenv("LOR2C_CPU_ISA");
  std::string want = env ? env : "";
  for (char& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (want.empty() || want == "auto") return {widest, ""};
  Isa asked;
  if (want == "avx512") {
    asked = Isa::kAvx512;
  } else if (want == "avx2") {
    asked = Isa::kAvx2;
  } else if (want == "baseline") {
    asked = Isa::kBaseline;
  } else {
    return {widest, "LOR2C_CPU_ISA=" + std::string(env) +
                        ": expected avx512, avx2, baseline or auto (unset: the widest the CPU "
                        "runs, here " +
                        isa_name(widest) + ")"};
  }
  if (static_cast<int>(asked) > static_cast<int>(widest))
    return {widest, "LOR2C_CPU_ISA=" + std::string(env) + ": this CPU cannot run the " +
                        isa_name(asked) + " path (the widest it runs is " + isa_name(widest) + ")"};
  return {asked, ""};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

// Read when the library is loaded: setting LOR2C_CPU_ISA later in the process changes nothing.
[[maybe_unused]] const bool read_at_load = (choice(), true);

std::string cpu_isa_op() { return isa_name(isa()); }

std::vector<std::string> cpu_isa_runnable_op() {
  std::vector<std::string> names;
  for (int i = static_cast<int>(widest_isa()); i >= 0; --i)
    names.emplace_back(isa_name(static_cast<Isa>(i)));
  return names;
}

}  // namespace

Isa isa() {
  const Choice& c = choice();
  TORCH_CHECK(c.error.empty(), c.error);
  return c.isa;
}

Isa widest_isa() {
  static const Isa widest = detect();
  return widest;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace cpu
}  // namespace lor2c

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // The CPU kernels' instruction-set path in use ("avx512", "avx2" or "baseline"), and the
  // paths this CPU runs, widest first (csrc/cpu/isa.h).
  m.def("cpu_isa() -> str", &lor2c::cpu::cpu_isa_op);
  m.def("cpu_isa_runnable() -> str[]", &lor2c::cpu::cpu_isa_runnable_op);
}
