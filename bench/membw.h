// Streaming read bandwidth of this machine's memory, as the decode floor of issue 3 needs it:
// every rank of the launch reads its own buffer (bigger than the caches) with `threads` threads at
// the same time, so ranks sharing a node share its bandwidth exactly as decoding ranks do.
#pragma once

#include <cstddef>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/thread_pool.h"
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

// One streaming-read pass at a time over its own buffer with a pool's threads: the measurement
// RunMembw repeats, usable between other work (`strata infer --probe-bandwidth` runs one pass
// after every decode token, so decode and its floor see the same moment's bandwidth).
class MembwProbe {
 public:
  // `bytes` rounded down to whole floats (at least 4096 bytes); 2 MiB-aligned and hinted for
  // transparent huge pages, as the weight window maps shard files (memory/weight_window.h), and
  // first touched by the threads that will read it.
  MembwProbe(size_t bytes, ThreadPool* pool);
  // One pass by every thread of the pool over its share; GB/s (1e9 bytes/s).
  double PassGbps();
  size_t bytes() const { return n_ * sizeof(float); }

 private:
  ThreadPool* pool_;
  size_t n_;
  AlignedBuffer buf_;
  std::vector<float> partial_;  // one sum per thread, kept so a pass allocates nothing
  volatile float sink_ = 0;
};

// Runs on every rank of `comm` (null: this process alone). Passes start together (barrier).
StatusOr<MembwResult> RunMembw(const MembwOptions& options, comm::Communicator* comm);

}  // namespace strata::bench
