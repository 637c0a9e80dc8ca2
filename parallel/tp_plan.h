// Tensor-parallel plan: which attention heads, FFN columns and LM head rows each rank owns.
//
// Attention is split by KV-head groups (a rank owns kv heads [kv_begin, kv_end) and the query
// heads that share them), so every rank runs whole GQA groups with its own KV cache. The FFN is
// split along the intermediate dimension (rows of gate/up, columns of down) in units of
// `ffn_align` so quantized blocks never straddle ranks. Ratios give uneven splits for unequal
// machines; any rank count up to the number of KV heads works, not only powers of two. The LM
// head is split by vocabulary rows with the same ratios, so rank 0 (which also embeds and
// samples) does not read the whole head every token while the others wait for it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "proto/shard.pb.h"

namespace strata::parallel {

struct PlanShape {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t intermediate = 0;
  // FFN slices start at multiples of this (32 = one q8_0 block along down_proj's input).
  int64_t ffn_align = 32;
  // LM head rows (the vocabulary), split by the same ratios; 0 leaves the head whole on rank 0.
  int64_t vocab = 0;
};

struct RankSlice {
  int64_t kv_head_begin = 0, kv_head_end = 0;  // [begin, end)
  int64_t head_begin = 0, head_end = 0;        // query heads of those kv groups
  int64_t ffn_begin = 0, ffn_end = 0;          // intermediate columns
  int64_t vocab_begin = 0, vocab_end = 0;      // LM head rows (both 0: not split)
  int64_t kv_heads() const { return kv_head_end - kv_head_begin; }
  int64_t heads() const { return head_end - head_begin; }
  int64_t ffn() const { return ffn_end - ffn_begin; }
};

struct TpPlan {
  std::vector<RankSlice> slices;  // one per rank
  std::vector<double> ratios;     // normalized to sum 1
  std::string ToString() const;
};

// ratios: empty = equal split; else one positive weight per rank (e.g. {2, 1, 1}). Units are
// apportioned by largest remainder (ties to the lower rank), then every rank is guaranteed one
// unit, so the plan is deterministic and every rank computes the same one. Errors: ranks > kv
// heads or > FFN units, non-positive ratios, shapes that do not divide (heads % kv_heads).
StatusOr<TpPlan> MakeTpPlan(const PlanShape& shape, int ranks, std::vector<double> ratios);

// The slices as the shard manifest stores them.
std::vector<proto::RankSlice> ToProtoSlices(const TpPlan& plan);

// "2,1,1" -> {2, 1, 1}.
StatusOr<std::vector<double>> ParseRatios(const std::string& text);

}  // namespace strata::parallel
