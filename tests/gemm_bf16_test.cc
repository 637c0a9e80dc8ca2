// The bf16 GEMM (kernels/cpu/sgemm.h GemmBF16) against a double-precision reference computed on
// the same bf16-rounded inputs, the f32 -> bf16 conversion against base/dtype.h bit for bit, and
// the bf16 training products against their f32 counterparts. On a CPU where oneDNN cannot run
// bf16 at all (no AVX-512) the GEMM tests skip, saying so; with AVX-512 but no AVX512-BF16
// oneDNN emulates and they run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "base/thread_pool.h"
#include "kernels/cpu/sgemm.h"
#include "kernels/train.h"

namespace strata::kernels {
namespace {

#define SKIP_WITHOUT_BF16()                                                         \
  do {                                                                              \
    if (Status st = cpu::GemmBF16Support(); !st.ok()) GTEST_SKIP() << st.ToString(); \
  } while (0)

// Random values, rounded to bf16: the bits and their exact f32 values.
struct Bf16Matrix {
  std::vector<uint16_t> bits;
  std::vector<float> values;
  Bf16Matrix(size_t n, std::mt19937& rng) : bits(n), values(n) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < n; ++i) {
      bits[i] = F32ToBF16(normal(rng));
      values[i] = BF16ToF32(bits[i]);
    }
  }
};

TEST(GemmBF16Test, SupportIsReported) {
  std::string impl;
  bool native = false;
  Status st = cpu::GemmBF16Support(&impl, &native);
  if (!st.ok()) {
    // The refusal must say why.
    EXPECT_NE(st.message().find("bf16"), std::string::npos) << st.ToString();
    GTEST_SKIP() << st.ToString();
  }
  EXPECT_FALSE(impl.empty());
  // Natively, oneDNN's implementation is one of its bf16 (or AMX) kernels; emulated, it is not.
  const bool bf16_kernel =
      impl.find("avx512_core_bf16") != std::string::npos || impl.find("amx") != std::string::npos;
  EXPECT_EQ(native, bf16_kernel) << impl;
  if (native) {
    EXPECT_TRUE(__builtin_cpu_supports("avx512bf16"));
  }
}

// Every transpose combination, beta 0 and 1, alpha 1 and not, odd shapes, padded leading
// dimensions. Products of two bf16 values are exact in f32, so the only error is f32 rounding in
// the sum: at most about k * 2^-24 of sum |alpha a b| + |beta c|, below 1e-5 of it for k <= 129.
TEST(GemmBF16Test, MatchesDoubleReferenceOnRoundedInputs) {
  SKIP_WITHOUT_BF16();
  std::mt19937 rng(11);
  struct Shape {
    int64_t m, n, k;
  };
  for (Shape sh : {Shape{1, 1, 1}, Shape{7, 13, 5}, Shape{33, 17, 65}, Shape{64, 100, 129},
                   Shape{130, 3, 31}}) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 1.0f}) {
          for (float alpha : {1.0f, 0.5f}) {
            const int64_t m = sh.m, n = sh.n, k = sh.k;
            // Stored shapes: A is [m, k] or (ta) [k, m]; B is [k, n] or (tb) [n, k]; +3 padding.
            const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, lda = a_cols + 3;
            const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n, ldb = b_cols + 3;
            const int64_t ldc = n + 2;
            Bf16Matrix A(static_cast<size_t>(a_rows * lda), rng);
            Bf16Matrix B(static_cast<size_t>(b_rows * ldb), rng);
            std::vector<float> C(static_cast<size_t>(m * ldc));
            std::normal_distribution<float> normal(0.0f, 1.0f);
            for (float& c : C) c = normal(rng);
            const std::vector<float> C0 = C;
            cpu::GemmBF16(ta, tb, m, n, k, alpha, A.bits.data(), lda, B.bits.data(), ldb, beta,
                          C.data(), ldc);
            for (int64_t i = 0; i < m; ++i) {
              for (int64_t j = 0; j < n; ++j) {
                double ref = 0, mag = 0;
                for (int64_t p = 0; p < k; ++p) {
                  const double a = A.values[ta ? p * lda + i : i * lda + p];
                  const double b = B.values[tb ? j * ldb + p : p * ldb + j];
                  ref += a * b;
                  mag += std::abs(a * b);
                }
                const double c0 = C0[i * ldc + j];
                ref = alpha * ref + beta * c0;
                mag = std::abs(alpha) * mag + std::abs(beta * c0);
                ASSERT_NEAR(C[i * ldc + j], ref, 1e-5 * mag + 1e-30)
                    << "m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb
                    << " alpha " << alpha << " beta " << beta << " at " << i << "," << j;
              }
              // The padding between rows of C is never written.
              for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(C[i * ldc + j], C0[i * ldc + j]);
            }
          }
        }
      }
    }
  }
}

// Threads of a pool share the cached primitives: concurrent calls give exactly the bits of the
// same calls made one at a time, and repeated calls give the same bits.
TEST(GemmBF16Test, ConcurrentCallsAreSafeAndDeterministic) {
  SKIP_WITHOUT_BF16();
  std::mt19937 rng(5);
  constexpr int kJobs = 8;
  constexpr int64_t m = 48, n = 80, k = 96;
  std::vector<Bf16Matrix> as, bs;
  for (int j = 0; j < kJobs; ++j) {
    as.emplace_back(static_cast<size_t>(m * k), rng);
    bs.emplace_back(static_cast<size_t>(n * k), rng);
  }
  auto run = [&](int j, std::vector<float>& c) {
    c.assign(static_cast<size_t>(m * n), 0.0f);
    cpu::GemmBF16(false, true, m, n, k, 1.0f, as[j].bits.data(), k, bs[j].bits.data(), k, 0.0f,
                  c.data(), n);
  };
  std::vector<std::vector<float>> serial(kJobs), parallel(kJobs);
  for (int j = 0; j < kJobs; ++j) run(j, serial[j]);
  ThreadPool pool(4);
  for (int rep = 0; rep < 3; ++rep) {
    pool.ParallelFor(kJobs, [&](size_t b, size_t e) {
      for (size_t j = b; j < e; ++j) run(static_cast<int>(j), parallel[j]);
    });
    for (int j = 0; j < kJobs; ++j) {
      ASSERT_EQ(0, std::memcmp(serial[j].data(), parallel[j].data(), serial[j].size() * 4))
          << "job " << j << " repetition " << rep;
    }
  }
}

// ConvertToBF16 is base/dtype.h's F32ToBF16 (round to nearest even, NaN kept quiet, subnormals
// rounded, overflow to infinity) bit for bit, whatever the ISA clone and the pool split.
TEST(GemmBF16Test, ConversionIsBitIdenticalToTheScalarOne) {
  std::mt19937 rng(3);
  std::vector<float> x(100003);
  std::uniform_int_distribution<uint32_t> bits;
  for (float& v : x) {
    const uint32_t u = bits(rng);
    std::memcpy(&v, &u, 4);  // every bit pattern: NaNs, infinities, subnormals, ties
  }
  const float specials[] = {0.0f, -0.0f, 1.0f, std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 3.3895314e38f,
                            std::numeric_limits<float>::denorm_min(), 1.00390625f, 1.01171875f};
  std::copy(std::begin(specials), std::end(specials), x.begin());
  std::vector<uint16_t> ref(x.size());
  for (size_t i = 0; i < x.size(); ++i) ref[i] = F32ToBF16(x[i]);
  ThreadPool pool(3);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    std::vector<uint16_t> got(x.size(), 0xdead);
    ConvertToBF16(got.data(), x.data(), x.size(), p);
    ASSERT_EQ(got, ref);
  }
  EXPECT_EQ(F32ToBF16(1.00390625f), 0x3f80);  // tie rounds to even (down)
  EXPECT_EQ(F32ToBF16(1.01171875f), 0x3f82);  // tie rounds to even (up)
}

// The training products in bf16 compute the same sums as the f32 ones on the rounded operands:
// only the f32 summation order differs (relative 1e-5 of the largest |value|).
TEST(GemmBF16Test, TrainingProductsMatchF32OnRoundedOperands) {
  SKIP_WITHOUT_BF16();
  std::mt19937 rng(9);
  constexpr int64_t M = 70, N = 45, K = 38;
  Bf16Matrix x(M * K, rng), W(N * K, rng), dy(M * N, rng);
  ThreadPool pool(2);
  auto max_rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
      ref = std::max(ref, std::abs(static_cast<double>(b[i])));
    }
    return diff / ref;
  };
  std::vector<float> y16(M * N), y32(M * N);
  MatmulForwardBF16(y16.data(), x.bits.data(), W.bits.data(), M, N, K, &pool);
  MatmulForward(y32.data(), x.values.data(), W.values.data(), M, N, K, &pool);
  EXPECT_LE(max_rel(y16, y32), 1e-5);
  std::vector<float> dx16(M * K), dx32(M * K), dW16(N * K, 0.25f), dW32(N * K, 0.25f);
  MatmulBackwardBF16(dx16.data(), dW16.data(), dy.bits.data(), x.bits.data(), W.bits.data(), M,
                     N, K, &pool);
  MatmulBackward(dx32.data(), dW32.data(), dy.values.data(), x.values.data(), W.values.data(), M,
                 N, K, &pool);
  EXPECT_LE(max_rel(dx16, dx32), 1e-5);
  EXPECT_LE(max_rel(dW16, dW32), 1e-5);  // accumulated onto 0.25, as into the store

  // The LM head: logits and the loss from the same rounded operands agree to f32 rounding; the
  // gradients go through dlogits rounded to bf16 (relative error <= 2^-9 each), so they agree to
  // a few 2^-9 of their largest value.
  constexpr int64_t V = 300, n = 20, d = K;
  Bf16Matrix head(V * d, rng), hx(n * d, rng);
  std::vector<int32_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = static_cast<int32_t>((i * 37) % V);
  targets[3] = -1;
  std::vector<float> hdx16(n * d), hdx32(n * d), hdW16(V * d, 0.0f), hdW32(V * d, 0.0f);
  const double l16 = CrossEntropyLmHeadBF16(hdx16.data(), hdW16.data(), hx.bits.data(),
                                            head.bits.data(), targets.data(), n, d, V, 7, 0.05f,
                                            &pool);
  const double l32 = CrossEntropyLmHead(hdx32.data(), hdW32.data(), hx.values.data(),
                                        head.values.data(), targets.data(), n, d, V, 7, 0.05f,
                                        &pool);
  EXPECT_NEAR(l16, l32, 1e-5 * std::abs(l32));
  EXPECT_LE(max_rel(hdx16, hdx32), 4.0 / 512);
  EXPECT_LE(max_rel(hdW16, hdW32), 4.0 / 512);
  // Forward only: the same loss, nothing written.
  EXPECT_EQ(l16, CrossEntropyLmHeadBF16(nullptr, nullptr, hx.bits.data(), head.bits.data(),
                                        targets.data(), n, d, V, 7, 0.05f, &pool));
}

}  // namespace
}  // namespace strata::kernels
