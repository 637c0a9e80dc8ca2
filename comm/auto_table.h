// What algorithm=auto picks: the fastest algorithm measured for the nearest (transport, ranks,
// bytes) point. The built-in table comes from docs/BENCHMARKS.md; a fresh measurement on the
// user's own cluster (`strata bench allreduce --json > t.json`, then STRATA_ALLREDUCE_TABLE=t.json)
// replaces it.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "comm/algorithm.h"

namespace strata::comm {

struct AutoEntry {
  std::string transport;  // "mpi" or "tcp"
  int ranks;
  size_t bytes;
  Algorithm algorithm;
  double latency_us;
};

class AutoTable {
 public:
  static AutoTable BuiltIn();
  // Reads the JSON written by `strata bench allreduce --json` (its "results" list).
  static StatusOr<AutoTable> FromBenchJson(const std::string& path);

  // The fastest measured algorithm nearest to (ranks, bytes) for this transport; native only if
  // `native_available`. Falls back to star below 256 KiB and ring above when nothing matches.
  Algorithm Pick(const std::string& transport, int ranks, size_t bytes,
                 bool native_available) const;

  const std::vector<AutoEntry>& entries() const { return entries_; }

 private:
  std::vector<AutoEntry> entries_;
};

}  // namespace strata::comm
