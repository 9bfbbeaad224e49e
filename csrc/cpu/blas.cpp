// The BLAS lookup and the row-major sgemm wrapper of csrc/cpu/blas.h.
#include "blas.h"

#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <climits>

namespace lor2c {
namespace cpu {
namespace {

// The Fortran BLAS interface, 32-bit integers (LP64, as torch calls it).
using Sgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc);

struct Blas {
  Sgemm sgemm = nullptr;
  const char* missing = nullptr;
};

const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    // torch's libtorch_cpu is loaded (this library links it) but not necessarily into the
    // global scope: ask it by name first, then the global scope.
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (torch_cpu != nullptr) b.sgemm = reinterpret_cast<Sgemm>(dlsym(torch_cpu, "sgemm_"));
    if (b.sgemm == nullptr) b.sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));
    if (b.sgemm == nullptr)
      b.missing = "no BLAS sgemm_ in this process (torch was built without an exported BLAS)";
    return b;
  }();
  return found;
}

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "gemm_rows: ", what, " = ", v, " does not fit the BLAS");
  return static_cast<int>(v);
}

}  // namespace

const char* blas_missing() { return blas().missing; }

void gemm_rows(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: a row-major matrix with row
  // stride ld is the column-major storage of its transpose with leading dimension ld. So the
  // column-major call takes B first, then A, with the same transpose flags.
  const int M = as_int(n, "n"), N = as_int(m, "m"), K = as_int(k, "k");
  // The BLAS asks leading dimensions >= 1 and >= the stored rows' length even where unused.
  const int LDA = as_int(std::max<int64_t>(ldb, 1), "ldb"),
            LDB = as_int(std::max<int64_t>(lda, 1), "lda");
  const int LDC = as_int(std::max<int64_t>(ldc, 1), "ldc");
  const char opa = tb ? 'T' : 'N', opb = ta ? 'T' : 'N';
  if (K == 0) {  // the BLAS leaves C * beta; keep that contract without calling it
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  blas().sgemm(&opa, &opb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace cpu
}  // namespace lor2c
