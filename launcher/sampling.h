// Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling with a
// seeded generator so a run is reproducible.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace strata::launcher {

struct SamplingOptions {
  bool greedy = false;
  float temperature = 0.8f;  // > 0; ignored when greedy
  float top_p = 0.95f;       // (0, 1]; smallest set of tokens whose probability reaches top_p
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& o) : opts_(o), rng_(o.seed) {}
  int32_t Sample(const float* logits, int64_t vocab);

 private:
  SamplingOptions opts_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace strata::launcher
