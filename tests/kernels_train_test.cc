// kernels/train.h against three independent references:
// - PyTorch autograd (tests/reference/train_ops_ref.py, run once by SetUpTestSuite on random
//   inputs written to a fresh temporary folder; Debian's /usr/bin/python3 with python3-torch);
// - central finite differences in double of small double-precision forwards written here from the
//   textbook definitions, on L = sum(out * R) for a fixed random R;
// - closed forms (AdamW's first step, SumSquares).
// Plus determinism: identical bits run to run on a 2-thread pool, and pool vs no pool agree.
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/thread_pool.h"
#include "kernels/ops.h"
#include "kernels/train.h"

#ifndef STRATA_SOURCE_DIR
#error "STRATA_SOURCE_DIR must be defined (the repository root, for tests/reference/)"
#endif
#ifndef STRATA_PYTHON
#define STRATA_PYTHON "/usr/bin/python3"
#endif

namespace strata::kernels {
namespace {

namespace fs = std::filesystem;
using Vec = std::vector<float>;
using DVec = std::vector<double>;
using IVec = std::vector<int32_t>;

Vec Random(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  Vec v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

DVec ToD(const Vec& v) { return DVec(v.begin(), v.end()); }

template <class T>
void WriteRaw(const fs::path& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()),
          static_cast<std::streamsize>(v.size() * sizeof(T)));
  ASSERT_TRUE(f.good()) << path;
}

// max |a - ref| / max |ref|: the relative error at the scale of the output.
double RelErr(const Vec& a, const Vec& ref) {
  EXPECT_EQ(a.size(), ref.size());
  if (a.size() != ref.size() || ref.empty()) return INFINITY;
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - ref[i]));
    mag = std::max(mag, std::fabs(static_cast<double>(ref[i])));
  }
  EXPECT_GT(mag, 0.0) << "reference is all zeros: the comparison would prove nothing";
  return err / mag;
}

// Products in both slicing directions: M > N, M < N, M < K, N < K.
struct MatmulShape {
  int64_t M, N, K;
};
constexpr MatmulShape kMatmulShapes[] = {{7, 13, 10}, {40, 5, 19}, {3, 37, 50}, {70, 130, 33}};

// GQA with B = 2; attn_blocks crosses the 64-row query blocks with one kv head; attn_sharp has
// scores of +-30, so softmax rows are near one-hot and exp underflows; attn_onekv has fewer
// (sequence, kv head) pairs than the 2-thread pool, so the backward splits by query head.
struct AttnShape {
  const char* name;
  int64_t B, T, H, KV, D;
};
constexpr AttnShape kAttnShapes[] = {{"attn_small", 2, 7, 4, 2, 8},
                                     {"attn_blocks", 2, 70, 4, 1, 12},
                                     {"attn_mha", 1, 130, 2, 2, 6},
                                     {"attn_sharp", 2, 20, 6, 3, 16},
                                     {"attn_onekv", 1, 70, 4, 1, 8}};

void PrintTo(const AttnShape& s, std::ostream* os) { *os << s.name; }

// One reference case: its inputs by suffix (float or int32), as written for the script.
struct Case {
  std::map<std::string, Vec> f;
  std::map<std::string, IVec> i;
};

class TrainRefTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/strata_kernels_train_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::mt19937 rng(20261122);
    std::ofstream manifest(dir_ / "manifest.txt");
    auto add = [&](const std::string& name, const std::string& line, Case c) {
      for (const auto& [suffix, v] : c.f) WriteRaw(dir_ / (name + "." + suffix), v);
      for (const auto& [suffix, v] : c.i) WriteRaw(dir_ / (name + "." + suffix), v);
      manifest << name << " " << line << "\n";
      (*cases_)[name] = std::move(c);
    };

    for (auto [M, N, K] : kMatmulShapes) {
      Case c;
      c.f["x"] = Random(rng, static_cast<size_t>(M * K));
      c.f["w"] = Random(rng, static_cast<size_t>(N * K), 0.3f);
      c.f["dy"] = Random(rng, static_cast<size_t>(M * N));
      add(MatmulName(M, N, K),
          "matmul " + std::to_string(M) + " " + std::to_string(N) + " " + std::to_string(K),
          std::move(c));
    }
    {
      Case c;
      c.f["x"] = Random(rng, 5 * 37, 2.0f);
      c.f["w"] = Random(rng, 37);
      c.f["dy"] = Random(rng, 5 * 37);
      add("rmsnorm", "rmsnorm 5 37", std::move(c));
    }
    {
      Case c;
      c.f["x"] = Random(rng, 7 * 3 * 12);
      c.f["dy"] = Random(rng, 7 * 3 * 12);
      c.i["pos"] = {0, 1, 2, 5, 9, 100, 4000};
      add("rope", "rope 7 3 12 10000", std::move(c));
    }
    {
      Case c;
      c.f["gate"] = Random(rng, 101, 4.0f);
      c.f["up"] = Random(rng, 101);
      c.f["dout"] = Random(rng, 101);
      add("swiglu", "swiglu 101", std::move(c));
    }
    {
      Case c;
      c.f["table"] = Random(rng, 11 * 9);
      c.i["ids"] = {3, 0, 10, 3, 3, 7, 0, 1, 2, 10, 5, 5, 9, 3, 4};
      c.f["dout"] = Random(rng, 15 * 9);
      add("embedding", "embedding 11 9 15", std::move(c));
    }
    for (auto [name, B, T, H, KV, D] : kAttnShapes) {
      Case c;
      c.f["q"] = Random(rng, static_cast<size_t>(B * T * H * D),
                        std::string(name) == "attn_sharp" ? 8.0f : 1.0f);
      c.f["k"] = Random(rng, static_cast<size_t>(B * T * KV * D));
      c.f["v"] = Random(rng, static_cast<size_t>(B * T * KV * D));
      c.f["dout"] = Random(rng, static_cast<size_t>(B * T * H * D));
      add(name,
          "attention " + std::to_string(B) + " " + std::to_string(T) + " " + std::to_string(H) +
              " " + std::to_string(KV) + " " + std::to_string(D),
          std::move(c));
    }
    {
      Case c;
      c.f["x"] = Random(rng, 23 * 10);
      c.f["w"] = Random(rng, 37 * 10, 0.5f);
      IVec tgt(23);
      std::uniform_int_distribution<int32_t> pick(0, 36);
      for (auto& t : tgt) t = pick(rng);
      tgt[0] = tgt[6] = tgt[22] = -1;  // ignored tokens, one in each of three chunks
      c.i["tgt"] = tgt;
      add("ce", "ce 23 10 37 370000000", std::move(c));  // grad_scale 0.37, in units of 1e-9
    }
    {
      Case c;
      c.f["w"] = Random(rng, 50);
      c.f["g"] = Random(rng, 5 * 50);
      c.f["g"][7] = 0.0f;  // a zero gradient: only weight decay moves it
      add("adamw", "adamw 50 5", std::move(c));
    }
    manifest.close();

    const std::string cmd = std::string(STRATA_PYTHON) + " " + STRATA_SOURCE_DIR +
                            "/tests/reference/train_ops_ref.py " + dir_.string() + " 2>&1";
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

  static std::string MatmulName(int64_t M, int64_t N, int64_t K) {
    return "matmul_" + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
  }

  static const Case& Get(const std::string& name) { return cases_->at(name); }

  static Vec Ref(const std::string& name, const std::string& field) {
    std::ifstream f(dir_ / (name + "." + field + ".out"), std::ios::binary | std::ios::ate);
    EXPECT_TRUE(f.good()) << "no reference output " << name << "." << field;
    if (!f.good()) return {};
    const auto bytes = static_cast<size_t>(f.tellg());
    Vec v(bytes / sizeof(float));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
    return v;
  }

  static inline fs::path dir_;
  static inline bool reference_ok_ = false;
  static inline auto* cases_ = new std::map<std::string, Case>;
};

constexpr double kTol = 1e-4;  // f32 kernels against float64 torch

TEST_F(TrainRefTest, MatmulMatchesTorch) {
  ThreadPool pool(2);
  for (auto [M, N, K] : kMatmulShapes) {
    const std::string name = MatmulName(M, N, K);
    const Case& c = Get(name);
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      SCOPED_TRACE(name + (p ? " pool" : " inline"));
      Vec y(static_cast<size_t>(M * N), NAN);
      MatmulForward(y.data(), c.f.at("x").data(), c.f.at("w").data(), M, N, K, p);
      EXPECT_LE(RelErr(y, Ref(name, "y")), kTol);
      // dW accumulates onto what is there; dx overwrites (NaN would leak through otherwise).
      Vec dx(static_cast<size_t>(M * K), NAN), dw(static_cast<size_t>(N * K), 0.5f);
      MatmulBackward(dx.data(), dw.data(), c.f.at("dy").data(), c.f.at("x").data(),
                     c.f.at("w").data(), M, N, K, p);
      EXPECT_LE(RelErr(dx, Ref(name, "dx")), kTol);
      Vec ref_dw = Ref(name, "dw");
      for (float& v : ref_dw) v += 0.5f;
      EXPECT_LE(RelErr(dw, ref_dw), kTol);
      // accumulate_dx adds; a null dW is skipped.
      Vec dx2(static_cast<size_t>(M * K), 1.0f);
      MatmulBackward(dx2.data(), nullptr, c.f.at("dy").data(), c.f.at("x").data(),
                     c.f.at("w").data(), M, N, K, p, /*accumulate_dx=*/true);
      Vec ref_dx = Ref(name, "dx");
      for (float& v : ref_dx) v += 1.0f;
      EXPECT_LE(RelErr(dx2, ref_dx), kTol);
    }
  }
}

TEST_F(TrainRefTest, RmsNormBackwardMatchesTorch) {
  const Case& c = Get("rmsnorm");
  Vec dx(5 * 37, NAN), dw(37, 0.25f);
  RmsNormBackward(dx.data(), dw.data(), c.f.at("dy").data(), c.f.at("x").data(),
                  c.f.at("w").data(), 5, 37, 1e-5f);
  EXPECT_LE(RelErr(dx, Ref("rmsnorm", "dx")), kTol);
  Vec ref_dw = Ref("rmsnorm", "dw");
  for (float& v : ref_dw) v += 0.25f;
  EXPECT_LE(RelErr(dw, ref_dw), kTol);
  Vec dx2(5 * 37, -2.0f);
  RmsNormBackward(dx2.data(), nullptr, c.f.at("dy").data(), c.f.at("x").data(),
                  c.f.at("w").data(), 5, 37, 1e-5f, /*accumulate_dx=*/true);
  Vec ref_dx = Ref("rmsnorm", "dx");
  for (float& v : ref_dx) v -= 2.0f;
  EXPECT_LE(RelErr(dx2, ref_dx), kTol);
}

TEST_F(TrainRefTest, RopeBackwardMatchesTorch) {
  const Case& c = Get("rope");
  Vec dx = c.f.at("dy");
  RopeBackward(dx.data(), 7, 3, 12, c.i.at("pos").data(), 10000.0f);
  EXPECT_LE(RelErr(dx, Ref("rope", "dx")), kTol);
  // Backward undoes the forward exactly up to rounding: it is the inverse rotation.
  Vec x = c.f.at("x");
  Rope(x.data(), 7, 3, 12, c.i.at("pos").data(), 10000.0f);
  RopeBackward(x.data(), 7, 3, 12, c.i.at("pos").data(), 10000.0f);
  EXPECT_LE(RelErr(x, c.f.at("x")), 1e-6);
}

TEST_F(TrainRefTest, SwiGLUBackwardMatchesTorchAndAllowsAliasing) {
  const Case& c = Get("swiglu");
  Vec dg(101, NAN), du(101, NAN);
  SwiGLUBackward(dg.data(), du.data(), c.f.at("dout").data(), c.f.at("gate").data(),
                 c.f.at("up").data(), 101);
  EXPECT_LE(RelErr(dg, Ref("swiglu", "dgate")), kTol);
  EXPECT_LE(RelErr(du, Ref("swiglu", "dup")), kTol);
  Vec g = c.f.at("gate"), u = c.f.at("up");
  SwiGLUBackward(g.data(), u.data(), c.f.at("dout").data(), g.data(), u.data(), 101);
  EXPECT_EQ(0, std::memcmp(g.data(), dg.data(), g.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(u.data(), du.data(), u.size() * sizeof(float)));
}

TEST_F(TrainRefTest, EmbeddingMatchesTorchWithRepeatedIds) {
  const Case& c = Get("embedding");
  const IVec& ids = c.i.at("ids");
  Vec out(15 * 9, NAN);
  EmbeddingForward(out.data(), c.f.at("table").data(), ids.data(), 15, 9);
  EXPECT_EQ(RelErr(out, Ref("embedding", "out")), 0.0);
  Vec dt(11 * 9, 1.0f);
  EmbeddingBackward(dt.data(), c.f.at("dout").data(), ids.data(), 15, 9);
  Vec ref = Ref("embedding", "dtable");
  for (float& v : ref) v += 1.0f;
  EXPECT_LE(RelErr(dt, ref), 1e-6);
}

TEST_F(TrainRefTest, AttentionMatchesTorch) {
  ThreadPool pool(2);
  for (auto [name, B, T, H, KV, D] : kAttnShapes) {
    const Case& c = Get(name);
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      SCOPED_TRACE(std::string(name) + (p ? " pool" : " inline"));
      const auto nq = static_cast<size_t>(B * T * H * D);
      const auto nk = static_cast<size_t>(B * T * KV * D);
      Vec out(nq, NAN), lse(static_cast<size_t>(B * H * T), NAN);
      AttentionTrainForward(out.data(), lse.data(), c.f.at("q").data(), c.f.at("k").data(),
                            c.f.at("v").data(), B, T, H, KV, D, p);
      EXPECT_LE(RelErr(out, Ref(name, "out")), kTol);
      EXPECT_LE(RelErr(lse, Ref(name, "lse")), kTol);
      Vec dq(nq, NAN), dk(nk, NAN), dv(nk, NAN);
      AttentionTrainBackward(dq.data(), dk.data(), dv.data(), c.f.at("dout").data(),
                             c.f.at("q").data(), c.f.at("k").data(), c.f.at("v").data(),
                             out.data(), lse.data(), B, T, H, KV, D, p);
      EXPECT_LE(RelErr(dq, Ref(name, "dq")), kTol);
      EXPECT_LE(RelErr(dk, Ref(name, "dk")), kTol);
      EXPECT_LE(RelErr(dv, Ref(name, "dv")), kTol);
    }
  }
}

TEST_F(TrainRefTest, CrossEntropyMatchesTorch) {
  const Case& c = Get("ce");
  const Vec ref_dx = Ref("ce", "dx");
  Vec ref_dw = Ref("ce", "dw");
  for (float& v : ref_dw) v += 0.125f;
  const double ref_loss = Ref("ce", "loss").at(0);
  ThreadPool pool(2);
  // chunk 5 does not divide 23; 64 covers all tokens in one chunk; 1 is a row at a time.
  for (int64_t chunk : {5, 64, 1}) {
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      SCOPED_TRACE("chunk " + std::to_string(chunk) + (p ? " pool" : " inline"));
      Vec dx(23 * 10, NAN), dw(37 * 10, 0.125f);
      const double loss = CrossEntropyLmHead(dx.data(), dw.data(), c.f.at("x").data(),
                                             c.f.at("w").data(), c.i.at("tgt").data(), 23, 10, 37,
                                             chunk, 0.37f, p);
      EXPECT_NEAR(loss, ref_loss, 1e-5 * std::fabs(ref_loss));
      EXPECT_LE(RelErr(dx, ref_dx), kTol);
      EXPECT_LE(RelErr(dw, ref_dw), kTol);
      // Ignored targets get no gradient at all.
      for (int row : {0, 6, 22}) {
        for (int d = 0; d < 10; ++d) EXPECT_EQ(dx[static_cast<size_t>(row * 10 + d)], 0.0f);
      }
      // dx or dW may be skipped; the loss does not change.
      EXPECT_EQ(loss, CrossEntropyLmHead(nullptr, nullptr, c.f.at("x").data(), c.f.at("w").data(),
                                         c.i.at("tgt").data(), 23, 10, 37, chunk, 0.37f, p));
    }
  }
}

TEST_F(TrainRefTest, AdamWMatchesTorchOptim) {
  const Case& c = Get("adamw");
  Vec w = c.f.at("w"), m(50, 0.0f), v(50, 0.0f);
  AdamWParams ap;
  ap.lr = 1e-2f;
  ap.weight_decay = 0.1f;
  ap.grad_scale = 0.5f;
  for (int s = 0; s < 5; ++s) {
    ap.step = s + 1;
    AdamWUpdate(w.data(), m.data(), v.data(), c.f.at("g").data() + s * 50, 50, ap);
  }
  // Elementwise relative error (not at the scale of the whole vector).
  auto check = [](const Vec& a, const Vec& ref, const char* what) {
    ASSERT_EQ(a.size(), ref.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_LE(std::fabs(a[i] - ref[i]), 1e-5 * std::fabs(ref[i]) + 1e-12) << what << "[" << i
                                                                             << "]";
    }
  };
  check(w, Ref("adamw", "w"), "w");
  check(m, Ref("adamw", "m"), "m");
  check(v, Ref("adamw", "v"), "v");
}

// ---- finite differences on double-precision forwards --------------------------------------------

// Central differences of loss() with respect to a sample of p's entries (all when few), compared
// with the kernel's gradient g at the scale of the sampled gradients.
double FdRelErr(DVec& p, const Vec& g, const std::function<double()>& loss, std::mt19937& rng,
                size_t samples = 40) {
  EXPECT_EQ(p.size(), g.size());
  std::vector<size_t> idx(p.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(std::min(samples, idx.size()));
  double err = 0.0, mag = 0.0;
  for (size_t i : idx) {
    const double saved = p[i];
    const double h = 1e-5 * std::max(1.0, std::fabs(saved));
    p[i] = saved + h;
    const double lp = loss();
    p[i] = saved - h;
    const double lm = loss();
    p[i] = saved;
    const double fd = (lp - lm) / (2 * h);
    err = std::max(err, std::fabs(fd - g[i]));
    mag = std::max(mag, std::fabs(fd));
  }
  EXPECT_GT(mag, 1e-6) << "all sampled gradients vanish: the check would prove nothing";
  return err / mag;
}

double Weighted(const DVec& out, const DVec& r) {
  double s = 0.0;
  for (size_t i = 0; i < out.size(); ++i) s += out[i] * r[i];
  return s;
}

constexpr double kFdTol = 1e-4;

TEST(TrainFdTest, Matmul) {
  std::mt19937 rng(1);
  const int64_t M = 6, N = 9, K = 11;
  Vec x = Random(rng, M * K), w = Random(rng, N * K), r = Random(rng, M * N);
  DVec xd = ToD(x), wd = ToD(w), rd = ToD(r);
  auto loss = [&] {
    DVec y(static_cast<size_t>(M * N), 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) y[m * N + n] += xd[m * K + k] * wd[n * K + k];
    return Weighted(y, rd);
  };
  Vec dx(M * K), dw(N * K, 0.0f);
  MatmulBackward(dx.data(), dw.data(), r.data(), x.data(), w.data(), M, N, K, nullptr);
  EXPECT_LE(FdRelErr(xd, dx, loss, rng), kFdTol);
  EXPECT_LE(FdRelErr(wd, dw, loss, rng), kFdTol);
}

TEST(TrainFdTest, RmsNorm) {
  std::mt19937 rng(2);
  const int64_t R = 3, D = 13;
  const float eps = 1e-5f;
  Vec x = Random(rng, R * D, 1.5f), w = Random(rng, D), r = Random(rng, R * D);
  DVec xd = ToD(x), wd = ToD(w), rd = ToD(r);
  auto loss = [&] {
    DVec y(static_cast<size_t>(R * D));
    for (int64_t i = 0; i < R; ++i) {
      double ss = 0.0;
      for (int64_t j = 0; j < D; ++j) ss += xd[i * D + j] * xd[i * D + j];
      const double inv = 1.0 / std::sqrt(ss / D + eps);
      for (int64_t j = 0; j < D; ++j) y[i * D + j] = xd[i * D + j] * inv * wd[j];
    }
    return Weighted(y, rd);
  };
  Vec dx(R * D), dw(D, 0.0f);
  RmsNormBackward(dx.data(), dw.data(), r.data(), x.data(), w.data(), R, D, eps);
  EXPECT_LE(FdRelErr(xd, dx, loss, rng), kFdTol);
  EXPECT_LE(FdRelErr(wd, dw, loss, rng), kFdTol);
}

TEST(TrainFdTest, Rope) {
  std::mt19937 rng(3);
  const int64_t T = 4, H = 2, D = 10;
  const IVec pos = {0, 3, 1, 17};
  Vec x = Random(rng, T * H * D), r = Random(rng, T * H * D);
  DVec xd = ToD(x), rd = ToD(r);
  auto loss = [&] {
    DVec y(xd.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double ang = pos[t] * std::pow(10000.0, -2.0 * i / D);
          const int64_t o = (t * H + h) * D;
          const double a = xd[o + i], b = xd[o + i + D / 2];
          y[o + i] = a * std::cos(ang) - b * std::sin(ang);
          y[o + i + D / 2] = b * std::cos(ang) + a * std::sin(ang);
        }
    return Weighted(y, rd);
  };
  Vec dx = r;
  RopeBackward(dx.data(), T, H, D, pos.data(), 10000.0f);
  EXPECT_LE(FdRelErr(xd, dx, loss, rng), kFdTol);
}

TEST(TrainFdTest, SwiGLU) {
  std::mt19937 rng(4);
  const int64_t n = 37;
  Vec g = Random(rng, n, 3.0f), u = Random(rng, n), r = Random(rng, n);
  DVec gd = ToD(g), ud = ToD(u), rd = ToD(r);
  auto loss = [&] {
    DVec y(static_cast<size_t>(n));
    for (size_t i = 0; i < y.size(); ++i) y[i] = gd[i] / (1.0 + std::exp(-gd[i])) * ud[i];
    return Weighted(y, rd);
  };
  Vec dg(n), du(n);
  SwiGLUBackward(dg.data(), du.data(), r.data(), g.data(), u.data(), n);
  EXPECT_LE(FdRelErr(gd, dg, loss, rng), kFdTol);
  EXPECT_LE(FdRelErr(ud, du, loss, rng), kFdTol);
}

TEST(TrainFdTest, Embedding) {
  std::mt19937 rng(5);
  const int64_t V = 6, D = 5, n = 8;
  const IVec ids = {1, 4, 1, 0, 5, 1, 4, 2};
  Vec table = Random(rng, V * D), r = Random(rng, n * D);
  DVec td = ToD(table), rd = ToD(r);
  auto loss = [&] {
    DVec y(static_cast<size_t>(n * D));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < D; ++j) y[t * D + j] = td[ids[t] * D + j];
    return Weighted(y, rd);
  };
  Vec dt(V * D, 0.0f);
  EmbeddingBackward(dt.data(), r.data(), ids.data(), n, D);
  EXPECT_LE(FdRelErr(td, dt, loss, rng, 100), kFdTol);
}

// Causal GQA attention in double, as train.h defines it.
DVec AttentionD(const DVec& q, const DVec& k, const DVec& v, int64_t B, int64_t T, int64_t H,
                int64_t KV, int64_t D) {
  DVec out(q.size(), 0.0);
  std::vector<double> s(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / (H / KV);
      for (int64_t i = 0; i < T; ++i) {
        const double* qi = &q[((b * T + i) * H + h) * D];
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          const double* kj = &k[((b * T + j) * KV + kvh) * D];
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
          s[j] = dot / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += (s[j] = std::exp(s[j] - mx));
        double* o = &out[((b * T + i) * H + h) * D];
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < D; ++d) o[d] += s[j] / sum * v[((b * T + j) * KV + kvh) * D + d];
      }
    }
  return out;
}

TEST(TrainFdTest, Attention) {
  std::mt19937 rng(6);
  const int64_t B = 2, T = 7, H = 4, KV = 2, D = 6;
  Vec q = Random(rng, B * T * H * D), k = Random(rng, B * T * KV * D),
      v = Random(rng, B * T * KV * D), r = Random(rng, B * T * H * D);
  DVec qd = ToD(q), kd = ToD(k), vd = ToD(v), rd = ToD(r);
  auto loss = [&] { return Weighted(AttentionD(qd, kd, vd, B, T, H, KV, D), rd); };
  Vec out(q.size()), lse(B * H * T), dq(q.size()), dk(k.size()), dv(v.size());
  AttentionTrainForward(out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, KV, D,
                        nullptr);
  AttentionTrainBackward(dq.data(), dk.data(), dv.data(), r.data(), q.data(), k.data(), v.data(),
                         out.data(), lse.data(), B, T, H, KV, D, nullptr);
  const DVec ref = AttentionD(qd, kd, vd, B, T, H, KV, D);
  EXPECT_LE(RelErr(out, Vec(ref.begin(), ref.end())), 1e-5);
  EXPECT_LE(FdRelErr(qd, dq, loss, rng, 60), kFdTol);
  EXPECT_LE(FdRelErr(kd, dk, loss, rng, 60), kFdTol);
  EXPECT_LE(FdRelErr(vd, dv, loss, rng, 60), kFdTol);
}

TEST(TrainFdTest, CrossEntropy) {
  std::mt19937 rng(7);
  const int64_t n = 9, dim = 7, V = 19;
  const float scale = 0.3f;
  const IVec tgt = {3, -1, 18, 0, 3, 7, -1, 11, 5};
  Vec x = Random(rng, n * dim), w = Random(rng, V * dim, 0.5f);
  DVec xd = ToD(x), wd = ToD(w);
  auto loss = [&] {
    double total = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      if (tgt[t] < 0) continue;
      std::vector<double> z(static_cast<size_t>(V), 0.0);
      for (int64_t j = 0; j < V; ++j)
        for (int64_t d = 0; d < dim; ++d) z[j] += xd[t * dim + d] * wd[j * dim + d];
      const double mx = *std::max_element(z.begin(), z.end());
      double sum = 0.0;
      for (double zj : z) sum += std::exp(zj - mx);
      total += mx + std::log(sum) - z[tgt[t]];
    }
    return total;
  };
  Vec dx(n * dim), dw(V * dim, 0.0f);
  const double l = CrossEntropyLmHead(dx.data(), dw.data(), x.data(), w.data(), tgt.data(), n, dim,
                                      V, 4, scale, nullptr);
  EXPECT_NEAR(l, loss(), 1e-5 * std::fabs(l));
  auto scaled = [&] { return scale * loss(); };
  EXPECT_LE(FdRelErr(xd, dx, scaled, rng), kFdTol);
  EXPECT_LE(FdRelErr(wd, dw, scaled, rng), kFdTol);
}

// ---- closed forms -------------------------------------------------------------------------------

TEST(TrainClosedFormTest, AdamWFirstStepMovesBySignOfGradient) {
  // Step 1 from zero moments: m/(1-b1) = g', sqrt(v/(1-b2)) = |g'|, so the step is lr * sign(g)
  // (up to eps) after the decay w *= 1 - lr * wd.
  Vec w = {1.0f, -2.0f, 0.5f, 3.0f}, g = {0.3f, -4.0f, 0.0f, 1e-3f};
  Vec m(4, 0.0f), v(4, 0.0f);
  AdamWParams p;
  p.lr = 0.1f;
  p.weight_decay = 0.5f;
  p.grad_scale = 2.0f;
  AdamWUpdate(w.data(), m.data(), v.data(), g.data(), 4, p);
  const float decay = 1.0f - 0.1f * 0.5f;
  EXPECT_NEAR(w[0], 1.0f * decay - 0.1f, 1e-6);
  EXPECT_NEAR(w[1], -2.0f * decay + 0.1f, 1e-6);
  EXPECT_NEAR(w[2], 0.5f * decay, 1e-6);  // zero gradient: decay only
  EXPECT_NEAR(w[3], 3.0f * decay - 0.1f, 1e-5);
  EXPECT_NEAR(m[1], 0.1f * -8.0f, 1e-6);
  EXPECT_NEAR(v[1], 0.001f * 64.0f, 1e-6);
}

TEST(TrainClosedFormTest, SumSquares) {
  std::mt19937 rng(8);
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{4096}, size_t{10007}}) {
    const Vec x = Random(rng, n);
    double ref = 0.0;
    for (float f : x) ref += static_cast<double>(f) * f;
    EXPECT_NEAR(SumSquares(x.data(), n), ref, 1e-12 * std::max(1.0, ref)) << n;
  }
  const Vec ones(5000, 2.0f);
  EXPECT_EQ(SumSquares(ones.data(), ones.size()), 20000.0);
}

// ---- determinism ----------------------------------------------------------------------------

bool SameBits(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// B * KV = 4 units per kv head for 2 and 3 threads; B * KV = 1: split by query head.
class TrainAttnDeterminismTest : public ::testing::TestWithParam<AttnShape> {};

TEST_P(TrainAttnDeterminismTest, AttentionBackward) {
  std::mt19937 rng(9);
  const auto [name, B, T, H, KV, D] = GetParam();
  Vec q = Random(rng, B * T * H * D), k = Random(rng, B * T * KV * D),
      v = Random(rng, B * T * KV * D), dout = Random(rng, B * T * H * D);
  ThreadPool pool(2);
  auto run = [&](ThreadPool* p) {
    Vec out(q.size()), lse(B * H * T), dq(q.size()), dk(k.size()), dv(v.size());
    AttentionTrainForward(out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, KV, D, p);
    AttentionTrainBackward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(),
                           v.data(), out.data(), lse.data(), B, T, H, KV, D, p);
    return std::vector<Vec>{out, lse, dq, dk, dv};
  };
  ThreadPool pool3(3);  // uneven slices
  const auto a = run(&pool), b = run(&pool), c = run(nullptr), d = run(&pool3);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(SameBits(a[i], b[i])) << "output " << i << " differs between two pool runs";
    EXPECT_LE(RelErr(a[i], c[i]), 1e-6) << "output " << i << ": pool vs no pool";
    EXPECT_LE(RelErr(d[i], c[i]), 1e-6) << "output " << i << ": 3 threads vs no pool";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, TrainAttnDeterminismTest,
                         ::testing::Values(AttnShape{"per_kv_head", 2, 150, 4, 2, 16},
                                           AttnShape{"per_query_head", 1, 150, 4, 1, 16}),
                         [](const auto& p) { return std::string(p.param.name); });

TEST(TrainDeterminismTest, CrossEntropy) {
  std::mt19937 rng(10);
  const int64_t n = 45, dim = 24, V = 301;
  Vec x = Random(rng, n * dim), w = Random(rng, V * dim, 0.2f);
  IVec tgt(n);
  std::uniform_int_distribution<int32_t> pick(-1, V - 1);
  for (auto& t : tgt) t = pick(rng);
  ThreadPool pool(2);
  auto run = [&](ThreadPool* p, double* loss) {
    Vec dx(n * dim), dw(V * dim, 0.0f);
    *loss = CrossEntropyLmHead(dx.data(), dw.data(), x.data(), w.data(), tgt.data(), n, dim, V, 16,
                               0.01f, p);
    return std::vector<Vec>{dx, dw};
  };
  ThreadPool pool3(3);  // uneven slices
  double la, lb, lc, ld;
  const auto a = run(&pool, &la), b = run(&pool, &lb), c = run(nullptr, &lc),
             d = run(&pool3, &ld);
  EXPECT_EQ(la, lb);
  EXPECT_NEAR(la, lc, 1e-6 * std::fabs(la));
  EXPECT_NEAR(ld, lc, 1e-6 * std::fabs(la));
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(SameBits(a[i], b[i])) << "output " << i << " differs between two pool runs";
    EXPECT_LE(RelErr(a[i], c[i]), 1e-6) << "output " << i << ": pool vs no pool";
    EXPECT_LE(RelErr(d[i], c[i]), 1e-6) << "output " << i << ": 3 threads vs no pool";
  }
}

}  // namespace
}  // namespace strata::kernels
