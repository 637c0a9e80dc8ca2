// Row-major GEMMs for the CPU kernels: C[m, n] = alpha * op(A) op(B) + beta * C, computed on the
// calling thread alone (callers split the work over their pool).
// - Sgemm: f32. Backed by oneDNN's sgemm, which picks its kernels from the CPU it runs on
//   (AVX-512 where present); OpenBLAS instead follows OPENBLAS_CORETYPE, which environments often
//   pin to Haswell.
// - GemmBF16: A and B bf16 (raw bits, round-to-nearest-even as base/dtype.h F32ToBF16 makes
//   them), products accumulated in f32, C f32. oneDNN 2.6's C API has no bf16 gemm function, so
//   this is its matmul primitive: one per (shape, strides, alpha, beta), created on first use and
//   kept for the process, shared by all threads (each passes its own scratchpad, so concurrent
//   calls are safe). Native on AVX512-BF16 / AMX; emulated (several times slower than Sgemm) on
//   plain AVX-512; unavailable below that — ask GemmBF16Support first.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace strata::kernels::cpu {

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc);

// Same contract as Sgemm. op(A) is [m, k], op(B) [k, n]; lda/ldb/ldc are row strides of the
// stored matrices. Deterministic: a given call gives the same bits every time (oneDNN's blocking
// depends only on the shape; one thread). Calling it where GemmBF16Support fails is a
// programming error (checked).
void GemmBF16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
              int64_t ldc);

// OK when oneDNN can run GemmBF16 on this CPU; `impl` (optional) receives oneDNN's implementation
// name for a probe shape ("brg:avx512_core_bf16" natively, "gemm:jit" when emulated) and
// `native` whether it runs natively (the CPU has AVX512-BF16 and oneDNN may use it, which
// DNNL_MAX_CPU_ISA can forbid). FailedPrecondition, saying why, when it cannot
// (a CPU without AVX-512, or DNNL_MAX_CPU_ISA set below it).
Status GemmBF16Support(std::string* impl = nullptr, bool* native = nullptr);

}  // namespace strata::kernels::cpu
