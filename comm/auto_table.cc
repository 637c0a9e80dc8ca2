#include "comm/auto_table.h"

#include <cmath>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

namespace strata::comm {

const char* AlgorithmName(Algorithm a) {
  switch (a) {
    case Algorithm::kAuto: return "auto";
    case Algorithm::kStar: return "star";
    case Algorithm::kRing: return "ring";
    case Algorithm::kTree: return "tree";
    case Algorithm::kNative: return "native";
  }
  return "?";
}

StatusOr<Algorithm> ParseAlgorithm(std::string_view name) {
  for (Algorithm a : {Algorithm::kAuto, Algorithm::kStar, Algorithm::kRing, Algorithm::kTree,
                      Algorithm::kNative}) {
    if (name == AlgorithmName(a)) return a;
  }
  return Status::InvalidArgument("unknown algorithm '" + std::string(name) +
                                 "' (valid: auto, star, ring, tree, native)");
}

AutoTable AutoTable::BuiltIn() {
  AutoTable t;
  // Medians measured with `strata bench allreduce` (see docs/BENCHMARKS.md, "auto table"):
  // 4 ranks on one 2-core host. Only the winner at each point matters.
#include "comm/auto_table_builtin.inc"
  return t;
}

StatusOr<AutoTable> AutoTable::FromBenchJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("allreduce table: cannot open '" + path + "'");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return Status::InvalidArgument("allreduce table '" + path + "': not JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("results") || !j["results"].is_array()) {
    return Status::InvalidArgument("allreduce table '" + path +
                                   "': expected an object with a 'results' list "
                                   "(the output of `strata bench allreduce --json`)");
  }
  AutoTable t;
  for (const auto& r : j["results"]) {
    try {
      StatusOr<Algorithm> a = ParseAlgorithm(r.at("algorithm").get<std::string>());
      if (!a.ok()) return a.status().WithContext("allreduce table '" + path + "'");
      t.entries_.push_back(AutoEntry{r.at("transport").get<std::string>(), r.at("ranks").get<int>(),
                                     r.at("bytes").get<size_t>(), *a,
                                     r.at("latency_us_median").get<double>()});
    } catch (const nlohmann::json::exception& e) {
      return Status::InvalidArgument("allreduce table '" + path + "': bad entry: " + e.what());
    }
  }
  if (t.entries_.empty()) {
    return Status::InvalidArgument("allreduce table '" + path + "' has no results");
  }
  return t;
}

Algorithm AutoTable::Pick(const std::string& transport, int ranks, size_t bytes,
                          bool native_available) const {
  auto usable = [&](const AutoEntry& e) {
    return e.transport == transport && (native_available || e.algorithm != Algorithm::kNative);
  };
  int best_ranks = -1;
  for (const AutoEntry& e : entries_) {
    if (usable(e) && (best_ranks < 0 || std::abs(e.ranks - ranks) < std::abs(best_ranks - ranks))) {
      best_ranks = e.ranks;
    }
  }
  if (best_ranks < 0) return bytes <= (256u << 10) ? Algorithm::kStar : Algorithm::kRing;
  // Nearest size on a log scale: 48 KiB is closer to 64 KiB than to 4 KiB.
  const double want = std::log2(static_cast<double>(std::max<size_t>(bytes, 1)));
  double best_dist = std::numeric_limits<double>::infinity();
  size_t best_bytes = 0;
  for (const AutoEntry& e : entries_) {
    if (!usable(e) || e.ranks != best_ranks) continue;
    const double d = std::abs(std::log2(static_cast<double>(std::max<size_t>(e.bytes, 1))) - want);
    if (d < best_dist) {
      best_dist = d;
      best_bytes = e.bytes;
    }
  }
  Algorithm best = Algorithm::kStar;
  double best_latency = std::numeric_limits<double>::infinity();
  for (const AutoEntry& e : entries_) {
    if (usable(e) && e.ranks == best_ranks && e.bytes == best_bytes && e.latency_us < best_latency) {
      best_latency = e.latency_us;
      best = e.algorithm;
    }
  }
  return best;
}

}  // namespace strata::comm
