#include "checkpoint/snapshot_client.h"

#include <emmintrin.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/logging.h"
#include "checkpoint/erasure.h"
#include "checkpoint/snapshot_wire.h"

namespace strata::checkpoint {
namespace {

// A read-only view of one rank's data of a version: a shm slot or a disk file, mapped.
class Mapped {
 public:
  static StatusOr<Mapped> Open(const proto::RankSnapshot& rk) {
    const bool shm = !rk.shm_name().empty();
    const std::string& name = shm ? rk.shm_name() : rk.path();
    const int fd = shm ? ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0)
                       : ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoStatus(fmt::format("snapshot of rank {}: open {}", rk.rank(), name),
                                   errno);
    struct stat sb {};
    if (::fstat(fd, &sb) != 0) {
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(fmt::format("fstat {}", name), err);
    }
    Mapped m;
    m.size_ = static_cast<size_t>(sb.st_size);
    if (m.size_ > 0) {
      void* p = ::mmap(nullptr, m.size_, PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        return ErrnoStatus(fmt::format("mmap {}", name), err);
      }
      m.data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
    return m;
  }
  // A view of memory mapped elsewhere (not unmapped here).
  static Mapped Borrow(const uint8_t* data, size_t size) {
    Mapped m;
    m.data_ = data;
    m.size_ = size;
    m.owned_ = false;
    return m;
  }
  Mapped() = default;
  Mapped(Mapped&& o) noexcept : data_(o.data_), size_(o.size_), owned_(o.owned_) {
    o.data_ = nullptr;
  }
  Mapped& operator=(Mapped&&) = delete;
  ~Mapped() {
    if (data_ != nullptr && owned_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool owned_ = true;
};

int ToMs(double s) { return s <= 0 ? -1 : static_cast<int>(s * 1000); }

}  // namespace

namespace {

// memcpy with streaming (non-temporal) stores of 16 bytes: SSE2, so any x86-64 has it, and the
// copy is bound by memory, not by the store width. Ends unaligned parts with memcpy.
void StreamCopy(uint8_t* dst, const uint8_t* src, size_t n) {
  const size_t head = std::min(n, (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + i, src + i, n - i);
}

}  // namespace

uint32_t CopyAndChecksum(void* dst_v, const void* src_v, size_t bytes) {
  constexpr size_t kChunk = 256 << 10;
  constexpr size_t kStreamFrom = 1 << 20;  // smaller copies stay in cache for whoever reads next
  auto* dst = static_cast<uint8_t*>(dst_v);
  const auto* src = static_cast<const uint8_t*>(src_v);
  uint32_t crc = 0;
  if (bytes < kStreamFrom) {
    std::memcpy(dst, src, bytes);
    return FragmentChecksumExtend(0, dst, bytes);
  }
  for (size_t o = 0; o < bytes; o += kChunk) {
    const size_t n = std::min(kChunk, bytes - o);
    crc = FragmentChecksumExtend(crc, src + o, n);
    StreamCopy(dst + o, src + o, n);  // the chunk comes from cache now
  }
  _mm_sfence();  // streaming stores are weakly ordered: visible before the caller publishes
  return crc;
}

StatusOr<std::unique_ptr<SnapshotClient>> SnapshotClient::Connect(const std::string& socket_path) {
  return Connect(socket_path, Options{});
}

StatusOr<std::unique_ptr<SnapshotClient>> SnapshotClient::Connect(const std::string& socket_path,
                                                                  const Options& options) {
  STRATA_ASSIGN_OR_RETURN(int fd, ConnectUnix(socket_path));
  std::unique_ptr<SnapshotClient> c(new SnapshotClient(fd, options));
  // The listener's credentials, recorded by the kernel when it called listen(): valid even if
  // that process has stopped answering.
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.pid > 0) {
    c->server_pid_ = cred.pid;
  }
  return c;
}

SnapshotClient::~SnapshotClient() {
  Unmap();
  if (fd_ >= 0) ::close(fd_);
}

void SnapshotClient::Unmap() {
  for (uint8_t*& p : slots_) {
    if (p != nullptr) ::munmap(p, slot_bytes_);
    p = nullptr;
  }
  for (std::string& n : slot_names_) n.clear();
}

StatusOr<proto::SnapshotReply> SnapshotClient::Call(const proto::SnapshotRequest& req) {
  if (fd_ < 0) return Status::Unavailable("snapshotd connection is closed");
  Status st = WriteFrame(fd_, req, ToMs(options_.rpc_timeout_s));
  proto::SnapshotReply reply;
  if (st.ok()) st = ReadFrame(fd_, &reply, ToMs(options_.rpc_timeout_s));
  if (!st.ok()) {
    // The stream is out of step (or dead) after a failed exchange: later calls must not read
    // this request's late reply as theirs.
    ::close(fd_);
    fd_ = -1;
    return st.WithContext("snapshotd");
  }
  if (reply.code() != 0) {
    return Status(static_cast<StatusCode>(reply.code()), "snapshotd: " + reply.message());
  }
  return reply;
}

Status SnapshotClient::Register(int rank, int world, size_t bytes) {
  proto::SnapshotRequest req;
  auto* r = req.mutable_register_rank();
  r->set_rank(rank);
  r->set_world_size(world);
  r->set_bytes_per_version(bytes);
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  if (!reply.has_register_rank() || reply.register_rank().shm_names_size() != 2 ||
      reply.register_rank().slot_bytes() != SlotBytes(bytes)) {
    return Status::Internal("snapshotd: malformed Register reply");
  }
  Unmap();
  slot_bytes_ = reply.register_rank().slot_bytes();
  for (int i = 0; i < 2; ++i) {
    const std::string& name = reply.register_rank().shm_names(i);
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return ErrnoStatus(fmt::format("shm_open {}", name), errno);
    // MAP_POPULATE: fault the pages in now, at registration, rather than inside the first
    // snapshots (first-touch faults made them ~6x slower in a 256 MiB test).
    void* p = ::mmap(nullptr, slot_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     0);
    const int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) {
      Unmap();
      return ErrnoStatus(fmt::format("mmap {}", name), err);
    }
    slots_[i] = static_cast<uint8_t*>(p);
    slot_names_[i] = name;
  }
  rank_ = rank;
  bytes_ = bytes;
  reattached_ = reply.register_rank().reattached();
  writing_version_ = -1;
  writing_slot_ = -1;
  return Status::OK();
}

StatusOr<uint8_t*> SnapshotClient::BeginVersion(int64_t version) {
  if (rank_ < 0) return Status::FailedPrecondition("BeginVersion before Register");
  proto::SnapshotRequest req;
  req.mutable_begin_version()->set_version(version);
  const int64_t deadline = NowNs() + static_cast<int64_t>(options_.begin_timeout_s * 1e9);
  int64_t backoff_us = 200;
  for (;;) {
    StatusOr<proto::SnapshotReply> reply = Call(req);
    // Busy (another local rank behind, or the slot being persisted) comes back as Unavailable
    // with the connection intact; a dead server closes it (fd_ < 0) and is final.
    if (!reply.ok() && reply.status().code() == StatusCode::kUnavailable && fd_ >= 0 &&
        NowNs() < deadline) {
      ::usleep(static_cast<useconds_t>(backoff_us));
      backoff_us = std::min<int64_t>(backoff_us * 2, 20000);
      continue;
    }
    if (!reply.ok()) return reply.status();
    const int slot = reply->begin_version().slot();
    if (slot < 0 || slot > 1) return Status::Internal("snapshotd: bad slot in reply");
    writing_version_ = version;
    writing_slot_ = slot;
    return slots_[slot];
  }
}

Status SnapshotClient::Publish(int64_t version, const std::vector<Section>& sections) {
  if (writing_version_ != version || writing_slot_ < 0) {
    return Status::FailedPrecondition(
        fmt::format("Publish({}) without a matching BeginVersion", version));
  }
  proto::SnapshotRequest req;
  auto* p = req.mutable_publish();
  p->set_version(version);
  const uint8_t* base = slots_[writing_slot_];
  for (const Section& s : sections) {
    if (s.offset > bytes_ || s.bytes > bytes_ - s.offset) {
      return Status::InvalidArgument(fmt::format(
          "Publish: section '{}' [{}, +{}) exceeds the {} registered bytes", s.name, s.offset,
          s.bytes, bytes_));
    }
    auto* sec = p->add_sections();
    sec->set_name(s.name);
    sec->set_offset(s.offset);
    sec->set_bytes(s.bytes);
    sec->set_crc32c(s.crc32c ? *s.crc32c : FragmentChecksum(base + s.offset, s.bytes));
  }
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  last_committed_ = reply.publish().committed();
  writing_version_ = -1;
  writing_slot_ = -1;
  return Status::OK();
}

StatusOr<LatestInfo> SnapshotClient::Latest(int64_t max_disk_version) {
  proto::SnapshotRequest req;
  req.mutable_latest()->set_max_disk_version(max_disk_version);
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  LatestInfo info;
  const proto::LatestReply& l = reply.latest();
  info.found = l.found();
  if (info.found) {
    info.version = l.manifest().version();
    info.from_disk = l.from_disk();
    info.disk_dir = l.disk_dir();
    info.manifest = l.manifest();
    info.parity_protected = l.parity_protected();
    info.rebuilt = l.rebuilt();
    info.rebuilt_from_nodes = l.rebuilt_from_nodes();
  }
  info.note = l.note();
  return info;
}

namespace {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and memcpy faults
#endif

// The destination of a restore may be memory never touched yet: fault its whole pages in with
// one call rather than one fault per page inside memcpy. Best effort (a kernel without
// MADV_POPULATE_WRITE leaves the faults to memcpy).
void PrefaultForWrite(void* dst, size_t bytes) {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(dst) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(dst) + bytes) / page * page;
  if (end > begin) {
    (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  }
}

}  // namespace

Status SnapshotClient::ReadLatest(const LatestInfo& info, const std::vector<SectionBuffer>& out,
                                  int rank) const {
  if (!info.found) return Status::NotFound("no snapshot version to read");
  if (rank < 0) rank = rank_;
  const proto::RankSnapshot* rk = nullptr;
  for (const auto& r : info.manifest.ranks()) {
    if (r.rank() == rank) rk = &r;
  }
  if (rk == nullptr) {
    return Status::NotFound(
        fmt::format("snapshot version {} has no data of rank {}", info.version, rank));
  }
  const int64_t t0 = NowNs();
  // After a crash the relaunched rank registered again and got the same slots back, mapped and
  // faulted in at registration (what a fresh start pays too): read the version from that
  // mapping rather than map the slot a second time and fault it in again inside the restore.
  int own_slot = -1;
  for (int i = 0; i < 2; ++i) {
    if (rank == rank_ && slots_[i] != nullptr && !rk->shm_name().empty() &&
        rk->shm_name() == slot_names_[i]) {
      own_slot = i;
    }
  }
  STRATA_ASSIGN_OR_RETURN(Mapped m, own_slot >= 0 ? StatusOr<Mapped>(Mapped::Borrow(
                                                         slots_[own_slot], slot_bytes_))
                                                   : Mapped::Open(*rk));
  int64_t t_fault = 0, t_copy = 0;
  const int64_t t_mapped = NowNs();
  for (const SectionBuffer& b : out) {
    const proto::SnapshotSection* sec = nullptr;
    for (const auto& s : rk->sections()) {
      if (s.name() == b.name) sec = &s;
    }
    if (sec == nullptr) {
      return Status::NotFound(fmt::format("snapshot version {} rank {} has no section '{}'",
                                          info.version, rank, b.name));
    }
    if (sec->bytes() != b.bytes) {
      return Status::InvalidArgument(fmt::format(
          "snapshot version {} rank {} section '{}' holds {} bytes, the buffer {}", info.version,
          rank, b.name, sec->bytes(), b.bytes));
    }
    if (sec->offset() > m.size() || sec->bytes() > m.size() - sec->offset()) {
      return Status::Corruption(fmt::format(
          "snapshot version {} rank {} section '{}' lies past the end of its {} byte region",
          info.version, rank, b.name, m.size()));
    }
    const int64_t a = NowNs();
    // A source mapped here is left to fault in as memcpy reads it (fault-around maps 16 pages
    // per fault: faster than MADV_POPULATE_READ or MAP_POPULATE on shared memory, measured).
    PrefaultForWrite(b.dst, b.bytes);
    const int64_t c = NowNs();
    const uint32_t crc = CopyAndChecksum(b.dst, m.data() + sec->offset(), b.bytes);
    t_fault += c - a;
    t_copy += NowNs() - c;
    if (crc != sec->crc32c()) {
      return Status::Corruption(fmt::format(
          "snapshot version {} rank {} section '{}': CRC-32C {:08x}, manifest says {:08x}{}",
          info.version, rank, b.name, crc, sec->crc32c(), info.from_disk ? " (disk copy)" : ""));
    }
  }
  STRATA_LOG(DEBUG, CKPT,
             "rank {}: read snapshot version {}{}: map {:.3f} s, prefault {:.3f} s, copy and "
             "checksum {:.3f} s", rank, info.version,
             own_slot >= 0 ? " from its registered slot" : "", (t_mapped - t0) / 1e9,
             t_fault / 1e9, t_copy / 1e9);
  return Status::OK();
}

Status SnapshotClient::Finish() {
  proto::SnapshotRequest req;
  req.mutable_finish();
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  Unmap();
  rank_ = -1;
  return Status::OK();
}

StatusOr<std::string> SnapshotClient::Repair(int64_t version) {
  proto::SnapshotRequest req;
  req.mutable_repair()->set_version(version);
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  return reply.repair().note();
}

StatusOr<int> SnapshotClient::Ping() {
  proto::SnapshotRequest req;
  req.mutable_ping();
  STRATA_ASSIGN_OR_RETURN(proto::SnapshotReply reply, Call(req));
  return reply.ping().pid();
}

}  // namespace strata::checkpoint
