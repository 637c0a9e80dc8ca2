// The communicator every higher layer talks through: point-to-point and collectives over one
// transport, with the algorithm chosen per call (CollectiveOptions::algorithm).
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "base/aligned_buffer.h"
#include "base/dtype.h"
#include "base/status.h"
#include "comm/algorithm.h"
#include "comm/auto_table.h"
#include "comm/native.h"
#include "comm/rendezvous/rendezvous.h"
#include "comm/topology.h"
#include "comm/transport/tcp/tcp_transport.h"
#include "comm/transport/transport.h"

namespace strata::comm {

namespace algo {
struct Scratch;
}

enum class TransportKind { kMpi, kTcp };
const char* TransportKindName(TransportKind k);
StatusOr<TransportKind> ParseTransportKind(std::string_view name);

// Defaults every call falls back to; FromEnv() reads the STRATA_* registry.
struct CommConfig {
  std::chrono::milliseconds timeout{30000};  // STRATA_COMM_TIMEOUT_MS
  size_t segment_bytes = 256 << 10;          // STRATA_SEGMENT_BYTES
  int star_hub = 0;                          // STRATA_STAR_HUB
  AutoTable auto_table = AutoTable::BuiltIn();  // STRATA_ALLREDUCE_TABLE replaces it
  static StatusOr<CommConfig> FromEnv();
};

class Communicator {
 public:
  // Tags below this are free for callers' point-to-point messages; collectives use those above.
  static constexpr int kMaxUserTag = 1 << 20;

  Communicator(std::unique_ptr<Transport> transport, std::unique_ptr<NativeCollectives> native,
               Topology topology, CommConfig config);
  ~Communicator();

  int rank() const { return transport_->rank(); }
  int size() const { return transport_->size(); }
  const Topology& topology() const { return topology_; }
  const char* transport_name() const { return transport_->name(); }
  bool has_native() const { return native_ != nullptr; }
  int64_t emulated_delay_us() const { return transport_->emulated_delay_us(); }
  const CommConfig& config() const { return config_; }
  Status health() const { return transport_->health(); }

  // Point to point. Tags must be in [0, kMaxUserTag). Timeouts as for collectives.
  Status Send(int peer, const void* buf, size_t bytes, int tag);
  Status Recv(int peer, void* buf, size_t bytes, int tag);
  StatusOr<Request> Isend(int peer, const void* buf, size_t bytes, int tag);
  StatusOr<Request> Irecv(int peer, void* buf, size_t bytes, int tag);
  Status WaitAll(std::span<Request> requests);

  // Collectives: every rank calls them in the same order with the same sizes and options.
  // A failure (timeout, dead peer) returns an error on every rank that notices it and breaks
  // the group: later calls fail fast (see Transport::Abort).
  // Algorithms: star, tree, native. Auto: native if present, else star.
  Status Barrier(const CollectiveOptions& opts = {});
  // Algorithms: star, tree, native. Auto: native if present, else tree.
  Status Broadcast(void* buf, size_t bytes, int root, const CollectiveOptions& opts = {});
  // Algorithms: star, ring, tree, native. Auto: the measured table. in == out is allowed.
  Status Allreduce(const void* in, void* out, size_t count, DType dtype,
                   const CollectiveOptions& opts = {});
  // out holds size() blocks of bytes_per_rank, in rank order. Algorithms: star, ring, native.
  // Auto: native if present, else ring.
  Status Allgather(const void* in, void* out, size_t bytes_per_rank,
                   const CollectiveOptions& opts = {});
  // in holds size() blocks of count_per_rank elements; rank r gets the reduction of block r.
  // Algorithms: star, ring, native. Auto: native if present, else ring.
  Status ReduceScatter(const void* in, void* out, size_t count_per_rank, DType dtype,
                       const CollectiveOptions& opts = {});

  // The algorithm a call with these options would use (kAuto resolved), for reports.
  Algorithm ResolveAllreduce(Algorithm requested, size_t bytes) const;

 private:
  Deadline DeadlineFor(const CollectiveOptions& opts) const;
  size_t SegmentBytes(const CollectiveOptions& opts) const;
  int Hub(const CollectiveOptions& opts) const;
  Status Finish(Status st, const char* what, Algorithm algo, size_t bytes);
  Status CheckTag(int tag) const;

  std::unique_ptr<Transport> transport_;
  std::unique_ptr<NativeCollectives> native_;
  Topology topology_;
  CommConfig config_;
  std::unique_ptr<algo::Scratch> scratch_;  // grown on demand, reused: no allocation per step
};

// Over MPI: point-to-point and native collectives on duplicates of `comm`, topology from
// MPI_Comm_split_type. With kTcp, the tcp transport is bootstrapped by exchanging listen
// addresses over `comm` (its options from the env registry); native collectives stay MPI's.
StatusOr<std::unique_ptr<Communicator>> CreateFromMpi(MPI_Comm comm, TransportKind kind);

// tcp transport without MPI (ranks as processes in tests, or launchers without MPI): addresses
// and host names are exchanged through `rendezvous`; kNative is unavailable.
StatusOr<std::unique_ptr<Communicator>> CreateTcp(Rendezvous& rendezvous,
                                                  tcp::TcpOptions options, CommConfig config);

// TcpOptions filled from STRATA_TCP_IFNAME and STRATA_LINK_DELAY_US.
StatusOr<tcp::TcpOptions> TcpOptionsFromEnv();

}  // namespace strata::comm
