// kernels/ops.h against PyTorch (tests/reference/kernels_ref.py), against closed forms, and the
// same reference for every per-ISA kernel set the CPU can run (one binary, all variants).
//
// SetUpTestSuite writes random inputs (fixed seed) for every case into a fresh temporary folder,
// runs `/usr/bin/python3 $STRATA_SOURCE_DIR/tests/reference/kernels_ref.py DIR` once (the script
// path comes from the STRATA_SOURCE_DIR compile definition, so ctest can run from any folder) and
// reads the torch outputs back. Debian's python3-torch and python3-numpy must be installed; the
// interpreter is /usr/bin/python3 unless the build defines STRATA_REFERENCE_PYTHON.
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "base/dtype.h"
#include "base/thread_pool.h"
#include "kernels/cpu/ops_table.h"
#include "kernels/ops.h"
#include "kernels/quant.h"

#ifndef STRATA_SOURCE_DIR
#error "STRATA_SOURCE_DIR must be defined (the repository root, for tests/reference/)"
#endif
#ifndef STRATA_REFERENCE_PYTHON
#define STRATA_REFERENCE_PYTHON "/usr/bin/python3"
#endif

namespace strata::kernels {
namespace {

namespace fs = std::filesystem;

struct LinearCase {
  std::string name;
  WeightType wt;
  int64_t M, N, K;
  std::vector<float> x, w;       // w: unrounded f32
  std::vector<uint8_t> packed;   // the weight as Linear reads it
};

struct AttnCase {
  std::string name;
  int64_t T, H, KVH, D, S;
  int64_t window;  // 0: every earlier key
  std::vector<float> q, k, v;
  std::vector<int32_t> pos;
};

struct RopeCase {
  std::string name;
  int64_t T, H, D;
  float theta;
  std::vector<float> x;
  std::vector<int32_t> pos;
};

std::vector<float> Random(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

template <class T>
void WriteRaw(const fs::path& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()),
          static_cast<std::streamsize>(v.size() * sizeof(T)));
  ASSERT_TRUE(f.good()) << path;
}

std::vector<float> ReadOut(const fs::path& dir, const std::string& name) {
  std::ifstream f(dir / (name + ".out"), std::ios::binary | std::ios::ate);
  EXPECT_TRUE(f.good()) << "no reference output for " << name;
  if (!f.good()) return {};
  const auto bytes = static_cast<size_t>(f.tellg());
  std::vector<float> v(bytes / sizeof(float));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
  return v;
}

// max |a - ref| / max |ref|: the relative error at the scale of the output.
double RelErr(const std::vector<float>& a, const std::vector<float>& ref) {
  EXPECT_EQ(a.size(), ref.size());
  if (a.size() != ref.size()) return INFINITY;
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - ref[i]));
    mag = std::max(mag, std::fabs(static_cast<double>(ref[i])));
  }
  return err / mag;
}

// The kernel set the dispatcher picked (Linear uses it).
const OpsTable& DispatchedTable() {
  for (const OpsTable* t : {&generic::kOpsTable, &avx2::kOpsTable, &avx512::kOpsTable}) {
    if (std::strcmp(t->isa, OpsIsa()) == 0) return *t;
  }
  return generic::kOpsTable;
}

// Against torch on the (bf16-rounded or dequantized) weights. On a table with VNNI (gemm_q8 set)
// both q8_0 paths, decode (M = 1) and prefill, quantize x to int8 per 32-block (error up to 1/254
// of the block's largest |x|, as ggml's q8_0 x q8_0): 1e-2 against torch, and 1e-5 against
// Int8ActivationReference, which rounds x the same way. Every other path multiplies in f32.
double Tolerance(const LinearCase& c, const OpsTable& table) {
  if (c.wt != WeightType::kQ8_0) return 1e-5;
  return table.gemm_q8 != nullptr ? 1e-2 : 1e-5;
}

// y = x_q W_q^T in double, with each 32-block of each row of x rounded to int8 steps of
// max|x| / 127 (nearest, ties to even) and W dequantized: what gemm_q8 computes, independently.
std::vector<float> Int8ActivationReference(const LinearCase& c) {
  std::vector<float> wd(static_cast<size_t>(c.N * c.K)), xr(c.x);
  DequantizeRowsQ8_0(c.packed.data(), wd.data(), c.N, c.K);
  for (int64_t i = 0; i < c.M * c.K; i += kQ8BlockSize) {
    float amax = 0.0f;
    for (int64_t j = 0; j < kQ8BlockSize; ++j) amax = std::max(amax, std::fabs(xr[i + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int64_t j = 0; j < kQ8BlockSize; ++j) xr[i + j] = d * std::nearbyint(xr[i + j] * id);
  }
  std::vector<float> y(static_cast<size_t>(c.M * c.N));
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < c.K; ++k) {
        s += static_cast<double>(xr[m * c.K + k]) * wd[n * c.K + k];
      }
      y[m * c.N + n] = static_cast<float>(s);
    }
  }
  return y;
}

class OpsRefTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/strata_kernels_ops_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::mt19937 rng(20261122);
    std::ofstream manifest(dir_ / "manifest.txt");

    // Odd sizes exercise the 4-row blocking tail and the vector-loop tails; N = 257 splits over
    // a 2-thread pool (decode) and over several 64-row prefill blocks.
    struct Shape { int64_t M, N, K; };
    // K = 608 is 19 q8_0 blocks: the decode kernel's two groups of eight, then three single blocks
    // (and 646-byte rows, so most rows start off any alignment).
    const Shape shapes[] = {{1, 37, 96}, {7, 37, 96}, {1, 37, 101}, {3, 37, 101},
                            {1, 257, 160}, {9, 257, 160}, {70, 130, 64}, {1, 37, 608},
                            {3, 37, 608}};
    for (WeightType wt : {WeightType::kF32, WeightType::kBF16, WeightType::kQ8_0}) {
      for (const Shape& s : shapes) {
        if (wt == WeightType::kQ8_0 && s.K % kQ8BlockSize != 0) continue;
        LinearCase c;
        c.name = std::string("linear_") + WeightTypeName(wt) + "_" + std::to_string(s.M) + "x" +
                 std::to_string(s.N) + "x" + std::to_string(s.K);
        c.wt = wt;
        c.M = s.M;
        c.N = s.N;
        c.K = s.K;
        c.x = Random(rng, static_cast<size_t>(s.M * s.K));
        c.w = Random(rng, static_cast<size_t>(s.N * s.K), 0.1f);
        c.packed.resize(WeightBytes(wt, s.N, s.K));
        if (wt == WeightType::kF32) {
          std::memcpy(c.packed.data(), c.w.data(), c.packed.size());
        } else if (wt == WeightType::kBF16) {
          auto* p = reinterpret_cast<uint16_t*>(c.packed.data());
          for (size_t i = 0; i < c.w.size(); ++i) p[i] = F32ToBF16(c.w[i]);
        } else {
          QuantizeRowsQ8_0(c.w.data(), c.packed.data(), s.N, s.K);
          WriteRaw(dir_ / (c.name + ".q8"), c.packed);
        }
        WriteRaw(dir_ / (c.name + ".x"), c.x);
        WriteRaw(dir_ / (c.name + ".w"), c.w);
        manifest << c.name << " linear_" << WeightTypeName(wt) << " " << s.M << " " << s.N << " "
                 << s.K << "\n";
        linear_cases_->push_back(std::move(c));
      }
    }

    // GQA: 8 query heads over 2 kv heads, 5 new tokens at positions 3..7 of an 8-row cache; one
    // decode step at position 0 (attends to itself only); and, with Llama's head sizes 64 and
    // 128 (the avx512 path scores 16 keys at a time for those), tokens whose rows of 22..40 and
    // 31..33 scores take full and partial 16-key blocks.
    // Sliding windows (Mistral): a prefill whose first tokens still see every key and whose
    // later ones see the last 7, and windows of 17 and 1 over 16-key blocks.
    for (auto [name, T, first, S, D, W] :
         {std::tuple<const char*, int64_t, int32_t, int64_t, int64_t, int64_t>{
              "attn_prefill", 5, 3, 8, 16, 0},
          {"attn_decode", 1, 0, 8, 16, 0}, {"attn_prefill_d64", 19, 21, 40, 64, 0},
          {"attn_prefill_d128", 3, 30, 33, 128, 0}, {"attn_window_prefill", 12, 2, 14, 16, 7},
          {"attn_window_d64", 19, 21, 40, 64, 17}, {"attn_window_one", 4, 9, 13, 64, 1}}) {
      AttnCase a;
      a.name = name;
      a.T = T, a.H = 8, a.KVH = 2, a.D = D, a.S = S, a.window = W;
      a.q = Random(rng, static_cast<size_t>(a.T * a.H * a.D));
      a.k = Random(rng, static_cast<size_t>(a.S * a.KVH * a.D));
      a.v = Random(rng, static_cast<size_t>(a.S * a.KVH * a.D));
      for (int64_t t = 0; t < a.T; ++t) a.pos.push_back(first + static_cast<int32_t>(t));
      WriteRaw(dir_ / (a.name + ".q"), a.q);
      WriteRaw(dir_ / (a.name + ".k"), a.k);
      WriteRaw(dir_ / (a.name + ".v"), a.v);
      WriteRaw(dir_ / (a.name + ".pos"), a.pos);
      manifest << a.name << " attention " << a.T << " " << a.H << " " << a.KVH << " " << a.D << " "
               << a.S << " " << a.window << "\n";
      attn_cases_->push_back(std::move(a));
    }

    for (int theta : {10000, 500000}) {
      RopeCase r;
      r.name = "rope_" + std::to_string(theta);
      r.T = 6, r.H = 3, r.D = 64, r.theta = static_cast<float>(theta);
      r.x = Random(rng, static_cast<size_t>(r.T * r.H * r.D));
      r.pos = {0, 1, 7, 100, 1000, 4095};
      WriteRaw(dir_ / (r.name + ".x"), r.x);
      WriteRaw(dir_ / (r.name + ".pos"), r.pos);
      manifest << r.name << " rope " << r.T << " " << r.H << " " << r.D << " " << theta << "\n";
      rope_cases_->push_back(std::move(r));
    }

    rms_x_ = Random(rng, 3 * 50, 2.0f);
    rms_w_ = Random(rng, 50);
    WriteRaw(dir_ / "rmsnorm.x", rms_x_);
    WriteRaw(dir_ / "rmsnorm.w", rms_w_);
    manifest << "rmsnorm rmsnorm 3 50 " << 10000 << "\n";  // eps = 1e-5, in units of 1e-9

    softmax_x_ = Random(rng, 4 * 33, 30.0f);  // large logits: exp overflows without the max
    WriteRaw(dir_ / "softmax.x", softmax_x_);
    manifest << "softmax softmax 4 33\n";

    gate_ = Random(rng, 100, 4.0f);
    up_ = Random(rng, 100);
    WriteRaw(dir_ / "swiglu.gate", gate_);
    WriteRaw(dir_ / "swiglu.up", up_);
    manifest << "swiglu swiglu 100\n";
    manifest.close();

    const std::string cmd = std::string(STRATA_REFERENCE_PYTHON) + " " + STRATA_SOURCE_DIR +
                            "/tests/reference/kernels_ref.py " + dir_.string() + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string output;
    char buf[512];
    while (fgets(buf, sizeof(buf), p) != nullptr) output += buf;
    const int rc = pclose(p);
    ASSERT_EQ(rc, 0) << cmd << "\n" << output;
    reference_ok_ = true;
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }

  void SetUp() override { ASSERT_TRUE(reference_ok_) << "the PyTorch reference did not run"; }

  static std::vector<const OpsTable*> Tables() {
    std::vector<const OpsTable*> t;
    for (const OpsTable* table : {&generic::kOpsTable, &avx2::kOpsTable, &avx512::kOpsTable}) {
      if (OpsTableSupported(*table)) {
        t.push_back(table);
      } else {
        std::printf("[   INFO   ] CPU lacks %s: not tested\n", table->isa);
      }
    }
    return t;
  }

  static inline fs::path dir_;
  static inline bool reference_ok_ = false;
  static inline auto* linear_cases_ = new std::vector<LinearCase>;
  static inline auto* attn_cases_ = new std::vector<AttnCase>;
  static inline auto* rope_cases_ = new std::vector<RopeCase>;
  static inline std::vector<float> rms_x_, rms_w_, softmax_x_, gate_, up_;
};

TEST_F(OpsRefTest, LinearMatchesTorchOnEveryIsa) {
  ThreadPool pool(2);
  for (const OpsTable* table : Tables()) {
    for (const LinearCase& c : *linear_cases_) {
      SCOPED_TRACE(std::string(table->isa) + " " + c.name);
      const std::vector<float> ref = ReadOut(dir_, c.name);
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> y(static_cast<size_t>(c.M * c.N), NAN);
        LinearWith(*table, y.data(), c.x.data(), c.packed.data(), c.wt, c.M, c.N, c.K, p);
        EXPECT_LE(RelErr(y, ref), Tolerance(c, *table));
      }
    }
  }
}

TEST_F(OpsRefTest, Q8Int8PathsMatchTheirRoundingExactly) {
  ThreadPool pool(2);
  int checked = 0;
  for (const OpsTable* table : Tables()) {
    if (table->gemm_q8 == nullptr) continue;
    for (const LinearCase& c : *linear_cases_) {
      if (c.wt != WeightType::kQ8_0) continue;
      SCOPED_TRACE(std::string(table->isa) + " " + c.name);
      const std::vector<float> ref = Int8ActivationReference(c);
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> y(static_cast<size_t>(c.M * c.N), NAN);
        LinearWith(*table, y.data(), c.x.data(), c.packed.data(), c.wt, c.M, c.N, c.K, p);
        EXPECT_LE(RelErr(y, ref), 1e-5);
        ++checked;
      }
    }
  }
  if (checked == 0) GTEST_SKIP() << "no kernel set with int8 q8_0 products (AVX-512 VNNI) on this CPU";
}

TEST_F(OpsRefTest, DispatchedLinearMatchesTorch) {
  for (const LinearCase& c : *linear_cases_) {
    SCOPED_TRACE(c.name);
    std::vector<float> y(static_cast<size_t>(c.M * c.N));
    Linear(y.data(), c.x.data(), c.packed.data(), c.wt, c.M, c.N, c.K, &ThreadPool::Default());
    EXPECT_LE(RelErr(y, ReadOut(dir_, c.name)), Tolerance(c, DispatchedTable()));
  }
}

TEST_F(OpsRefTest, AttentionMatchesTorchOnEveryIsa) {
  ThreadPool pool(2);
  std::vector<const OpsTable*> tables = Tables();
  for (const AttnCase& a : *attn_cases_) {
    const std::vector<float> ref = ReadOut(dir_, a.name);
    for (const OpsTable* table : tables) {
      SCOPED_TRACE(std::string(table->isa) + " " + a.name);
      std::vector<float> out(a.q.size(), NAN);
      AttentionWith(*table, out.data(), a.q.data(), a.k.data(), a.v.data(), a.T, a.H, a.KVH, a.D,
                    a.pos.data(), a.window, &pool);
      EXPECT_LE(RelErr(out, ref), 1e-5);
    }
    std::vector<float> out(a.q.size());
    Attention(out.data(), a.q.data(), a.k.data(), a.v.data(), a.T, a.H, a.KVH, a.D, a.pos.data(),
              a.window, nullptr);
    EXPECT_LE(RelErr(out, ref), 1e-5) << a.name;
  }
}

TEST_F(OpsRefTest, AttentionDecodeAtPositionZeroReturnsV) {
  // Closed form: one visible key, so softmax is 1 and each head returns its kv head's V row 0.
  const AttnCase& a = attn_cases_->at(1);
  ASSERT_EQ(a.pos[0], 0);
  std::vector<float> out(a.q.size());
  Attention(out.data(), a.q.data(), a.k.data(), a.v.data(), a.T, a.H, a.KVH, a.D, a.pos.data(), 0,
            nullptr);
  for (int64_t h = 0; h < a.H; ++h) {
    const int64_t kvh = h / (a.H / a.KVH);
    for (int64_t d = 0; d < a.D; ++d) {
      EXPECT_FLOAT_EQ(out[static_cast<size_t>(h * a.D + d)],
                      a.v[static_cast<size_t>(kvh * a.D + d)]);
    }
  }
}

TEST_F(OpsRefTest, AttentionWindowOfOneReturnsEachTokensOwnV) {
  // Closed form: a window of one leaves each token only its own key, so every head returns its
  // kv head's V row at the token's position, whatever the scores.
  const AttnCase& a = attn_cases_->back();
  ASSERT_EQ(a.window, 1);
  std::vector<float> out(a.q.size());
  Attention(out.data(), a.q.data(), a.k.data(), a.v.data(), a.T, a.H, a.KVH, a.D, a.pos.data(), 1,
            nullptr);
  for (int64_t t = 0; t < a.T; ++t) {
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t kvh = h / (a.H / a.KVH);
      for (int64_t d = 0; d < a.D; ++d) {
        EXPECT_FLOAT_EQ(out[static_cast<size_t>((t * a.H + h) * a.D + d)],
                        a.v[static_cast<size_t>((a.pos[static_cast<size_t>(t)] * a.KVH + kvh) *
                                                    a.D + d)]);
      }
    }
  }
}

TEST_F(OpsRefTest, RopeMatchesHfRotateHalf) {
  for (const RopeCase& r : *rope_cases_) {
    SCOPED_TRACE(r.name);
    std::vector<float> x = r.x;
    Rope(x.data(), r.T, r.H, r.D, r.pos.data(), r.theta);
    const std::vector<float> ref = ReadOut(dir_, r.name);
    ASSERT_EQ(x.size(), ref.size());
    // Angles up to 4095 rad: one ulp of the float angle is 2.4e-4 rad, which bounds the agreement
    // of any two float32 implementations there.
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], ref[i], 1e-3) << i;
    EXPECT_LE(RelErr(x, ref), 3e-4);
    // Position 0 is the identity.
    for (size_t i = 0; i < static_cast<size_t>(r.H * r.D); ++i) EXPECT_EQ(x[i], r.x[i]);
  }
}

TEST_F(OpsRefTest, RmsNormMatchesTorch) {
  std::vector<float> out(rms_x_.size());
  RmsNorm(out.data(), rms_x_.data(), rms_w_.data(), 3, 50, 1e-5f);
  const std::vector<float> ref = ReadOut(dir_, "rmsnorm");
  EXPECT_LE(RelErr(out, ref), 1e-6);
  std::vector<float> in_place = rms_x_;
  RmsNorm(in_place.data(), in_place.data(), rms_w_.data(), 3, 50, 1e-5f);
  EXPECT_EQ(in_place, out);
}

TEST_F(OpsRefTest, SoftmaxMatchesTorch) {
  std::vector<float> x = softmax_x_;
  Softmax(x.data(), 4, 33);
  EXPECT_LE(RelErr(x, ReadOut(dir_, "softmax")), 1e-6);
  for (int r = 0; r < 4; ++r) {
    double sum = 0.0;
    for (int i = 0; i < 33; ++i) sum += x[static_cast<size_t>(r * 33 + i)];
    EXPECT_NEAR(sum, 1.0, 1e-5);
  }
}

TEST_F(OpsRefTest, SwiGLUMatchesTorchSilu) {
  std::vector<float> out(100);
  SwiGLU(out.data(), gate_.data(), up_.data(), 100);
  EXPECT_LE(RelErr(out, ReadOut(dir_, "swiglu")), 1e-6);
  // Every ISA's kernel (100 = six 16-wide vectors and a tail of 4), and in place on gate.
  for (const OpsTable* table : Tables()) {
    SCOPED_TRACE(table->isa);
    std::vector<float> y(100, NAN), g = gate_;
    table->swiglu(y.data(), gate_.data(), up_.data(), 100);
    EXPECT_LE(RelErr(y, ReadOut(dir_, "swiglu")), 1e-6);
    table->swiglu(g.data(), g.data(), up_.data(), 100);
    EXPECT_EQ(g, y);
  }
}

TEST_F(OpsRefTest, SwiGLUStaysFiniteAtLargeGates) {
  // silu(g) = g * sigmoid(g) in double as the closed form: large |g| must neither overflow
  // exp (silu(-100) is -3.7e-42, silu(100) is 100) nor lose sign or magnitude.
  const std::vector<float> gate = {-100.0f, -88.5f, -30.0f, -1e-3f, 0.0f, 1e-3f,  5.0f, 30.0f,
                                   88.5f,   100.0f, -7.5f,  3.25f, -0.5f, 0.5f, -20.0f, 20.0f,
                                   -104.5f, 200.0f};
  const std::vector<float> up(gate.size(), 1.5f);
  for (const OpsTable* table : Tables()) {
    SCOPED_TRACE(table->isa);
    std::vector<float> y(gate.size(), NAN);
    table->swiglu(y.data(), gate.data(), up.data(), static_cast<int64_t>(gate.size()));
    for (size_t i = 0; i < gate.size(); ++i) {
      const double g = gate[i];
      const double want = g / (1.0 + std::exp(-g)) * 1.5;
      ASSERT_TRUE(std::isfinite(y[i])) << "g=" << g;
      EXPECT_NEAR(y[i], want, 1e-6 * std::fabs(want) + 1e-38) << "g=" << g;
    }
  }
}

TEST(OpsTest, Q8RoundTripWithinHalfAStep) {
  std::mt19937 rng(7);
  std::vector<float> x = Random(rng, 4 * 64, 3.0f);
  x[5] = 0.0f;
  for (int i = 64; i < 96; ++i) x[static_cast<size_t>(i)] = 0.0f;  // an all-zero block: d = 0
  std::vector<uint8_t> q(WeightBytes(WeightType::kQ8_0, 4, 64));
  ASSERT_EQ(q.size(), 4u * 2u * 34u);
  QuantizeRowsQ8_0(x.data(), q.data(), 4, 64);
  std::vector<float> back(x.size());
  DequantizeRowsQ8_0(q.data(), back.data(), 4, 64);
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0.0f;
    for (size_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[b * 32 + i]));
    const float d = amax / 127.0f;
    // half a step, plus the f16 rounding of d times |q| <= 127
    const float bound = d * (0.5f + 127.0f / 2048.0f) + 1e-30f;
    for (size_t i = 0; i < 32; ++i) EXPECT_LE(std::fabs(back[b * 32 + i] - x[b * 32 + i]), bound);
  }
  for (int i = 64; i < 96; ++i) EXPECT_EQ(back[static_cast<size_t>(i)], 0.0f);
}

TEST(OpsTest, Q8LayoutIsValuesThenScalesPerRow) {
  // Two rows of two hand-computed blocks. Block 0 of row 0: x[i] = i - 16, so max|x| = 16,
  // d = 16/127 and q[i] = round((i - 16) * 127 / 16); the f16 scale 16/127 = 0.125984... rounds
  // to 0x3008 (0.1259765625). Block 1 of row 0 is block 0 doubled: q alike, d = 0x3408. Row 1 is
  // row 0 negated: q negated, scales alike.
  std::vector<float> x(2 * 64);
  for (int i = 0; i < 32; ++i) {
    x[static_cast<size_t>(i)] = static_cast<float>(i - 16);
    x[static_cast<size_t>(32 + i)] = 2.0f * static_cast<float>(i - 16);
  }
  for (int i = 0; i < 64; ++i) x[static_cast<size_t>(64 + i)] = -x[static_cast<size_t>(i)];
  std::vector<uint8_t> raw(WeightBytes(WeightType::kQ8_0, 2, 64));
  ASSERT_EQ(raw.size(), 2u * (64u + 4u));
  QuantizeRowsQ8_0(x.data(), raw.data(), 2, 64);
  auto q = [&](int row, int k) { return static_cast<int8_t>(raw[static_cast<size_t>(row * 68 + k)]); };
  auto d = [&](int row, int b) {
    return raw[static_cast<size_t>(row * 68 + 64 + 2 * b)] |
           raw[static_cast<size_t>(row * 68 + 64 + 2 * b + 1)] << 8;  // little-endian f16
  };
  for (int row = 0; row < 2; ++row) {
    const int sign = row == 0 ? 1 : -1;
    for (int b = 0; b < 2; ++b) {
      EXPECT_EQ(q(row, 32 * b + 0), sign * -127);
      EXPECT_EQ(q(row, 32 * b + 16), 0);
      EXPECT_EQ(q(row, 32 * b + 17), sign * 8);    // 7.9375 -> 8
      EXPECT_EQ(q(row, 32 * b + 18), sign * 16);   // 15.875 -> 16
      EXPECT_EQ(q(row, 32 * b + 31), sign * 119);  // 119.0625 -> 119
    }
    EXPECT_EQ(d(row, 0), 0x3008);
    EXPECT_EQ(d(row, 1), 0x3408);
  }
  EXPECT_EQ(Q8RowValues(raw.data(), 64, 1), reinterpret_cast<const int8_t*>(raw.data()) + 68);
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(Q8RowScales(raw.data(), 64, 1)), raw.data() + 132);
}

TEST(OpsTest, WeightBytes) {
  EXPECT_EQ(WeightBytes(WeightType::kF32, 3, 64), 3u * 64u * 4u);
  EXPECT_EQ(WeightBytes(WeightType::kBF16, 3, 64), 3u * 64u * 2u);
  EXPECT_EQ(WeightBytes(WeightType::kQ8_0, 2048, 5632), 2048u * 176u * 34u);
}

TEST(OpsTest, DispatcherPicksTheWidestSupportedIsa) {
  const std::string isa = OpsIsa();
  if (OpsTableSupported(avx512::kOpsTable)) {
    EXPECT_EQ(isa, "avx512");
  } else if (OpsTableSupported(avx2::kOpsTable)) {
    EXPECT_EQ(isa, "avx2");
  } else {
    EXPECT_EQ(isa, "generic");
  }
  EXPECT_TRUE(OpsTableSupported(generic::kOpsTable));
}

TEST(OpsTest, LinearIsIdenticalWithAndWithoutThePool) {
  // Each output is one thread's dot product, so splitting rows over threads changes no bit.
  std::mt19937 rng(3);
  const int64_t N = 1000, K = 256;
  std::vector<float> x = Random(rng, K), w = Random(rng, static_cast<size_t>(N * K));
  std::vector<float> a(N), b(N);
  ThreadPool pool(2);
  Linear(a.data(), x.data(), w.data(), WeightType::kF32, 1, N, K, nullptr);
  Linear(b.data(), x.data(), w.data(), WeightType::kF32, 1, N, K, &pool);
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace strata::kernels
