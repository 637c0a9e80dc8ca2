// Streaming read bandwidth of this machine's memory, as the decode floor of issue 3 needs it:
// every rank of the launch reads its own buffer (bigger than the caches) with `threads` threads at
// the same time, so ranks sharing a node share its bandwidth exactly as decoding ranks do.
#pragma once

#include <cstddef>
#include <vector>

#include "base/status.h"
#include "comm/communicator.h"

namespace strata::bench {

struct MembwOptions {
  size_t bytes = size_t{1} << 30;  // per rank; well beyond any L3
  int threads = 1;                 // per rank
  int reps = 5;                    // timed passes; the best is reported (least disturbed)
};

struct MembwResult {
  double rank_gbps = 0;       // this rank's best pass, GB/s (1e9 bytes/s)
  double rank_gbps_median = 0;
  std::vector<double> all_gbps;  // every rank's best pass (rank 0 only)
  std::vector<double> all_gbps_median;  // every rank's median pass (rank 0 only)
  double total_gbps = 0;      // sum over ranks (rank 0 only)
};

// Runs on every rank of `comm` (null: this process alone). Passes start together (barrier).
StatusOr<MembwResult> RunMembw(const MembwOptions& options, comm::Communicator* comm);

}  // namespace strata::bench
