#include "comm/transport/mpi/mpi_transport.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "base/clock.h"
#include "base/env.h"
#include "base/logging.h"

namespace strata::comm::mpi {
namespace {

int64_t SpinNs() {
  static const int64_t ns = EnvIntInRange("STRATA_COMM_SPIN_MS", 0, 60000) * 1000000;
  return ns;
}

// Paces the poll loop of one wait. MPI (and Open MPI's yield_when_idle) keep a waiting rank on
// its core, polling; that is right for the short waits of a collective, and wrong for a rank that
// waits seconds for a peer: on a machine where ranks share cores (or share them with the node's
// snapshotd while it rebuilds a lost node's snapshot) the poller takes CPU from the very process
// it waits for. Past the spin phase (50 ms by default: longer than the waits inside a training
// or decode step, so those never sleep) each poll is followed by a sleep that doubles from 20 us
// to 250 us: a wake-up at most ~250 us late on a wait that already lasted SpinNs().
class PollPacer {
 public:
  PollPacer() : start_(NowNs()) {}
  void Pause() {
    if (sleep_us_ == 0) {
      if (NowNs() - start_ < SpinNs()) return;
      sleep_us_ = 20;
    }
    ::usleep(static_cast<useconds_t>(sleep_us_));
    sleep_us_ = std::min(sleep_us_ * 2, 250);
  }

 private:
  int64_t start_;
  int sleep_us_ = 0;
};

// bf16 and f16 have no MPI datatype: they travel as 2-byte contiguous types of their own so the
// user-defined reduction can tell them apart.
struct HalfTypes {
  MPI_Datatype bf16 = MPI_DATATYPE_NULL;
  MPI_Datatype f16 = MPI_DATATYPE_NULL;
  MPI_Op sum = MPI_OP_NULL;
  MPI_Op max = MPI_OP_NULL;
};

template <kernels::ReduceOp kOp>
void HalfReduce(void* in, void* inout, int* len, MPI_Datatype* type);

HalfTypes& Halves() {
  static HalfTypes h = [] {
    HalfTypes t;
    MPI_Type_contiguous(2, MPI_BYTE, &t.bf16);
    MPI_Type_commit(&t.bf16);
    MPI_Type_contiguous(2, MPI_BYTE, &t.f16);
    MPI_Type_commit(&t.f16);
    MPI_Op_create(&HalfReduce<kernels::ReduceOp::kSum>, /*commute=*/1, &t.sum);
    MPI_Op_create(&HalfReduce<kernels::ReduceOp::kMax>, /*commute=*/1, &t.max);
    return t;
  }();
  return h;
}

template <kernels::ReduceOp kOp>
void HalfReduce(void* in, void* inout, int* len, MPI_Datatype* type) {
  const DType dt = *type == Halves().bf16 ? DType::kBF16 : DType::kF16;
  kernels::ReduceInto(inout, in, static_cast<size_t>(*len), dt, kOp);
}

MPI_Datatype ToMpi(DType dt) {
  switch (dt) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kI8: return MPI_INT8_T;
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kBF16: return Halves().bf16;
    case DType::kF16: return Halves().f16;
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op ToMpi(DType dt, kernels::ReduceOp op) {
  if (dt == DType::kBF16 || dt == DType::kF16) {
    return op == kernels::ReduceOp::kSum ? Halves().sum : Halves().max;
  }
  return op == kernels::ReduceOp::kSum ? MPI_SUM : MPI_MAX;
}

Status CheckCount(size_t n, const char* what) {
  if (n > static_cast<size_t>(INT_MAX)) {
    return Status::InvalidArgument(std::string("mpi: ") + what + " of " + std::to_string(n) +
                                   " elements exceeds MPI's int count");
  }
  return Status::OK();
}

class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiTransport() override {
    // After an abort, unmatched messages may still be in flight on this communicator. Freeing it
    // would let MPI hand its context to the next MPI_Comm_dup, where those stale messages could
    // match new receives; a broken group's communicator is deliberately leaked instead.
    if (comm_ != MPI_COMM_NULL && health_.ok() && !Finalized()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "mpi"; }
  Status health() const override { return health_; }

  StatusOr<Request> Isend(int peer, const void* buf, size_t bytes, int tag) override {
    STRATA_RETURN_IF_ERROR(Check(peer, bytes));
    Slot& s = NewSlot(peer);
    STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Isend(buf, static_cast<int>(bytes), MPI_BYTE, peer, tag,
                                                comm_, &s.req)));
    return s.id;
  }

  StatusOr<Request> Irecv(int peer, void* buf, size_t bytes, int tag) override {
    STRATA_RETURN_IF_ERROR(Check(peer, bytes));
    Slot& s = NewSlot(peer);
    s.is_recv = true;
    s.bytes = bytes;
    s.tag = tag;
    STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Irecv(buf, static_cast<int>(bytes), MPI_BYTE, peer, tag,
                                                comm_, &s.req)));
    return s.id;
  }

  StatusOr<size_t> WaitAny(std::span<Request> requests, const Deadline& deadline) override {
    PollPacer pacer;
    while (true) {
      STRATA_ASSIGN_OR_RETURN(size_t first, TestSome(requests, /*at_most_one=*/true));
      if (first != kNone) return first;
      if (deadline.expired()) return Timeout(requests);
      pacer.Pause();
    }
  }

  Status WaitAll(std::span<Request> requests, const Deadline& deadline) override {
    PollPacer pacer;
    while (true) {
      bool pending = false;
      for (Request r : requests) pending |= r != kNullRequest;
      if (!pending) return Status::OK();
      StatusOr<size_t> r = TestSome(requests);
      if (!r.ok()) return r.status();
      if (deadline.expired()) return Timeout(requests);
      if (*r != kNone) {
        pacer = PollPacer();  // progress: the next wait starts spinning again
      } else {
        pacer.Pause();
      }
    }
  }

  void Abort(const Status& why) override {
    if (health_.ok()) {
      health_ = why.ok() ? Status::Aborted("mpi: aborted") : why;
      STRATA_LOG(WARN, COMM, "mpi: rank {} marking the group broken: {}", rank_,
                 health_.ToString());
    }
    // Receives can be cancelled; sends cannot be taken back, so they are left to MPI.
    for (Slot& s : slots_) {
      if (s.in_use && s.req != MPI_REQUEST_NULL) {
        if (s.is_recv) MPI_Cancel(&s.req);
        MPI_Request_free(&s.req);
      }
      s.in_use = false;
    }
  }

 private:
  struct Slot {
    Request id = kNullRequest;
    bool in_use = false;
    bool is_recv = false;
    int peer = -1;
    int tag = 0;
    size_t bytes = 0;
    MPI_Request req = MPI_REQUEST_NULL;
  };

  static bool Finalized() {
    int f = 0;
    MPI_Finalized(&f);
    return f != 0;
  }

  Status Check(int peer, size_t bytes) const {
    if (!health_.ok()) {
      return Status::FailedPrecondition("mpi: group is broken by an earlier error: " +
                                        health_.ToString());
    }
    if (peer < 0 || peer >= size_ || peer == rank_) {
      return Status::InvalidArgument("mpi: bad peer " + std::to_string(peer));
    }
    return CheckCount(bytes, "message");
  }

  Slot& NewSlot(int peer) {
    Request id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = static_cast<Request>(slots_.size());
      slots_.emplace_back();
    }
    Slot& s = slots_[id];
    s = Slot{};
    s.id = id;
    s.in_use = true;
    s.peer = peer;
    return s;
  }

  static constexpr size_t kNone = static_cast<size_t>(-1);

  // One MPI_Testsome over every active request: a single pass of MPI's progress engine per
  // poll instead of one per request. Completed requests are set to kNullRequest; returns the
  // index of the first one completed (kNone if none).
  StatusOr<size_t> TestSome(std::span<Request> requests, bool at_most_one = false) {
    mpi_reqs_.clear();
    positions_.clear();
    for (size_t i = 0; i < requests.size(); ++i) {
      if (requests[i] == kNullRequest) continue;
      mpi_reqs_.push_back(slots_[requests[i]].req);
      positions_.push_back(i);
    }
    if (mpi_reqs_.empty()) return Status::InvalidArgument("mpi: wait on no active request");
    indices_.resize(mpi_reqs_.size());
    statuses_.resize(mpi_reqs_.size());
    int outcount = 0;
    if (at_most_one) {
      // WaitAny reports exactly one completion, so it must not complete more than one.
      int flag = 0;
      STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Testany(static_cast<int>(mpi_reqs_.size()),
                                                    mpi_reqs_.data(), &indices_[0], &flag,
                                                    &statuses_[0])));
      outcount = flag && indices_[0] != MPI_UNDEFINED ? 1 : 0;
    } else {
      STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Testsome(static_cast<int>(mpi_reqs_.size()),
                                                     mpi_reqs_.data(), &outcount, indices_.data(),
                                                     statuses_.data())));
      if (outcount == MPI_UNDEFINED) outcount = 0;
    }
    size_t first = kNone;
    for (int k = 0; k < outcount; ++k) {
      const size_t pos = positions_[static_cast<size_t>(indices_[k])];
      Slot& s = slots_[requests[pos]];
      s.req = MPI_REQUEST_NULL;
      if (s.is_recv) {
        int count = 0;
        MPI_Get_count(&statuses_[k], MPI_BYTE, &count);
        if (static_cast<size_t>(count) != s.bytes) {
          return Status::Internal("mpi: message from rank " + std::to_string(s.peer) + " has " +
                                  std::to_string(count) + " bytes, expected " +
                                  std::to_string(s.bytes) + ": ranks called different operations");
        }
      }
      s.in_use = false;
      free_.push_back(requests[pos]);
      requests[pos] = kNullRequest;
      first = std::min(first, pos);
    }
    return first;
  }

  Status Timeout(std::span<const Request> requests) const {
    std::set<int> peers;
    for (Request r : requests) {
      if (r != kNullRequest) peers.insert(slots_[r].peer);
    }
    std::string list;
    for (int p : peers) list += (list.empty() ? "" : ",") + std::to_string(p);
    return Status::DeadlineExceeded("mpi: rank " + std::to_string(rank_) +
                                    " timed out waiting for rank(s) " + list +
                                    " (stalled or dead peer; raise STRATA_COMM_TIMEOUT_MS if the "
                                    "work is just slow)");
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<Slot> slots_;
  std::vector<Request> free_;
  // Reused by TestSome: no allocation per poll.
  std::vector<MPI_Request> mpi_reqs_;
  std::vector<size_t> positions_;
  std::vector<int> indices_;
  std::vector<MPI_Status> statuses_;
  Status health_;
};

class MpiNative final : public NativeCollectives {
 public:
  explicit MpiNative(MPI_Comm comm) : comm_(comm) { MPI_Comm_size(comm_, &size_); }
  ~MpiNative() override {
    int f = 0;
    MPI_Finalized(&f);
    if (!f) MPI_Comm_free(&comm_);
  }

  Status Barrier() override { return STRATA_MPI(MPI_Barrier(comm_)); }

  Status Broadcast(void* buf, size_t bytes, int root) override {
    STRATA_RETURN_IF_ERROR(CheckCount(bytes, "broadcast"));
    return STRATA_MPI(MPI_Bcast(buf, static_cast<int>(bytes), MPI_BYTE, root, comm_));
  }

  Status Allreduce(const void* in, void* out, size_t count, DType dtype,
                   kernels::ReduceOp op) override {
    STRATA_RETURN_IF_ERROR(CheckCount(count, "allreduce"));
    const void* send = in == out ? MPI_IN_PLACE : in;
    return STRATA_MPI(MPI_Allreduce(send, out, static_cast<int>(count), ToMpi(dtype),
                                    ToMpi(dtype, op), comm_));
  }

  Status Allgather(const void* in, void* out, size_t bytes_per_rank) override {
    STRATA_RETURN_IF_ERROR(CheckCount(bytes_per_rank, "allgather"));
    return STRATA_MPI(MPI_Allgather(in, static_cast<int>(bytes_per_rank), MPI_BYTE, out,
                                    static_cast<int>(bytes_per_rank), MPI_BYTE, comm_));
  }

  Status ReduceScatter(const void* in, void* out, size_t count_per_rank, DType dtype,
                       kernels::ReduceOp op) override {
    STRATA_RETURN_IF_ERROR(CheckCount(count_per_rank * static_cast<size_t>(size_),
                                      "reduce-scatter"));
    return STRATA_MPI(MPI_Reduce_scatter_block(in, out, static_cast<int>(count_per_rank),
                                               ToMpi(dtype), ToMpi(dtype, op), comm_));
  }

 private:
  MPI_Comm comm_;
  int size_ = 1;
};

class MpiRendezvous final : public Rendezvous {
 public:
  explicit MpiRendezvous(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // MPI collectives block; the deadline cannot interrupt them.
  StatusOr<std::vector<std::string>> AllGather(const std::string& mine,
                                               const Deadline&) override {
    int len = static_cast<int>(mine.size());
    std::vector<int> lens(size_), displs(size_);
    STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT,
                                                    comm_)));
    int total = 0;
    for (int r = 0; r < size_; ++r) {
      displs[r] = total;
      total += lens[r];
    }
    std::string all(static_cast<size_t>(total), '\0');
    STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(),
                                                     lens.data(), displs.data(), MPI_CHAR,
                                                     comm_)));
    std::vector<std::string> out(size_);
    for (int r = 0; r < size_; ++r) out[r] = all.substr(displs[r], lens[r]);
    return out;
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

MPI_Comm Dup(MPI_Comm comm) {
  MPI_Comm dup;
  MPI_Comm_dup(comm, &dup);
  // Errors come back as codes we turn into Status instead of aborting the job.
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  return dup;
}

}  // namespace

Status MpiStatus(int rc, const char* call, const char* file, int line) {
  if (rc == MPI_SUCCESS) return Status::OK();
  char msg[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return Status::Internal(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                          ": " + std::string(msg, static_cast<size_t>(len)));
}

bool IsInitialized() {
  int init = 0;
  MPI_Initialized(&init);
  return init != 0;
}

// Open MPI sends a shared-memory message above its eager limit (4 KiB by default) through a
// single-copy path (CMA: a process_vm_readv system call and a rendezvous handshake). Decode's
// partial sums are hidden_size floats, 8 KiB for a 2048-wide model, twice per layer: on one host
// with 2 ranks, the time from the last rank's arrival to the end of each allreduce averaged
// 31-34 us in a q8_0 decode, and 15-20 us with the limit at 16 or 32 KiB (docs/BENCHMARKS.md
// section 15). So EnsureInitialized raises it to the shared-memory transport's fragment size,
// 32 KiB, unless the user set it (mpirun --mca reaches us as the same variable). Only messages
// up to 32 KiB change path; an MCA parameter file's value is overridden, which the variable
// itself can undo.
const char* SharedMemoryEagerLimitVariable() {
#if defined(OMPI_MAJOR_VERSION)
  return OMPI_MAJOR_VERSION >= 5 ? "OMPI_MCA_btl_sm_eager_limit" : "OMPI_MCA_btl_vader_eager_limit";
#else
  return nullptr;
#endif
}

Status EnsureInitialized(int* argc, char*** argv) {
  if (IsInitialized()) return Status::OK();
  if (const char* name = SharedMemoryEagerLimitVariable()) {
    ::setenv(name, std::to_string(kSharedMemoryEagerLimit).c_str(), /*overwrite=*/0);
  }
  int provided = 0;
  STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided)));
  if (provided < MPI_THREAD_FUNNELED) {
    return Status::FailedPrecondition("mpi: the MPI library does not provide MPI_THREAD_FUNNELED");
  }
  return Status::OK();
}

StatusOr<std::unique_ptr<Transport>> CreateTransport(MPI_Comm comm) {
  if (!IsInitialized()) return Status::FailedPrecondition("mpi: MPI is not initialized");
  return std::unique_ptr<Transport>(std::make_unique<MpiTransport>(Dup(comm)));
}

std::unique_ptr<NativeCollectives> CreateNative(MPI_Comm comm) {
  return std::make_unique<MpiNative>(Dup(comm));
}

std::unique_ptr<Rendezvous> CreateRendezvous(MPI_Comm comm) {
  return std::make_unique<MpiRendezvous>(comm);
}

StatusOr<Topology> DiscoverTopology(MPI_Comm comm) {
  Topology t;
  MPI_Comm_rank(comm, &t.rank);
  MPI_Comm_size(comm, &t.size);
  MPI_Comm node_comm;
  STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, t.rank,
                                                        MPI_INFO_NULL, &node_comm)));
  MPI_Comm_rank(node_comm, &t.local_rank);
  MPI_Comm_size(node_comm, &t.local_size);
  // The lowest rank of each node names the node; every rank learns every rank's node leader.
  int leader = t.rank;
  MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, node_comm);
  MPI_Comm_free(&node_comm);
  std::vector<int> leaders(t.size);
  STRATA_RETURN_IF_ERROR(STRATA_MPI(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT,
                                                  comm)));
  std::vector<std::string> names(t.size);
  for (int r = 0; r < t.size; ++r) names[r] = std::to_string(leaders[r]);
  Topology from_leaders = TopologyFromNames(t.rank, names);
  t.node = from_leaders.node;
  t.num_nodes = from_leaders.num_nodes;
  t.node_of_rank = from_leaders.node_of_rank;
  return t;
}

}  // namespace strata::comm::mpi
