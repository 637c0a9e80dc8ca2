// The communication library's own collectives (Algorithm::kNative). Implemented by the MPI
// backend; a communicator without one reports kNative as unavailable.
#pragma once

#include <cstddef>

#include "base/dtype.h"
#include "base/status.h"
#include "kernels/reduce.h"

namespace strata::comm {

class NativeCollectives {
 public:
  virtual ~NativeCollectives() = default;
  virtual Status Barrier() = 0;
  virtual Status Broadcast(void* buf, size_t bytes, int root) = 0;
  virtual Status Allreduce(const void* in, void* out, size_t count, DType dtype,
                           kernels::ReduceOp op) = 0;
  virtual Status Allgather(const void* in, void* out, size_t bytes_per_rank) = 0;
  virtual Status ReduceScatter(const void* in, void* out, size_t count_per_rank, DType dtype,
                               kernels::ReduceOp op) = 0;
};

}  // namespace strata::comm
