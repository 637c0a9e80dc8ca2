// Row-major single-precision GEMM for the CPU kernels: C[m, n] = alpha * op(A) op(B) + beta * C,
// computed on the calling thread alone (callers split the work over their pool). Backed by
// oneDNN's sgemm, which picks its kernels from the CPU it runs on (AVX-512 where present);
// OpenBLAS instead follows OPENBLAS_CORETYPE, which environments often pin to Haswell.
#pragma once

#include <cstdint>

namespace strata::kernels::cpu {

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc);

}  // namespace strata::kernels::cpu
