// Point-to-point byte movement between the ranks of a group. Collectives (comm/collectives.cc)
// are written once on top of this interface; each backend lives in its own subfolder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "base/clock.h"
#include "base/status.h"

namespace strata::comm {

// A handle to an outstanding non-blocking operation. Wait* set completed handles to kNullRequest.
using Request = int64_t;
inline constexpr Request kNullRequest = -1;

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* name() const = 0;  // "mpi", "tcp"

  // Messages from one sender to one receiver arrive in the order they were posted and must be
  // received with the same tag and byte count (a mismatch is a protocol error, not a reorder).
  // Buffers must stay valid until the request completes.
  virtual StatusOr<Request> Isend(int peer, const void* buf, size_t bytes, int tag) = 0;
  virtual StatusOr<Request> Irecv(int peer, void* buf, size_t bytes, int tag) = 0;

  // Blocks until one of the non-null requests completes; sets it to kNullRequest and returns its
  // index. Returns DEADLINE_EXCEEDED at the deadline, UNAVAILABLE when a peer it waits on is gone,
  // INVALID_ARGUMENT when every request is null.
  virtual StatusOr<size_t> WaitAny(std::span<Request> requests, const Deadline& deadline) = 0;

  // Blocks until every non-null request completes (each is set to kNullRequest).
  virtual Status WaitAll(std::span<Request> requests, const Deadline& deadline) = 0;

  // Called after a failed collective: outstanding operations are dropped and the group is marked
  // broken, so every later call fails fast instead of reading a desynchronized stream. Peers are
  // told where the backend can (the tcp transport closes its connections).
  virtual void Abort(const Status& why) = 0;

  // Non-OK once Abort() ran or a connection failed.
  virtual Status health() const = 0;

  // Emulated one-way link delay applied to every message, in microseconds (0 = none).
  virtual int64_t emulated_delay_us() const { return 0; }

  // Convenience blocking forms.
  Status Send(int peer, const void* buf, size_t bytes, int tag, const Deadline& deadline);
  Status Recv(int peer, void* buf, size_t bytes, int tag, const Deadline& deadline);
};

}  // namespace strata::comm
