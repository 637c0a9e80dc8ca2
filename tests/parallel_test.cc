// Tensor-parallel plans: every head and FFN column owned exactly once, ratios respected, clear
// errors for plans that cannot work.
#include <gtest/gtest.h>

#include "parallel/tp_plan.h"

namespace strata::parallel {
namespace {

const PlanShape kTinyLlama{32, 4, 5632, 32, 32000};

void ExpectCovers(const TpPlan& p, const PlanShape& s) {
  int64_t kv = 0, heads = 0, ffn = 0, vocab = 0;
  for (const RankSlice& r : p.slices) {
    EXPECT_EQ(r.vocab_begin, vocab);
    if (s.vocab > 0) {
      EXPECT_GT(r.vocab_end, r.vocab_begin);
    }
    vocab = r.vocab_end;
    EXPECT_EQ(r.kv_head_begin, kv);
    EXPECT_EQ(r.head_begin, heads);
    EXPECT_EQ(r.ffn_begin, ffn);
    EXPECT_GT(r.kv_heads(), 0);
    EXPECT_GT(r.ffn(), 0);
    EXPECT_EQ(r.heads(), r.kv_heads() * (s.n_heads / s.n_kv_heads));
    EXPECT_EQ(r.ffn_begin % s.ffn_align, 0);
    kv = r.kv_head_end;
    heads = r.head_end;
    ffn = r.ffn_end;
  }
  EXPECT_EQ(kv, s.n_kv_heads);
  EXPECT_EQ(heads, s.n_heads);
  EXPECT_EQ(ffn, s.intermediate);
  EXPECT_EQ(vocab, s.vocab);  // 0: the head is not split and every range is empty
}

TEST(TpPlan, EqualSplitsForAnyRankCountUpToKvHeads) {
  for (int n = 1; n <= 4; ++n) {
    StatusOr<TpPlan> p = MakeTpPlan(kTinyLlama, n, {});
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    ASSERT_EQ(p->slices.size(), static_cast<size_t>(n));
    ExpectCovers(*p, kTinyLlama);
  }
  // 3 ranks: 176 FFN units of 32 -> 59, 59, 58; 4 kv heads -> 2, 1, 1.
  const TpPlan p3 = *MakeTpPlan(kTinyLlama, 3, {});
  EXPECT_EQ(p3.slices[0].ffn(), 59 * 32);
  EXPECT_EQ(p3.slices[1].ffn(), 59 * 32);
  EXPECT_EQ(p3.slices[2].ffn(), 58 * 32);
  EXPECT_EQ(p3.slices[0].kv_heads(), 2);
  EXPECT_EQ(p3.slices[1].kv_heads(), 1);
  // 32000 LM head rows -> 10667, 10667, 10666.
  EXPECT_EQ(p3.slices[0].vocab_end, 10667);
  EXPECT_EQ(p3.slices[2].vocab_end - p3.slices[2].vocab_begin, 10666);
}

TEST(TpPlan, UnevenRatiosForUnequalMachines) {
  const TpPlan p = *MakeTpPlan(kTinyLlama, 3, {2, 1, 1});
  ExpectCovers(p, kTinyLlama);
  EXPECT_EQ(p.slices[0].kv_heads(), 2);
  EXPECT_EQ(p.slices[0].ffn(), 88 * 32);
  EXPECT_EQ(p.slices[1].ffn(), 44 * 32);
  EXPECT_EQ(p.slices[0].vocab_end, 16000);  // the head follows the ratios too
  EXPECT_NEAR(p.ratios[0], 0.5, 1e-12);
}

TEST(TpPlan, LastSliceEndsAtAnUnalignedIntermediateSize) {
  const PlanShape s{8, 2, 100, 32};  // 4 units, the last one 4 columns wide
  const TpPlan p = *MakeTpPlan(s, 2, {});
  ExpectCovers(p, s);
  EXPECT_EQ(p.slices[1].ffn_end, 100);
}

TEST(TpPlan, ClearErrors) {
  auto too_many = MakeTpPlan(kTinyLlama, 5, {});
  ASSERT_FALSE(too_many.ok());
  EXPECT_NE(too_many.status().message().find("at most 4"), std::string::npos);
  // A tiny ratio still gets one kv head group and one FFN unit...
  const TpPlan skewed = *MakeTpPlan({8, 2, 64, 32}, 2, {100, 1});
  EXPECT_EQ(skewed.slices[1].kv_heads(), 1);
  EXPECT_EQ(skewed.slices[1].ffn(), 32);
  // ...but there must be a unit for every rank.
  auto starved = MakeTpPlan({8, 2, 32, 32}, 2, {});
  ASSERT_FALSE(starved.ok());
  EXPECT_NE(starved.status().message().find("rank 1 gets no FFN"), std::string::npos);
  EXPECT_FALSE(MakeTpPlan(kTinyLlama, 2, {1, 2, 3}).ok());
  EXPECT_FALSE(MakeTpPlan(kTinyLlama, 2, {1, -1}).ok());
  EXPECT_FALSE(MakeTpPlan({6, 4, 64, 32}, 2, {}).ok());  // 6 heads over 4 kv heads
}

TEST(TpPlan, ParseRatios) {
  EXPECT_EQ(*ParseRatios("2,1,1"), (std::vector<double>{2, 1, 1}));
  EXPECT_EQ(*ParseRatios("0.5,1.5"), (std::vector<double>{0.5, 1.5}));
  EXPECT_FALSE(ParseRatios("2,,1").ok());
  EXPECT_FALSE(ParseRatios("2,x").ok());
  EXPECT_FALSE(ParseRatios("0,1").ok());
}

}  // namespace
}  // namespace strata::parallel
