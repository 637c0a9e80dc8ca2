// Multi-rank allreduce benchmark behind `strata bench allreduce`: median and p99 latency per
// algorithm, transport and size, every rank timing the same iterations.
#pragma once

#include <string>
#include <vector>

#include "base/dtype.h"
#include "base/status.h"
#include "comm/algorithm.h"
#include "comm/communicator.h"

namespace strata::bench {

struct AllreduceBenchOptions {
  std::vector<comm::Algorithm> algorithms;
  std::vector<comm::TransportKind> transports;
  std::vector<size_t> sizes_bytes;
  DType dtype = DType::kF32;
  int iters = 200;
  int warmup = 20;
  int hub = -1;  // -1: STRATA_STAR_HUB
  bool progress = true;  // progress lines on stderr (rank 0)
};

struct AllreduceResult {
  std::string algorithm;
  std::string transport;
  int ranks = 0;
  int nodes = 0;
  size_t bytes = 0;
  double latency_us_median = 0;
  double latency_us_p99 = 0;
  double latency_us_min = 0;
  int64_t emulated_link_delay_us = 0;
};

// Runs on every rank of MPI_COMM_WORLD (MPI must be initialized). Every result is checked
// against the closed form sum_{r<N}(r+1) before it is reported. Rank 0 gets the results.
StatusOr<std::vector<AllreduceResult>> RunAllreduceBench(const AllreduceBenchOptions& options);

// The JSON document: {"benchmark": "allreduce", ..., "results": [...]}.
std::string AllreduceResultsToJson(const std::vector<AllreduceResult>& results,
                                   const AllreduceBenchOptions& options);
// A table per transport: one row per size, median / p99 microseconds per algorithm.
std::string AllreduceResultsToTable(const std::vector<AllreduceResult>& results);

}  // namespace strata::bench
