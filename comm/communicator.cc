#include "comm/communicator.h"

#include <cstring>

#include "base/env.h"
#include "base/logging.h"
#include "comm/collectives.h"
#include "comm/transport/mpi/mpi_transport.h"

namespace strata::comm {

const char* TransportKindName(TransportKind k) { return k == TransportKind::kMpi ? "mpi" : "tcp"; }

StatusOr<TransportKind> ParseTransportKind(std::string_view name) {
  if (name == "mpi") return TransportKind::kMpi;
  if (name == "tcp") return TransportKind::kTcp;
  return Status::InvalidArgument("unknown transport '" + std::string(name) + "' (valid: mpi, tcp)");
}

StatusOr<CommConfig> CommConfig::FromEnv() {
  CommConfig c;
  STRATA_ASSIGN_OR_RETURN(int64_t timeout_ms, EnvInt("STRATA_COMM_TIMEOUT_MS"));
  STRATA_ASSIGN_OR_RETURN(int64_t seg, EnvInt("STRATA_SEGMENT_BYTES"));
  STRATA_ASSIGN_OR_RETURN(int64_t hub, EnvInt("STRATA_STAR_HUB"));
  if (timeout_ms <= 0) return Status::InvalidArgument("STRATA_COMM_TIMEOUT_MS must be > 0");
  if (seg <= 0) return Status::InvalidArgument("STRATA_SEGMENT_BYTES must be > 0");
  if (hub < 0) return Status::InvalidArgument("STRATA_STAR_HUB must be >= 0");
  c.timeout = std::chrono::milliseconds(timeout_ms);
  c.segment_bytes = static_cast<size_t>(seg);
  c.star_hub = static_cast<int>(hub);
  const std::string table = EnvString("STRATA_ALLREDUCE_TABLE");
  if (!table.empty()) {
    STRATA_ASSIGN_OR_RETURN(c.auto_table, AutoTable::FromBenchJson(table));
  }
  return c;
}

Communicator::Communicator(std::unique_ptr<Transport> transport,
                           std::unique_ptr<NativeCollectives> native, Topology topology,
                           CommConfig config)
    : transport_(std::move(transport)),
      native_(std::move(native)),
      topology_(std::move(topology)),
      config_(std::move(config)),
      scratch_(std::make_unique<algo::Scratch>()) {}

Communicator::~Communicator() = default;

Deadline Communicator::DeadlineFor(const CollectiveOptions& opts) const {
  return Deadline::After(opts.timeout.count() > 0 ? opts.timeout : config_.timeout);
}

size_t Communicator::SegmentBytes(const CollectiveOptions& opts) const {
  return opts.segment_bytes > 0 ? opts.segment_bytes : config_.segment_bytes;
}

int Communicator::Hub(const CollectiveOptions& opts) const {
  return opts.hub >= 0 ? opts.hub : config_.star_hub;
}

Status Communicator::CheckTag(int tag) const {
  if (tag < 0 || tag >= kMaxUserTag) {
    return Status::InvalidArgument("tag " + std::to_string(tag) + " outside [0, " +
                                   std::to_string(kMaxUserTag) + ")");
  }
  return Status::OK();
}

Status Communicator::Finish(Status st, const char* what, Algorithm algo, size_t bytes) {
  if (st.ok()) return st;
  // A failed collective leaves streams mid-message: break the group so nobody reads garbage.
  transport_->Abort(st);
  return st.WithContext(fmt::format("{}({}, {} bytes, {} transport, rank {} of {})", what,
                                    AlgorithmName(algo), bytes, transport_->name(), rank(),
                                    size()));
}

Status Communicator::Send(int peer, const void* buf, size_t bytes, int tag) {
  STRATA_RETURN_IF_ERROR(CheckTag(tag));
  return transport_->Send(peer, buf, bytes, tag, Deadline::After(config_.timeout));
}

Status Communicator::Recv(int peer, void* buf, size_t bytes, int tag) {
  STRATA_RETURN_IF_ERROR(CheckTag(tag));
  return transport_->Recv(peer, buf, bytes, tag, Deadline::After(config_.timeout));
}

StatusOr<Request> Communicator::Isend(int peer, const void* buf, size_t bytes, int tag) {
  STRATA_RETURN_IF_ERROR(CheckTag(tag));
  return transport_->Isend(peer, buf, bytes, tag);
}

StatusOr<Request> Communicator::Irecv(int peer, void* buf, size_t bytes, int tag) {
  STRATA_RETURN_IF_ERROR(CheckTag(tag));
  return transport_->Irecv(peer, buf, bytes, tag);
}

Status Communicator::WaitAll(std::span<Request> requests) {
  return transport_->WaitAll(requests, Deadline::After(config_.timeout));
}

Status Communicator::Barrier(const CollectiveOptions& opts) {
  Algorithm algo = opts.algorithm;
  if (algo == Algorithm::kAuto) algo = has_native() ? Algorithm::kNative : Algorithm::kStar;
  if (size() == 1) return Status::OK();
  const int hub = Hub(opts);
  if (hub >= size()) return Status::InvalidArgument("barrier: hub out of range");
  Status st;
  switch (algo) {
    case Algorithm::kStar:
      st = algo::StarBarrier(*transport_, hub, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kTree:
      st = algo::TreeBarrier(*transport_, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kNative:
      if (!native_) return Status::Unimplemented("barrier: no native collectives (tcp without MPI)");
      st = native_->Barrier();
      break;
    default: return Status::InvalidArgument("barrier supports star, tree, native");
  }
  return Finish(std::move(st), "barrier", algo, 0);
}

Status Communicator::Broadcast(void* buf, size_t bytes, int root, const CollectiveOptions& opts) {
  if (root < 0 || root >= size()) {
    return Status::InvalidArgument("broadcast: root " + std::to_string(root) + " out of range");
  }
  if (bytes > 0 && buf == nullptr) return Status::InvalidArgument("broadcast: null buffer");
  Algorithm algo = opts.algorithm;
  if (algo == Algorithm::kAuto) algo = has_native() ? Algorithm::kNative : Algorithm::kTree;
  if (size() == 1 || bytes == 0) return Status::OK();
  STRATA_RETURN_IF_ERROR(health());
  Status st;
  switch (algo) {
    case Algorithm::kStar:
      st = algo::StarBroadcast(*transport_, buf, bytes, root, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kTree:
      st = algo::TreeBroadcast(*transport_, buf, bytes, root, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kNative:
      if (!native_) return Status::Unimplemented("broadcast: no native collectives (tcp without MPI)");
      st = native_->Broadcast(buf, bytes, root);
      break;
    default: return Status::InvalidArgument("broadcast supports star, tree, native");
  }
  return Finish(std::move(st), "broadcast", algo, bytes);
}

Algorithm Communicator::ResolveAllreduce(Algorithm requested, size_t bytes) const {
  if (requested != Algorithm::kAuto) return requested;
  return config_.auto_table.Pick(transport_->name(), size(), bytes, has_native());
}

Status Communicator::Allreduce(const void* in, void* out, size_t count, DType dtype,
                               const CollectiveOptions& opts) {
  const size_t bytes = count * DTypeSize(dtype);
  if (count > 0 && (in == nullptr || out == nullptr)) {
    return Status::InvalidArgument("allreduce: null buffer");
  }
  const int hub = Hub(opts);
  if (hub >= size()) {
    return Status::InvalidArgument(fmt::format("allreduce: star hub {} out of range (size {})",
                                               hub, size()));
  }
  const Algorithm algo = ResolveAllreduce(opts.algorithm, bytes);
  if (count == 0) return Status::OK();
  STRATA_RETURN_IF_ERROR(health());
  if (size() == 1) {
    if (in != out) std::memcpy(out, in, bytes);
    return Status::OK();
  }
  const algo::ReduceArgs args{in, out, count, dtype, opts.op};
  Status st;
  switch (algo) {
    case Algorithm::kStar:
      st = algo::StarAllreduce(*transport_, args, hub, SegmentBytes(opts), *scratch_,
                               DeadlineFor(opts));
      break;
    case Algorithm::kRing:
      st = algo::RingAllreduce(*transport_, args, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kTree:
      st = algo::TreeAllreduce(*transport_, args, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kNative:
      if (!native_) return Status::Unimplemented("allreduce: no native collectives (tcp without MPI)");
      st = native_->Allreduce(in, out, count, dtype, opts.op);
      break;
    case Algorithm::kAuto: return Status::Internal("allreduce: auto did not resolve");
  }
  return Finish(std::move(st), "allreduce", algo, bytes);
}

Status Communicator::Allgather(const void* in, void* out, size_t bytes_per_rank,
                               const CollectiveOptions& opts) {
  if (bytes_per_rank > 0 && (in == nullptr || out == nullptr)) {
    return Status::InvalidArgument("allgather: null buffer");
  }
  Algorithm algo = opts.algorithm;
  if (algo == Algorithm::kAuto) algo = has_native() ? Algorithm::kNative : Algorithm::kRing;
  if (bytes_per_rank == 0) return Status::OK();
  STRATA_RETURN_IF_ERROR(health());
  if (size() == 1) {
    if (in != out) std::memmove(out, in, bytes_per_rank);
    return Status::OK();
  }
  const int hub = Hub(opts);
  if (hub >= size()) return Status::InvalidArgument("allgather: hub out of range");
  Status st;
  switch (algo) {
    case Algorithm::kRing:
      st = algo::RingAllgather(*transport_, in, out, bytes_per_rank, DeadlineFor(opts));
      break;
    case Algorithm::kStar:
      st = algo::StarAllgather(*transport_, in, out, bytes_per_rank, hub, *scratch_,
                               DeadlineFor(opts));
      break;
    case Algorithm::kNative:
      if (!native_) return Status::Unimplemented("allgather: no native collectives (tcp without MPI)");
      st = native_->Allgather(in, out, bytes_per_rank);
      break;
    default: return Status::InvalidArgument("allgather supports star, ring, native");
  }
  return Finish(std::move(st), "allgather", algo, bytes_per_rank * static_cast<size_t>(size()));
}

Status Communicator::ReduceScatter(const void* in, void* out, size_t count_per_rank, DType dtype,
                                   const CollectiveOptions& opts) {
  if (count_per_rank > 0 && (in == nullptr || out == nullptr)) {
    return Status::InvalidArgument("reduce-scatter: null buffer");
  }
  Algorithm algo = opts.algorithm;
  if (algo == Algorithm::kAuto) algo = has_native() ? Algorithm::kNative : Algorithm::kRing;
  const size_t es = DTypeSize(dtype);
  if (count_per_rank == 0) return Status::OK();
  STRATA_RETURN_IF_ERROR(health());
  if (size() == 1) {
    if (in != out) std::memmove(out, in, count_per_rank * es);
    return Status::OK();
  }
  const algo::ReduceArgs args{in, out, count_per_rank, dtype, opts.op};
  Status st;
  switch (algo) {
    case Algorithm::kRing:
      st = algo::RingReduceScatter(*transport_, args, *scratch_, DeadlineFor(opts));
      break;
    case Algorithm::kStar: {
      // The hub reduces everything (star allreduce into scratch) and each rank keeps its block.
      const size_t total = count_per_rank * static_cast<size_t>(size());
      AlignedBuffer full(total * es);
      st = algo::StarAllreduce(*transport_, {in, full.data(), total, dtype, opts.op}, Hub(opts),
                               SegmentBytes(opts), *scratch_, DeadlineFor(opts));
      if (st.ok()) {
        std::memcpy(out, static_cast<char*>(full.data()) + rank() * count_per_rank * es,
                    count_per_rank * es);
      }
      break;
    }
    case Algorithm::kNative:
      if (!native_) {
        return Status::Unimplemented("reduce-scatter: no native collectives (tcp without MPI)");
      }
      st = native_->ReduceScatter(in, out, count_per_rank, dtype, opts.op);
      break;
    default: return Status::InvalidArgument("reduce-scatter supports star, ring, native");
  }
  return Finish(std::move(st), "reduce-scatter", algo,
                count_per_rank * es * static_cast<size_t>(size()));
}

StatusOr<tcp::TcpOptions> TcpOptionsFromEnv() {
  tcp::TcpOptions o;
  o.ifname = EnvString("STRATA_TCP_IFNAME");
  STRATA_ASSIGN_OR_RETURN(o.link_delay_us, EnvInt("STRATA_LINK_DELAY_US"));
  if (o.link_delay_us < 0) return Status::InvalidArgument("STRATA_LINK_DELAY_US must be >= 0");
  STRATA_ASSIGN_OR_RETURN(o.spin_us, EnvInt("STRATA_TCP_SPIN_US"));
  if (o.spin_us < 0) return Status::InvalidArgument("STRATA_TCP_SPIN_US must be >= 0");
  return o;
}

StatusOr<std::unique_ptr<Communicator>> CreateFromMpi(MPI_Comm comm, TransportKind kind) {
  STRATA_ASSIGN_OR_RETURN(CommConfig config, CommConfig::FromEnv());
  STRATA_ASSIGN_OR_RETURN(Topology topo, mpi::DiscoverTopology(comm));
  std::unique_ptr<Transport> transport;
  if (kind == TransportKind::kMpi) {
    STRATA_ASSIGN_OR_RETURN(transport, mpi::CreateTransport(comm));
  } else {
    STRATA_ASSIGN_OR_RETURN(tcp::TcpOptions opts, TcpOptionsFromEnv());
    opts.single_node = topo.single_node();
    std::unique_ptr<Rendezvous> rv = mpi::CreateRendezvous(comm);
    STRATA_ASSIGN_OR_RETURN(transport, tcp::CreateTransport(*rv, opts));
  }
  SetLogRank(topo.rank);
  return std::make_unique<Communicator>(std::move(transport), mpi::CreateNative(comm),
                                        std::move(topo), std::move(config));
}

StatusOr<std::unique_ptr<Communicator>> CreateTcp(Rendezvous& rendezvous, tcp::TcpOptions options,
                                                  CommConfig config) {
  const Deadline deadline = Deadline::After(options.connect_timeout);
  STRATA_ASSIGN_OR_RETURN(Topology topo, TopologyFromHostnames(rendezvous, deadline));
  options.single_node = topo.single_node();
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<Transport> transport,
                          tcp::CreateTransport(rendezvous, options));
  return std::make_unique<Communicator>(std::move(transport), nullptr, std::move(topo),
                                        std::move(config));
}

}  // namespace strata::comm
