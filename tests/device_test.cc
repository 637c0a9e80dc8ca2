// Training devices (runtime/device.h):
// - the CPU made discrete (separate memory, every weight uploaded, every gradient copied back) runs
//   the executor's device data path and must give the same bits as the shared-memory CPU path;
// - every op of a CUDA device against the CPU on the same inputs, and the executor on CUDA
//   against the executor on the CPU. Those skip, saying why, where no GPU (or no CUDA build) is
//   present, which is every machine CI runs on today.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "kernels/cpu/sgemm.h"
#include "memory/param_store.h"
#include "runtime/device.h"
#include "runtime/trainer.h"
#include "tests/small_llama.h"

namespace strata::runtime {
namespace {

constexpr int64_t kBatch = 2, kSeq = 40;

LlamaConfig SmallConfig(bool tied) { return SmallLlamaConfig(tied, 4); }

std::vector<int32_t> Tokens(uint32_t seed, int64_t batch) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(batch * (kSeq + 1)));
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 500);
  t[static_cast<size_t>(kSeq)] = -1;  // the first sequence's last target is ignored
  return t;
}

// A one-rank parameter store for `c` (null, after a test failure, when it cannot be made).
std::unique_ptr<memory::ParamStore> StoreFor(const LlamaConfig& c) {
  auto layout = LlamaParamLayout(c, 1);
  EXPECT_TRUE(layout.ok()) << layout.status().ToString();
  if (!layout.ok()) return nullptr;
  auto store = memory::ParamStore::Create(std::move(*layout));
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(*store) : nullptr;
}

struct Result {
  std::vector<double> losses;
  std::vector<float> grads;
};

// `calls` ForwardBackward calls (micro-batches accumulating into the gradients) from seed-5
// weights, then one Loss, on `device` (null: the default CPU).
Result Train(bool tied, ExecutorOptions o, Device* device, ThreadPool* pool, int calls) {
  Result r;
  const LlamaConfig c = SmallConfig(tied);
  std::unique_ptr<memory::ParamStore> store = StoreFor(c);
  if (store == nullptr) return r;
  InitLlamaParams(*store, 5, 0.08f);
  std::memset(store->grads(), 0, store->layout().total() * sizeof(float));
  o.batch = kBatch;
  o.seq = kSeq;
  o.pool = pool;
  o.device = device;
  auto x = TrainExecutor::Create(c, store.get(), o);
  EXPECT_TRUE(x.ok()) << x.status().ToString();
  if (!x.ok()) return r;
  for (int i = 0; i < calls; ++i) {
    const std::vector<int32_t> tokens = Tokens(17 + i, kBatch);
    auto loss = (*x)->ForwardBackward(tokens.data(), 1.0f / (kBatch * kSeq));
    EXPECT_TRUE(loss.ok()) << loss.status().ToString();
    r.losses.push_back(loss.ok() ? *loss : NAN);
  }
  const std::vector<int32_t> tokens = Tokens(99, kBatch);
  auto loss = (*x)->Loss(tokens.data());
  EXPECT_TRUE(loss.ok()) << loss.status().ToString();
  r.losses.push_back(loss.ok() ? *loss : NAN);
  r.grads.assign(store->grads(), store->grads() + store->layout().total());
  return r;
}

void ExpectSameBits(const Result& a, const Result& b) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) {
    EXPECT_EQ(std::memcmp(&a.losses[i], &b.losses[i], sizeof(double)), 0)
        << "loss " << i << ": " << a.losses[i] << " vs " << b.losses[i];
  }
  ASSERT_EQ(a.grads.size(), b.grads.size());
  size_t differ = 0;
  for (size_t i = 0; i < a.grads.size(); ++i) differ += a.grads[i] != b.grads[i];
  EXPECT_EQ(differ, 0u) << "of " << a.grads.size() << " gradients";
}

// max |a - b| / max |b| over the vector.
double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, static_cast<double>(std::fabs(a[i] - b[i])));
    den = std::max(den, static_cast<double>(std::fabs(b[i])));
  }
  return den > 0 ? num / den : num;
}

TEST(DeviceTest, MakeDeviceNamesAndRefusals) {
  auto cpu = MakeDevice("cpu", nullptr);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->name(), "cpu");
  EXPECT_TRUE((*cpu)->host_memory());
  EXPECT_FALSE(MakeCpuDevice(nullptr, true)->host_memory());
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"}) {
    auto d = MakeDevice(bad, nullptr);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  // Without a GPU (or a CUDA build) the answer says why; with one it is a device.
  auto cuda = MakeDevice("cuda", nullptr);
  if (cuda.ok()) {
    EXPECT_FALSE((*cuda)->host_memory());
    EXPECT_NE((*cuda)->name().find("cuda:0"), std::string::npos);
  } else {
    EXPECT_TRUE(cuda.status().code() == StatusCode::kUnavailable ||
                cuda.status().code() == StatusCode::kFailedPrecondition)
        << cuda.status().ToString();
    EXPECT_FALSE(cuda.status().message().empty());
  }
}

TEST(DeviceTest, DiscreteCpuIsBitIdenticalToSharedMemory) {
  ThreadPool pool(2);
  std::unique_ptr<Device> discrete = MakeCpuDevice(&pool, /*discrete=*/true);
  for (bool tied : {false, true}) {
    for (int anchor : {1, 2}) {
      SCOPED_TRACE(testing::Message() << "tied " << tied << " anchor_every " << anchor);
      ExecutorOptions o;
      o.anchor_every = anchor;
      o.ce_chunk_tokens = 24;  // several loss chunks, the last one short
      const Result host = Train(tied, o, nullptr, &pool, 1);
      const Result dev = Train(tied, o, discrete.get(), &pool, 1);
      ExpectSameBits(host, dev);
      // The loss and gradients are real: not all zero, and the loss near ln(vocab).
      EXPECT_GT(host.losses[0], 0.5 * std::log(500.0) * kBatch * kSeq);
      EXPECT_GT(*std::max_element(host.grads.begin(), host.grads.end()), 0.0f);
    }
  }
}

TEST(DeviceTest, DiscreteCpuAccumulatesMicroBatchesLikeSharedMemory) {
  // With several micro-batches a discrete device sums each one's gradient apart, then adds it to
  // the store, where the CPU adds into the store inside the product: the same sum rounded in a
  // different order, so equal within f32 rounding rather than bit for bit.
  ThreadPool pool(2);
  std::unique_ptr<Device> discrete = MakeCpuDevice(&pool, true);
  ExecutorOptions o;
  const Result host = Train(false, o, nullptr, &pool, 3);
  const Result dev = Train(false, o, discrete.get(), &pool, 3);
  ASSERT_EQ(host.losses.size(), dev.losses.size());
  for (size_t i = 0; i < host.losses.size(); ++i) EXPECT_EQ(host.losses[i], dev.losses[i]);
  EXPECT_LT(RelErr(dev.grads, host.grads), 1e-6);
}

TEST(DeviceTest, DiscreteCpuBf16IsBitIdenticalToSharedMemory) {
  if (Status st = kernels::cpu::GemmBF16Support(); !st.ok()) GTEST_SKIP() << st.ToString();
  ThreadPool pool(2);
  std::unique_ptr<Device> discrete = MakeCpuDevice(&pool, true);
  ExecutorOptions o;
  o.precision = Precision::kBF16;
  o.anchor_every = 2;
  ExpectSameBits(Train(true, o, nullptr, &pool, 1), Train(true, o, discrete.get(), &pool, 1));
}

TEST(DeviceTest, DiscreteDeviceRefusesZeroCopy) {
  std::unique_ptr<Device> discrete = MakeCpuDevice(nullptr, true);
  const LlamaConfig c = SmallConfig(false);
  std::unique_ptr<memory::ParamStore> store = StoreFor(c);
  ASSERT_NE(store, nullptr);
  ExecutorOptions o;
  o.stage = StageMode::kZeroCopy;
  o.device = discrete.get();
  auto x = TrainExecutor::Create(c, store.get(), o);
  ASSERT_FALSE(x.ok());
  EXPECT_NE(x.status().message().find("zero-copy"), std::string::npos) << x.status().ToString();
}

TEST(DeviceTest, EstimateIsWhatADiscreteDeviceAllocates) {
  ThreadPool pool(2);
  std::unique_ptr<Device> discrete = MakeCpuDevice(&pool, true);
  EXPECT_EQ(discrete->FreeMemory(), 0u);  // host RAM: the host check covers it
  const bool bf16_ok = kernels::cpu::GemmBF16Support().ok();
  for (bool tied : {false, true}) {
    for (Precision p : {Precision::kF32, Precision::kBF16}) {
      if (p == Precision::kBF16 && !bf16_ok) continue;
      for (Device* d : {static_cast<Device*>(nullptr), discrete.get()}) {
        SCOPED_TRACE(testing::Message() << "tied " << tied << " " << PrecisionName(p) << " "
                                        << (d ? d->name() : "cpu"));
        const LlamaConfig c = SmallConfig(tied);
        std::unique_ptr<memory::ParamStore> store = StoreFor(c);
        ASSERT_NE(store, nullptr);
        ExecutorOptions o;
        o.batch = kBatch;
        o.seq = kSeq;
        o.anchor_every = 2;
        o.precision = p;
        o.pool = &pool;
        o.device = d;
        auto x = TrainExecutor::Create(c, store.get(), o);
        ASSERT_TRUE(x.ok()) << x.status().ToString();
        const ExecutorMemory got = (*x)->memory(), est = TrainExecutor::Estimate(c, o);
        EXPECT_EQ(got.anchors, est.anchors);
        EXPECT_EQ(got.workspace, est.workspace);
        EXPECT_EQ(got.staging, est.staging);
        EXPECT_EQ(got.loss_scratch, est.loss_scratch);
        EXPECT_EQ(got.host_staging, est.host_staging);
        EXPECT_EQ(got.host_staging > 0, d != nullptr);
      }
    }
  }
}

// ---- CUDA -------------------------------------------------------------------------------------

std::unique_ptr<Device> CudaOrNull(std::string* why) {
  auto d = MakeCudaDevice(0);
  if (!d.ok()) {
    *why = d.status().ToString();
    return nullptr;
  }
  return std::move(*d);
}

#define SKIP_WITHOUT_CUDA(dev)                                   \
  std::string why_;                                              \
  std::unique_ptr<Device> dev = CudaOrNull(&why_);               \
  if (dev == nullptr) GTEST_SKIP() << "no CUDA device: " << why_

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Device memory holding a copy of a host vector, and back.
template <class T>
DeviceBuffer Up(Device* d, const std::vector<T>& v) {
  auto b = DeviceBuffer::Make(d, v.size() * sizeof(T));
  EXPECT_TRUE(b.ok());
  d->CopyIn(b->data(), v.data(), v.size() * sizeof(T));
  return std::move(*b);
}

std::vector<float> Down(Device* d, const DeviceBuffer& b) {
  std::vector<float> v(b.size() / sizeof(float));
  d->CopyOut(v.data(), b.data(), b.size());
  return v;
}

TEST(DeviceTest, CudaOpsMatchTheCpu) {
  SKIP_WITHOUT_CUDA(gpu);
  std::unique_ptr<Device> cpu = MakeCpuDevice(nullptr);
  const int64_t B = 2, T = 33, H = 4, KV = 2, D = 16, d = 64, I = 96;
  const int64_t n = B * T;
  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
  DeviceBuffer gpos = Up(gpu.get(), pos);
  auto check = [&](const char* what, const std::vector<float>& got,
                   const std::vector<float>& want, double tol) {
    EXPECT_LT(RelErr(got, want), tol) << what;
  };

  // Products, f32 and bf16.
  const auto x = Random(static_cast<size_t>(n * d), 1), W = Random(static_cast<size_t>(I * d), 2);
  const auto dy = Random(static_cast<size_t>(n * I), 3);
  std::vector<float> y(static_cast<size_t>(n * I)), dx(static_cast<size_t>(n * d), 0.5f);
  std::vector<float> dW(static_cast<size_t>(I * d), 0.25f);
  DeviceBuffer gx = Up(gpu.get(), x), gW = Up(gpu.get(), W), gdy = Up(gpu.get(), dy);
  DeviceBuffer gy = Up(gpu.get(), y), gdx = Up(gpu.get(), dx), gdW = Up(gpu.get(), dW);
  cpu->MatmulForward(y.data(), x.data(), W.data(), n, I, d);
  gpu->MatmulForward(gy.as<float>(), gx.as<float>(), gW.as<float>(), n, I, d);
  check("matmul", Down(gpu.get(), gy), y, 1e-5);
  cpu->MatmulBackward(dx.data(), dW.data(), dy.data(), x.data(), W.data(), n, I, d, true);
  gpu->MatmulBackward(gdx.as<float>(), gdW.as<float>(), gdy.as<float>(), gx.as<float>(),
                      gW.as<float>(), n, I, d, true);
  check("matmul dx", Down(gpu.get(), gdx), dx, 1e-5);
  check("matmul dW", Down(gpu.get(), gdW), dW, 1e-5);
  if (gpu->Bf16Support().ok() && cpu->Bf16Support().ok()) {
    std::vector<uint16_t> x16(x.size()), W16(W.size());
    cpu->ConvertToBF16(x16.data(), x.data(), x.size());
    cpu->ConvertToBF16(W16.data(), W.data(), W.size());
    auto gx16 = DeviceBuffer::Make(gpu.get(), x16.size() * 2);
    auto gW16 = DeviceBuffer::Make(gpu.get(), W16.size() * 2);
    ASSERT_TRUE(gx16.ok() && gW16.ok());
    gpu->ConvertToBF16(gx16->as<uint16_t>(), gx.as<float>(), x.size());
    gpu->ConvertToBF16(gW16->as<uint16_t>(), gW.as<float>(), W.size());
    std::vector<uint16_t> back(x16.size());
    gpu->CopyOut(back.data(), gx16->data(), back.size() * 2);
    EXPECT_EQ(back, x16) << "bf16 rounding";
    cpu->MatmulForwardBF16(y.data(), x16.data(), W16.data(), n, I, d);
    gpu->MatmulForwardBF16(gy.as<float>(), gx16->as<uint16_t>(), gW16->as<uint16_t>(), n, I, d);
    check("matmul bf16", Down(gpu.get(), gy), y, 1e-4);
  }

  // RMSNorm and its backward (accumulating).
  const auto w = Random(static_cast<size_t>(d), 4);
  DeviceBuffer gwn = Up(gpu.get(), w);
  std::vector<float> out(x.size());
  DeviceBuffer gout = Up(gpu.get(), out);
  cpu->RmsNorm(out.data(), x.data(), w.data(), n, d, 1e-5f);
  gpu->RmsNorm(gout.as<float>(), gx.as<float>(), gwn.as<float>(), n, d, 1e-5f);
  check("rmsnorm", Down(gpu.get(), gout), out, 1e-5);
  const auto g = Random(x.size(), 5);
  DeviceBuffer gg = Up(gpu.get(), g);
  std::vector<float> rdx(x.size(), 0.1f), rdw(static_cast<size_t>(d), 0.2f);
  DeviceBuffer grdx = Up(gpu.get(), rdx), grdw = Up(gpu.get(), rdw);
  cpu->RmsNormBackward(rdx.data(), rdw.data(), g.data(), x.data(), w.data(), n, d, 1e-5f, true);
  gpu->RmsNormBackward(grdx.as<float>(), grdw.as<float>(), gg.as<float>(), gx.as<float>(),
                       gwn.as<float>(), n, d, 1e-5f, true);
  check("rmsnorm dx", Down(gpu.get(), grdx), rdx, 1e-5);
  check("rmsnorm dw", Down(gpu.get(), grdw), rdw, 1e-5);

  // RoPE there and back, SwiGLU and its backward, Add.
  auto qv = Random(static_cast<size_t>(n * H * D), 6);
  DeviceBuffer gq = Up(gpu.get(), qv);
  for (bool back : {false, true}) {
    cpu->Rope(qv.data(), n, H, D, pos.data(), 10000.0f, back);
    gpu->Rope(gq.as<float>(), n, H, D, gpos.as<int32_t>(), 10000.0f, back);
    check(back ? "rope backward" : "rope", Down(gpu.get(), gq), qv, 1e-5);
  }
  const auto gate = Random(dy.size(), 7), up = Random(dy.size(), 8);
  DeviceBuffer ggate = Up(gpu.get(), gate), gup = Up(gpu.get(), up);
  std::vector<float> s(dy.size());
  DeviceBuffer gs = Up(gpu.get(), s);
  cpu->SwiGLU(s.data(), gate.data(), up.data(), n, I);
  gpu->SwiGLU(gs.as<float>(), ggate.as<float>(), gup.as<float>(), n, I);
  check("swiglu", Down(gpu.get(), gs), s, 1e-5);
  std::vector<float> dg(dy.size()), du(dy.size());
  DeviceBuffer gdg = Up(gpu.get(), dg), gdu = Up(gpu.get(), du);
  cpu->SwiGLUBackward(dg.data(), du.data(), dy.data(), gate.data(), up.data(), n, I);
  gpu->SwiGLUBackward(gdg.as<float>(), gdu.as<float>(), gdy.as<float>(), ggate.as<float>(),
                      gup.as<float>(), n, I);
  check("swiglu dgate", Down(gpu.get(), gdg), dg, 1e-5);
  check("swiglu dup", Down(gpu.get(), gdu), du, 1e-5);
  cpu->Add(s.data(), dg.data(), n, I);
  gpu->Add(gs.as<float>(), gdg.as<float>(), n, I);
  check("add", Down(gpu.get(), gs), s, 1e-5);

  // Causal GQA attention and its backward.
  const auto q = Random(static_cast<size_t>(n * H * D), 9);
  const auto k = Random(static_cast<size_t>(n * KV * D), 10);
  const auto v = Random(static_cast<size_t>(n * KV * D), 11);
  const auto dout = Random(q.size(), 12);
  DeviceBuffer aq = Up(gpu.get(), q), ak = Up(gpu.get(), k), av = Up(gpu.get(), v);
  DeviceBuffer adout = Up(gpu.get(), dout);
  std::vector<float> o(q.size()), lse(static_cast<size_t>(B * H * T));
  DeviceBuffer ao = Up(gpu.get(), o), alse = Up(gpu.get(), lse);
  cpu->AttentionForward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, KV, D);
  gpu->AttentionForward(ao.as<float>(), alse.as<float>(), aq.as<float>(), ak.as<float>(),
                        av.as<float>(), B, T, H, KV, D);
  check("attention", Down(gpu.get(), ao), o, 1e-5);
  check("attention lse", Down(gpu.get(), alse), lse, 1e-5);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
  DeviceBuffer adq = Up(gpu.get(), dq), adk = Up(gpu.get(), dk), adv = Up(gpu.get(), dv);
  cpu->AttentionBackward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(),
                         v.data(), o.data(), lse.data(), B, T, H, KV, D);
  gpu->AttentionBackward(adq.as<float>(), adk.as<float>(), adv.as<float>(), adout.as<float>(),
                         aq.as<float>(), ak.as<float>(), av.as<float>(), ao.as<float>(),
                         alse.as<float>(), B, T, H, KV, D);
  check("attention dq", Down(gpu.get(), adq), dq, 1e-4);
  check("attention dk", Down(gpu.get(), adk), dk, 1e-4);
  check("attention dv", Down(gpu.get(), adv), dv, 1e-4);

  // Chunked cross-entropy over an LM head, one target ignored.
  const int64_t V = 300;
  const auto head = Random(static_cast<size_t>(V * d), 13, 0.3f);
  std::vector<int32_t> targets(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) targets[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37) % V);
  targets[3] = -1;
  DeviceBuffer ghead = Up(gpu.get(), head), gt = Up(gpu.get(), targets);
  std::vector<float> cdx(x.size()), cdW(head.size(), 0.0f);
  DeviceBuffer gcdx = Up(gpu.get(), cdx), gcdW = Up(gpu.get(), cdW);
  const double lc = cpu->CrossEntropyLmHead(cdx.data(), cdW.data(), x.data(), head.data(),
                                            targets.data(), n, d, V, 16, 0.01f);
  const double lg = gpu->CrossEntropyLmHead(gcdx.as<float>(), gcdW.as<float>(), gx.as<float>(),
                                            ghead.as<float>(), gt.as<int32_t>(), n, d, V, 16,
                                            0.01f);
  EXPECT_NEAR(lg, lc, 1e-5 * std::fabs(lc));
  check("cross-entropy dx", Down(gpu.get(), gcdx), cdx, 1e-5);
  check("cross-entropy dW", Down(gpu.get(), gcdW), cdW, 1e-5);
  EXPECT_TRUE(gpu->Check().ok()) << gpu->Check().ToString();
}

TEST(DeviceTest, CudaExecutorMatchesTheCpu) {
  SKIP_WITHOUT_CUDA(gpu);
  ThreadPool pool(2);
  for (bool tied : {false, true}) {
    SCOPED_TRACE(testing::Message() << "tied " << tied);
    ExecutorOptions o;
    o.anchor_every = 2;
    const Result host = Train(tied, o, nullptr, &pool, 2);
    const Result dev = Train(tied, o, gpu.get(), &pool, 2);
    ASSERT_EQ(host.losses.size(), dev.losses.size());
    for (size_t i = 0; i < host.losses.size(); ++i) {
      EXPECT_NEAR(dev.losses[i], host.losses[i], 1e-5 * std::fabs(host.losses[i]));
    }
    EXPECT_LT(RelErr(dev.grads, host.grads), 1e-4);
    // The GPU is deterministic too: a second run gives the same bits.
    ExpectSameBits(dev, Train(tied, o, gpu.get(), &pool, 2));
  }
  if (gpu->Bf16Support().ok() && kernels::cpu::GemmBF16Support().ok()) {
    ExecutorOptions o;
    o.precision = Precision::kBF16;
    const Result host = Train(true, o, nullptr, &pool, 1);
    const Result dev = Train(true, o, gpu.get(), &pool, 1);
    EXPECT_NEAR(dev.losses[0], host.losses[0], 2e-3 * std::fabs(host.losses[0]));
    EXPECT_LT(RelErr(dev.grads, host.grads), 3e-2);
  }
}

}  // namespace
}  // namespace strata::runtime
