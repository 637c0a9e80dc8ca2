// Probe behind docs/DECISIONS.md ("GEMM: oneDNN's sgemm, not OpenBLAS"): one thread each,
// OpenBLAS cblas_sgemm against oneDNN dnnl_sgemm on the training step's shapes, in one run, so
// the effect of OPENBLAS_CORETYPE can be seen. Needs libopenblas-dev (not a strata dependency).
//   g++ -O2 -I/usr/include/x86_64-linux-gnu/openblas-pthread -o /tmp/gemm_compare \
//       bench/probes/gemm_compare.cc -lopenblas -ldnnl
//   OMP_NUM_THREADS=1 /tmp/gemm_compare                       # as the environment sets OPENBLAS_*
//   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 /tmp/gemm_compare
#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

static double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int main() {
  openblas_set_num_threads(1);
  const int shapes[][3] = {{2048, 1376, 512}, {2048, 512, 1376}, {512, 1376, 2048},
                           {2048, 1024, 1024}, {2048, 2752, 1024}};
  for (const auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2];
    std::vector<float> A(size_t(M) * K, 0.5f), B(size_t(K) * N, 0.25f), C(size_t(M) * N);
    for (int tb = 0; tb < 2; ++tb) {
      double blas = 1e9, dnnl = 1e9;
      for (int r = 0; r < 5; ++r) {
        double t0 = Now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1,
                    A.data(), K, B.data(), tb ? K : N, 0, C.data(), N);
        blas = std::min(blas, Now() - t0);
        t0 = Now();
        dnnl_sgemm('N', tb ? 'T' : 'N', M, N, K, 1, A.data(), K, B.data(), tb ? K : N, 0,
                   C.data(), N);
        dnnl = std::min(dnnl, Now() - t0);
      }
      const double gflop = 2.0 * M * N * K / 1e9;
      std::printf("M%d N%d K%d %s: openblas %.1f GFLOP/s  onednn %.1f GFLOP/s\n", M, N, K,
                  tb ? "NT" : "NN", gflop / blas, gflop / dnnl);
    }
  }
  return 0;
}
