// Collective algorithms and the options object every collective takes.
#pragma once

#include <chrono>
#include <cstddef>
#include <string_view>

#include "base/status.h"
#include "kernels/reduce.h"

namespace strata::comm {

using kernels::ReduceOp;

enum class Algorithm {
  kAuto,    // pick from the measured table (comm/auto_table.h) by size, world size and transport
  kStar,    // everyone sends to a hub, the hub reduces in rank order and sends back: 2 hops
  kRing,    // reduce-scatter + allgather around a ring: 2(N-1) hops, bandwidth-optimal
  kTree,    // binomial reduce to rank 0 + binomial broadcast: 2 log2(N) hops
  kNative,  // the MPI library's own collective (needs an MPI-bootstrapped communicator)
};

const char* AlgorithmName(Algorithm a);  // "auto", "star", "ring", "tree", "native"
StatusOr<Algorithm> ParseAlgorithm(std::string_view name);

struct CollectiveOptions {
  // Reduction for allreduce and reduce-scatter.
  ReduceOp op = ReduceOp::kSum;
  // kAuto resolves per call; each collective documents which algorithms it implements.
  Algorithm algorithm = Algorithm::kAuto;
  // Hub of the star algorithm; -1 = the communicator default (STRATA_STAR_HUB, default 0).
  int hub = -1;
  // A call that cannot finish in this time returns DEADLINE_EXCEEDED and breaks the group.
  // 0 = the communicator default (STRATA_COMM_TIMEOUT_MS, default 30 s). kNative cannot time out:
  // it inherits the MPI library's behaviour (mpirun aborts the job when a rank dies).
  std::chrono::milliseconds timeout{0};
  // Messages larger than this are cut into segments that the star hub reduces as they arrive.
  // 0 = the communicator default (STRATA_SEGMENT_BYTES). Tests set it small so that small
  // buffers still cross many segments.
  size_t segment_bytes = 0;
};

}  // namespace strata::comm
