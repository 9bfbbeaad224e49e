// Single-precision matrix products through the BLAS that torch itself links (MKL in the x86
// wheels), for the LoR2C CPU kernels' blocked plan (csrc/cpu/lor2c.cpp): the rank-r products of
// a block of rows run as BLAS calls, which use the CPU's widest vectors whichever instruction-set
// path (csrc/cpu/isa.h) the library's own loops take. The BLAS is looked up once, at the first
// call, in the process (torch's libtorch_cpu exports the Fortran `sgemm_`); where none is found
// the blocked plan is not used and blas_missing() says why.
#pragma once
#include <cstdint>

namespace lor2c {
namespace cpu {

// nullptr where an sgemm was found, else why not (for the plan rule and lor2c_ops.info).
const char* blas_missing();

// C = alpha * op(A) op(B) + beta * C, all row-major: C is m x n with row stride ldc, op(A) m x k,
// op(B) k x n; ta / tb: A / B are stored transposed (A as k x m with row stride lda, and so on).
// beta == 0 never reads C. Single-threaded inside a parallel region (the BLAS's own rule for
// nested calls). Requires blas_missing() == nullptr.
void gemm_rows(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace cpu
}  // namespace lor2c
