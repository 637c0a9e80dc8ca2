#include "kernels/cpu/sgemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include "base/check.h"

namespace strata::kernels::cpu {

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    // A product over nothing only scales C; keep the semantics explicit.
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    }
    return;
  }
  // oneDNN's OpenMP runtime sizes its team from the calling thread's ICV: one thread here, so
  // each pool thread runs its slice alone (set once per thread; libgomp keeps ICVs per thread).
  thread_local const bool one_omp_thread = [] {
    omp_set_num_threads(1);
    return true;
  }();
  (void)one_omp_thread;
  const dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a,
                                      lda, b, ldb, beta, c, ldc);
  // Only bad arguments make dnnl_sgemm fail: a programming error in the callers.
  STRATA_CHECK_MSG(st == dnnl_success, "dnnl_sgemm({}, {}, {}, {}, {}) failed with status {}",
                   trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, static_cast<int>(st));
}

}  // namespace strata::kernels::cpu
