// Collective algorithms written once over Transport's point-to-point operations. Internal to
// comm/: callers go through Communicator, which picks the algorithm and handles failures.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/clock.h"
#include "base/dtype.h"
#include "base/status.h"
#include "comm/transport/transport.h"
#include "kernels/reduce.h"

namespace strata::comm::algo {

// Tags of collective messages (above Communicator::kMaxUserTag).
enum Tag : int {
  kTagBarrierUp = (1 << 20) + 1,
  kTagBarrierDown,
  kTagStarUp,
  kTagStarDown,
  kTagRing,
  kTagTreeReduce,
  kTagBroadcast,
  kTagAllgather,
};

// Reused across calls so that, once sizes have been seen, a collective allocates nothing: these
// run once or twice per layer per token.
struct Scratch {
  AlignedBuffer bytes;
  std::vector<Request> reqs;
  std::vector<Request> sends;
  std::vector<uint8_t> arrived;
  std::vector<int> next;
};

struct ReduceArgs {
  const void* in;
  void* out;
  size_t count;
  DType dtype;
  kernels::ReduceOp op;
};

// Star: workers send their buffer (in segments) to the hub; the hub folds the segments in rank
// order 0, 1, ..., N-1 as they arrive — so the result is bitwise identical whatever the arrival
// order — and sends each finished segment back while later ones are still arriving.
Status StarAllreduce(Transport& t, const ReduceArgs& a, int hub, size_t segment_bytes,
                     Scratch& scratch, const Deadline& deadline);
// Ring: reduce-scatter then allgather, 2(N-1) steps of 1/N of the buffer each.
Status RingAllreduce(Transport& t, const ReduceArgs& a, Scratch& scratch,
                     const Deadline& deadline);
// Binomial tree: reduce to rank 0, then broadcast from it.
Status TreeAllreduce(Transport& t, const ReduceArgs& a, Scratch& scratch,
                     const Deadline& deadline);

Status StarBarrier(Transport& t, int hub, Scratch& scratch, const Deadline& deadline);
Status StarBroadcast(Transport& t, void* buf, size_t bytes, int root, Scratch& scratch,
                     const Deadline& deadline);
Status TreeBroadcast(Transport& t, void* buf, size_t bytes, int root, Scratch& scratch,
                     const Deadline& deadline);
// Tree barrier: a zero-byte binomial reduce and broadcast.
Status TreeBarrier(Transport& t, Scratch& scratch, const Deadline& deadline);

Status RingAllgather(Transport& t, const void* in, void* out, size_t bytes_per_rank,
                     const Deadline& deadline);
Status StarAllgather(Transport& t, const void* in, void* out, size_t bytes_per_rank, int hub,
                     Scratch& scratch, const Deadline& deadline);

// count_per_rank elements per block; `in` holds N blocks.
Status RingReduceScatter(Transport& t, const ReduceArgs& a, Scratch& scratch,
                         const Deadline& deadline);

}  // namespace strata::comm::algo
