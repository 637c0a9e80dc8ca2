#include "launcher/sampling.h"

#include <algorithm>
#include <cmath>

namespace strata::launcher {

int32_t Sampler::Sample(const float* logits, int64_t vocab) {
  const int32_t best = static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  if (opts_.greedy || opts_.temperature <= 0) return best;
  // Softmax at the temperature, relative to the best logit for stability.
  scratch_.resize(static_cast<size_t>(vocab));
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float p = std::exp((logits[i] - logits[best]) / opts_.temperature);
    scratch_[static_cast<size_t>(i)] = {p, static_cast<int32_t>(i)};
    total += p;
  }
  std::sort(scratch_.begin(), scratch_.end(),
            [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  // The nucleus: the fewest most likely tokens whose mass reaches top_p.
  double mass = 0;
  size_t keep = 0;
  while (keep < scratch_.size()) {
    mass += scratch_[keep].first / total;
    ++keep;
    if (mass >= opts_.top_p) break;
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += scratch_[i].first;
  std::uniform_real_distribution<double> u(0.0, kept);
  double r = u(rng_);
  for (size_t i = 0; i < keep; ++i) {
    r -= scratch_[i].first;
    if (r <= 0) return scratch_[i].second;
  }
  return scratch_[keep - 1].second;
}

}  // namespace strata::launcher
