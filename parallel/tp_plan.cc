#include "parallel/tp_plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include <fmt/format.h>

namespace strata::parallel {
namespace {

// Largest-remainder apportionment of `units` by `ratios` (normalized), at least one unit each.
StatusOr<std::vector<int64_t>> Apportion(int64_t units, const std::vector<double>& ratios,
                                         const char* what) {
  const size_t n = ratios.size();
  std::vector<int64_t> out(n);
  std::vector<std::pair<double, size_t>> remainders(n);
  int64_t given = 0;
  for (size_t i = 0; i < n; ++i) {
    const double quota = static_cast<double>(units) * ratios[i];
    out[i] = static_cast<int64_t>(std::floor(quota));
    remainders[i] = {quota - static_cast<double>(out[i]), i};
    given += out[i];
  }
  // Larger remainder first; equal remainders go to the lower rank.
  std::stable_sort(remainders.begin(), remainders.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t k = 0; given < units; ++k, ++given) ++out[remainders[k % n].second];
  // Every rank needs at least one unit: take it from the rank whose share exceeds its quota the
  // most (and that keeps at least one itself).
  for (size_t i = 0; i < n; ++i) {
    if (out[i] != 0) continue;
    size_t donor = n;
    double surplus = -1e300;
    for (size_t j = 0; j < n; ++j) {
      const double s = static_cast<double>(out[j]) - static_cast<double>(units) * ratios[j];
      if (out[j] > 1 && s > surplus) {
        surplus = s;
        donor = j;
      }
    }
    if (donor == n) break;
    --out[donor];
    ++out[i];
  }
  for (size_t i = 0; i < n; ++i) {
    if (out[i] == 0) {
      return Status::InvalidArgument(fmt::format(
          "rank {} gets no {} with ratio {:.3f} ({} units for {} ranks): raise its ratio or use "
          "fewer ranks", i, what, ratios[i], units, n));
    }
  }
  return out;
}

}  // namespace

StatusOr<std::vector<double>> ParseRatios(const std::string& text) {
  std::vector<double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (item.empty() || end == item.c_str() || *end != '\0' || !(v > 0) || !std::isfinite(v)) {
      return Status::InvalidArgument("--ratios: '" + item + "' is not a positive number (expected "
                                     "a comma list like 2,1,1)");
    }
    out.push_back(v);
  }
  return out;
}

StatusOr<TpPlan> MakeTpPlan(const PlanShape& shape, int ranks, std::vector<double> ratios) {
  if (ranks < 1) return Status::InvalidArgument("tensor parallelism needs at least 1 rank");
  if (shape.n_heads <= 0 || shape.n_kv_heads <= 0 || shape.intermediate <= 0 ||
      shape.ffn_align <= 0) {
    return Status::InvalidArgument("tp plan: heads, kv heads, intermediate size and alignment "
                                   "must be positive");
  }
  if (shape.n_heads % shape.n_kv_heads != 0) {
    return Status::InvalidArgument(fmt::format("tp plan: {} attention heads are not a multiple of "
                                               "{} kv heads", shape.n_heads, shape.n_kv_heads));
  }
  if (ranks > shape.n_kv_heads) {
    return Status::InvalidArgument(fmt::format(
        "{} ranks but the model has only {} kv heads: attention is split by kv-head groups, so "
        "use at most {} ranks", ranks, shape.n_kv_heads, shape.n_kv_heads));
  }
  if (ratios.empty()) ratios.assign(static_cast<size_t>(ranks), 1.0);
  if (ratios.size() != static_cast<size_t>(ranks)) {
    return Status::InvalidArgument(fmt::format("{} ratios given for {} ranks", ratios.size(),
                                               ranks));
  }
  double sum = 0;
  for (double r : ratios) {
    if (!(r > 0) || !std::isfinite(r)) return Status::InvalidArgument("ratios must be positive");
    sum += r;
  }
  for (double& r : ratios) r /= sum;

  const int64_t group = shape.n_heads / shape.n_kv_heads;
  const int64_t ffn_units = (shape.intermediate + shape.ffn_align - 1) / shape.ffn_align;
  STRATA_ASSIGN_OR_RETURN(std::vector<int64_t> kv, Apportion(shape.n_kv_heads, ratios, "kv head"));
  STRATA_ASSIGN_OR_RETURN(std::vector<int64_t> ffn, Apportion(ffn_units, ratios, "FFN columns"));
  std::vector<int64_t> vocab(static_cast<size_t>(ranks), 0);
  if (shape.vocab > 0) {
    STRATA_ASSIGN_OR_RETURN(vocab, Apportion(shape.vocab, ratios, "vocabulary rows"));
  }

  TpPlan plan;
  plan.ratios = ratios;
  int64_t kv_at = 0, ffn_at = 0, vocab_at = 0;
  for (int r = 0; r < ranks; ++r) {
    RankSlice s;
    s.kv_head_begin = kv_at;
    s.kv_head_end = kv_at + kv[r];
    s.head_begin = s.kv_head_begin * group;
    s.head_end = s.kv_head_end * group;
    s.ffn_begin = std::min(ffn_at * shape.ffn_align, shape.intermediate);
    s.ffn_end = std::min((ffn_at + ffn[r]) * shape.ffn_align, shape.intermediate);
    s.vocab_begin = vocab_at;
    s.vocab_end = vocab_at + vocab[r];
    kv_at += kv[r];
    ffn_at += ffn[r];
    vocab_at += vocab[r];
    plan.slices.push_back(s);
  }
  return plan;
}

std::vector<proto::RankSlice> ToProtoSlices(const TpPlan& plan) {
  std::vector<proto::RankSlice> out;
  for (const RankSlice& s : plan.slices) {
    proto::RankSlice p;
    p.set_kv_head_begin(s.kv_head_begin);
    p.set_kv_head_end(s.kv_head_end);
    p.set_head_begin(s.head_begin);
    p.set_head_end(s.head_end);
    p.set_ffn_begin(s.ffn_begin);
    p.set_ffn_end(s.ffn_end);
    p.set_vocab_begin(s.vocab_begin);
    p.set_vocab_end(s.vocab_end);
    out.push_back(p);
  }
  return out;
}

std::string TpPlan::ToString() const {
  std::string out;
  for (size_t r = 0; r < slices.size(); ++r) {
    const RankSlice& s = slices[r];
    out += fmt::format("rank {}: ratio {:.3f}, kv heads [{}, {}), heads [{}, {}), ffn [{}, {})",
                       r, ratios[r], s.kv_head_begin, s.kv_head_end, s.head_begin, s.head_end,
                       s.ffn_begin, s.ffn_end);
    if (s.vocab_end > s.vocab_begin) {
      out += fmt::format(", lm head rows [{}, {})", s.vocab_begin, s.vocab_end);
    }
    out += "\n";
  }
  return out;
}

}  // namespace strata::parallel
