// The training executor in bf16 (ExecutorOptions::precision = kBF16) against the f32 executor on
// the same small model and tokens, and against itself: determinism, recomputation, staging and
// the memory accounting. Skips, saying why, where oneDNN cannot run bf16 (no AVX-512).
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
#include "runtime/trainer.h"
#include "tests/small_llama.h"

namespace strata::runtime {
namespace {

#define SKIP_WITHOUT_BF16()                                                                \
  do {                                                                                     \
    if (Status st = kernels::cpu::GemmBF16Support(); !st.ok()) GTEST_SKIP() << st.ToString(); \
  } while (0)

constexpr int64_t kBatch = 2, kSeq = 40;

LlamaConfig SmallConfig(bool tied) { return SmallLlamaConfig(tied, 3); }

std::vector<int32_t> Tokens() {
  std::mt19937 rng(17);
  std::vector<int32_t> t(static_cast<size_t>(kBatch * (kSeq + 1)));
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 500);
  return t;
}

struct Result {
  double loss = 0;
  std::vector<float> grads;
  std::unique_ptr<memory::ParamStore> store;
};

// One ForwardBackward from freshly initialized weights (seed 5, stddev 0.08 so the logits are
// far from uniform and the products matter to the loss).
Result OneStep(bool tied, ExecutorOptions o, ThreadPool* pool) {
  Result r;
  const LlamaConfig c = SmallConfig(tied);
  auto layout = LlamaParamLayout(c, 1);
  EXPECT_TRUE(layout.ok());
  auto store = memory::ParamStore::Create(std::move(*layout));
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  r.store = std::move(*store);
  InitLlamaParams(*r.store, 5, 0.08f);
  o.batch = kBatch;
  o.seq = kSeq;
  o.pool = pool;
  auto x = TrainExecutor::Create(c, r.store.get(), o);
  EXPECT_TRUE(x.ok()) << x.status().ToString();
  if (!x.ok()) return r;
  const std::vector<int32_t> tokens = Tokens();
  auto loss = (*x)->ForwardBackward(tokens.data(), 1.0f / (kBatch * kSeq));
  EXPECT_TRUE(loss.ok()) << loss.status().ToString();
  r.loss = *loss;
  r.grads.assign(r.store->grads(), r.store->grads() + r.store->layout().total());
  return r;
}

ExecutorOptions Bf16() {
  ExecutorOptions o;
  o.precision = Precision::kBF16;
  return o;
}

// bf16 against f32: every matrix operand (weights, the activations entering a product, the
// gradients entering a backward product) is rounded to bf16, a relative error of at most 2^-9
// each; products accumulate in f32, so a product's result carries about 2 * 2^-9 relative error
// in the worst case and far less on average (the roundings are independent across the summed
// terms). Through 3 layers forward and backward, a gradient passes about 10 such products, so
// its largest entries can be off by 10 * 2 * 2^-9 ~ 4% of the tensor's largest magnitude at
// worst: 5% is the bound we hold every tensor to (measured here: under 2%). The loss is a sum
// of log-probabilities whose logits come through the same products; 2^-9 relative bounds it.
TEST(TrainBf16Test, OneStepMatchesF32WithinBf16Rounding) {
  SKIP_WITHOUT_BF16();
  ThreadPool pool(2);
  for (bool tied : {false, true}) {
    Result f32 = OneStep(tied, ExecutorOptions(), &pool);
    Result b16 = OneStep(tied, Bf16(), &pool);
    EXPECT_NEAR(b16.loss, f32.loss, std::abs(f32.loss) / 512) << "tied " << tied;
    EXPECT_NE(b16.loss, f32.loss) << "bf16 should not be bit-identical to f32";
    double worst = 0;
    for (const memory::ParamEntry& e : f32.store->layout().entries()) {
      double diff = 0, ref = 0;
      for (size_t i = e.offset; i < e.offset + e.numel; ++i) {
        diff = std::max(diff, std::abs(static_cast<double>(b16.grads[i]) - f32.grads[i]));
        ref = std::max(ref, std::abs(static_cast<double>(f32.grads[i])));
      }
      ASSERT_GT(ref, 0) << e.name;
      EXPECT_LE(diff / ref, 0.05) << e.name << " tied " << tied;
      worst = std::max(worst, diff / ref);
    }
    std::printf("tied %d: loss f32 %.9f bf16 %.9f; worst per-tensor gradient error %.4f\n",
                tied, f32.loss, b16.loss, worst);
  }
}

// Identical bits run to run, on 1 or 2 threads, and whatever the anchors and staging mode: the
// recompute rebuilds the same bf16 operands and the slots hold the same working copies.
TEST(TrainBf16Test, DeterministicAndRecomputeInvariant) {
  SKIP_WITHOUT_BF16();
  ThreadPool pool(2);
  Result a = OneStep(false, Bf16(), &pool);
  Result b = OneStep(false, Bf16(), &pool);
  EXPECT_EQ(0, std::memcmp(&a.loss, &b.loss, sizeof(double)));
  EXPECT_TRUE(a.grads == b.grads);
  ExecutorOptions o = Bf16();
  o.anchor_every = 2;
  o.stage = StageMode::kCopy;
  Result c = OneStep(false, o, &pool);
  EXPECT_EQ(0, std::memcmp(&a.loss, &c.loss, sizeof(double)));
  EXPECT_TRUE(a.grads == c.grads);
  // The output slices of every product are fixed by the pool size, so one thread may differ
  // from two, but one thread is deterministic too.
  ThreadPool one(1);
  Result d = OneStep(false, Bf16(), &one), e = OneStep(false, Bf16(), &one);
  EXPECT_EQ(0, std::memcmp(&d.loss, &e.loss, sizeof(double)));
  EXPECT_TRUE(d.grads == e.grads);
}

TEST(TrainBf16Test, StagingAndMemoryAccounting) {
  SKIP_WITHOUT_BF16();
  const LlamaConfig c = SmallConfig(false);
  auto layout = LlamaParamLayout(c, 1);
  ASSERT_TRUE(layout.ok());
  auto store = memory::ParamStore::Create(std::move(*layout));
  ASSERT_TRUE(store.ok());
  for (StageMode stage : {StageMode::kAuto, StageMode::kCopy}) {
    ExecutorOptions o = Bf16();
    o.batch = kBatch;
    o.seq = kSeq;
    o.stage = stage;
    auto x = TrainExecutor::Create(c, store->get(), o);
    ASSERT_TRUE(x.ok()) << x.status().ToString();
    // bf16 working copies are always real copies.
    EXPECT_FALSE((*x)->zero_copy());
    const ExecutorMemory m = (*x)->memory(), est = TrainExecutor::Estimate(c, o);
    EXPECT_EQ(m.anchors, est.anchors);
    EXPECT_EQ(m.workspace, est.workspace);
    EXPECT_EQ(m.staging, est.staging);
    EXPECT_EQ(m.loss_scratch, est.loss_scratch);
    // Two slots of bf16 matrices (about half an f32 layer each) plus the head's bf16 copy.
    ExecutorOptions f = o;
    f.precision = Precision::kF32;
    f.stage = StageMode::kCopy;
    const ExecutorMemory f32 = TrainExecutor::Estimate(c, f);
    EXPECT_LT(m.staging - c.vocab_size * c.hidden_size * 2, f32.staging * 6 / 10);
    EXPECT_GT(m.workspace, f32.workspace);
  }
  ExecutorOptions o = Bf16();
  o.stage = StageMode::kZeroCopy;
  auto x = TrainExecutor::Create(c, store->get(), o);
  ASSERT_FALSE(x.ok());
  EXPECT_EQ(x.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(x.status().message().find("zero-copy"), std::string::npos);
  EXPECT_FALSE(ParsePrecision("fp8").ok());
  EXPECT_EQ(*ParsePrecision("bf16"), Precision::kBF16);
  EXPECT_STREQ(PrecisionName(Precision::kF32), "f32");
}

}  // namespace
}  // namespace strata::runtime
