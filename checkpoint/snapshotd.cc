#include "checkpoint/snapshotd.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/logging.h"
#include "checkpoint/erasure.h"
#include "checkpoint/snapshot_ec.h"
#include "checkpoint/snapshot_wire.h"

namespace strata::checkpoint {
namespace {

namespace fs = std::filesystem;

constexpr int kReplyTimeoutMs = 2000;      // replies are small; a client that cannot take one
                                           // within this long is dropped
constexpr size_t kMaxConnections = 1024;   // local ranks are few; this only bounds abuse
constexpr int kMaxSections = 4096;
constexpr uint64_t kMaxBytesPerVersion = uint64_t{1} << 42;  // 4 TiB: a sanity bound

Status WriteFileDurably(const std::string& path, const uint8_t* data, size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(fmt::format("open {}", path), errno);
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, data + done, std::min<size_t>(n - done, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(fmt::format("write {}", path), err);
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus(fmt::format("fsync {}", path), err);
  }
  ::close(fd);
  return Status::OK();
}

Status FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(fmt::format("open {}", dir), errno);
  const int r = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  return r == 0 ? Status::OK() : ErrnoStatus(fmt::format("fsync {}", dir), err);
}

// "v123" -> 123; -1 for anything else.
int64_t ParseVersionDir(const std::string& name) {
  if (name.size() < 2 || name[0] != 'v') return -1;
  int64_t v = 0;
  for (size_t i = 1; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || v > (int64_t{1} << 58)) return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

}  // namespace

std::string SnapshotdSocketPath(const SnapshotdOptions& options) {
  return options.socket_path.empty() ? DefaultSocketPath(options.run) : options.socket_path;
}

StatusOr<std::unique_ptr<Snapshotd>> Snapshotd::Create(SnapshotdOptions options) {
  if (options.run.empty()) return Status::InvalidArgument("snapshotd: --run must name the job");
  if (options.persist_every < 0 || options.persist_keep < 0) {
    return Status::InvalidArgument("snapshotd: persist_every and persist_keep must be >= 0");
  }
  if (options.persist_every > 0 && options.persist_dir.empty()) {
    return Status::InvalidArgument("snapshotd: persist_every > 0 needs a persist_dir");
  }
  if (options.expected_local_ranks < 0) {
    return Status::InvalidArgument("snapshotd: expected_local_ranks must be >= 0");
  }
  if (options.peers.size() > 1) {
    const int nodes = static_cast<int>(options.peers.size());
    if (options.ec_k == 0 && options.ec_m == 0) {
      std::tie(options.ec_k, options.ec_m) = DefaultEcGroup(nodes);
    }
    if (options.ec_k < 1 || options.ec_m < 1 || nodes % (options.ec_k + options.ec_m) != 0) {
      return Status::InvalidArgument(fmt::format(
          "snapshotd: --ec {},{} does not fit {} nodes (need k >= 1, m >= 1 and groups of k + m "
          "nodes that divide the node count)", options.ec_k, options.ec_m, nodes));
    }
    if (options.node < 0 || options.node >= nodes) {
      return Status::InvalidArgument(
          fmt::format("snapshotd: --node {} outside the {} peers", options.node, nodes));
    }
  }
  const std::string path = SnapshotdSocketPath(options);
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::InvalidArgument(fmt::format("snapshotd: socket path too long: {}", path));
  }
  return std::unique_ptr<Snapshotd>(new Snapshotd(std::move(options)));
}

Snapshotd::Snapshotd(SnapshotdOptions options)
    : options_(std::move(options)),
      socket_path_(SnapshotdSocketPath(options_)),
      shm_run_(options_.shm_tag.empty() ? options_.run : options_.run + "." + options_.shm_tag) {}

Snapshotd::~Snapshotd() { Cleanup(); }

void Snapshotd::Stop() {
  stop_.store(true);
  if (wake_pipe_[1] >= 0) {
    const char c = 's';
    [[maybe_unused]] ssize_t r = ::write(wake_pipe_[1], &c, 1);
  }
}

Status Snapshotd::Bind() {
  // The lock decides who serves this socket: whoever holds it may remove a stale socket file and
  // bind. Without it two servers racing past a stale socket could both unlink and bind.
  const std::string lock_path = socket_path_ + ".lock";
  lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) return ErrnoStatus(fmt::format("snapshotd: open {}", lock_path), errno);
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(lock_fd_);
    lock_fd_ = -1;
    if (err == EWOULDBLOCK) {
      return Status::AlreadyExists(
          fmt::format("snapshotd: another snapshotd already serves {}", socket_path_));
    }
    return ErrnoStatus(fmt::format("snapshotd: flock {}", lock_path), err);
  }
  ::unlink(socket_path_.c_str());  // stale, from a server that died without cleaning up
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) return ErrnoStatus("snapshotd: socket", errno);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket_path_.c_str(), socket_path_.size() + 1);
  if (::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus(fmt::format("snapshotd: bind {}", socket_path_), errno);
  }
  if (::listen(listen_fd_, 64) != 0) return ErrnoStatus("snapshotd: listen", errno);
  if (::pipe2(wake_pipe_, O_CLOEXEC | O_NONBLOCK) != 0) return ErrnoStatus("pipe2", errno);
  return Status::OK();
}

Status Snapshotd::Run() {
  Status bound = Bind();
  if (options_.ready_fd >= 0) {
    ::close(options_.ready_fd);
    options_.ready_fd = -1;
  }
  if (!bound.ok()) {
    Cleanup();
    return bound;
  }
  STRATA_LOG(INFO, CKPT, "snapshotd run={} pid={} listening on {}", options_.run, ::getpid(),
             socket_path_);
  if (options_.persist_every > 0) persister_ = std::thread([this] { PersistLoop(); });
  if (options_.peers.size() > 1) {
    EcOptions eo;
    eo.peers = options_.peers;
    eo.node = options_.node;
    eo.k = options_.ec_k;
    eo.m = options_.ec_m;
    eo.listen = options_.listen;
    eo.shm_run = shm_run_;
    eo.threads = options_.ec_threads;
    if (options_.ec_io_timeout_ms > 0) eo.io_timeout_ms = options_.ec_io_timeout_ms;
    const int wake_fd = wake_pipe_[1];
    auto ec = EcPeer::Create(std::move(eo), [wake_fd] {
      const char c = 'e';
      [[maybe_unused]] ssize_t r = ::write(wake_fd, &c, 1);
    });
    Status started = ec.status();
    if (ec.ok()) {
      ec_ = std::move(*ec);
      started = ec_->Start();
    }
    if (!started.ok()) {
      Cleanup();
      return started;
    }
  }

  struct Conn {
    std::string in;
  };
  std::map<int, Conn> conns;
  int64_t idle_since = NowNs();
  bool finish = false;
  std::vector<char> rbuf(64 << 10);

  while (!stop_.load() && !finish) {
    std::vector<pollfd> pfds;
    pfds.push_back({wake_pipe_[0], POLLIN, 0});
    pfds.push_back({listen_fd_, POLLIN, 0});
    for (const auto& [fd, c] : conns) pfds.push_back({fd, POLLIN, 0});
    int timeout_ms = -1;
    if (conns.empty() && options_.idle_timeout_s > 0) {
      const int64_t deadline = idle_since + static_cast<int64_t>(options_.idle_timeout_s * 1e9);
      const int64_t left = deadline - NowNs();
      if (left <= 0) {
        STRATA_LOG(INFO, CKPT, "snapshotd run={}: idle for {} s with no client, exiting",
                   options_.run, options_.idle_timeout_s);
        break;
      }
      timeout_ms = static_cast<int>(std::min<int64_t>((left + 999999) / 1000000, 60000));
    }
    const int n = ::poll(pfds.data(), pfds.size(), timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      const Status st = ErrnoStatus("snapshotd: poll", errno);
      Cleanup();
      return st;
    }
    if (pfds[0].revents & POLLIN) {
      char drain[64];
      while (::read(wake_pipe_[0], drain, sizeof(drain)) > 0) {
      }
      ReapPersisted();
      if (ec_) ProcessEc();
    }
    if (pfds[1].revents & POLLIN) {
      for (;;) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) break;
        if (conns.size() >= kMaxConnections) {
          STRATA_LOG(WARN, CKPT, "snapshotd: {} connections already, refusing one", conns.size());
          ::close(fd);
          continue;
        }
        conns[fd] = Conn{};
      }
    }
    for (size_t i = 2; i < pfds.size() && !finish; ++i) {
      const int fd = pfds[i].fd;
      if (pfds[i].revents == 0) continue;
      Conn& c = conns[fd];
      bool close_it = false;
      const ssize_t r = ::recv(fd, rbuf.data(), rbuf.size(), MSG_DONTWAIT);
      if (r > 0) {
        c.in.append(rbuf.data(), static_cast<size_t>(r));
      } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        close_it = true;
      }
      // Serve every complete frame received so far.
      while (!close_it && c.in.size() >= 4) {
        const auto* h = reinterpret_cast<const uint8_t*>(c.in.data());
        const uint32_t len = static_cast<uint32_t>(h[0]) | static_cast<uint32_t>(h[1]) << 8 |
                             static_cast<uint32_t>(h[2]) << 16 | static_cast<uint32_t>(h[3]) << 24;
        proto::SnapshotReply reply;
        proto::SnapshotRequest req;
        bool malformed = false;
        if (len > kMaxFrameBytes) {
          malformed = true;
          reply.set_code(static_cast<int>(StatusCode::kInvalidArgument));
          reply.set_message(fmt::format("malformed snapshot frame: length {} exceeds the {} byte "
                                        "limit; closing the connection", len, kMaxFrameBytes));
        } else if (c.in.size() < 4 + static_cast<size_t>(len)) {
          break;  // wait for the rest of the frame
        } else if (!req.ParseFromArray(c.in.data() + 4, static_cast<int>(len)) ||
                   req.body_case() == proto::SnapshotRequest::BODY_NOT_SET) {
          malformed = true;
          reply.set_code(static_cast<int>(StatusCode::kInvalidArgument));
          reply.set_message(fmt::format("malformed snapshot frame: {} bytes are not a "
                                        "SnapshotRequest; closing the connection", len));
        } else {
          c.in.erase(0, 4 + static_cast<size_t>(len));
          reply = Handle(fd, req, &finish);
        }
        if (malformed) {
          STRATA_LOG(WARN, CKPT, "snapshotd: {}", reply.message());
          close_it = true;
        }
        Status sent = WriteFrame(fd, reply, kReplyTimeoutMs);
        if (!sent.ok()) {
          STRATA_LOG(WARN, CKPT, "snapshotd: dropping a client: {}", sent.ToString());
          close_it = true;
        }
        if (finish) break;
      }
      if (close_it) {
        CloseConn(fd);
        conns.erase(fd);
        if (conns.empty()) idle_since = NowNs();
      }
    }
  }
  if (finish) {
    STRATA_LOG(INFO, CKPT, "snapshotd run={}: finished by a client, cleaning up", options_.run);
  }
  for (auto& [fd, c] : conns) CloseConn(fd);
  conns.clear();
  Cleanup();
  return Status::OK();
}

void Snapshotd::CloseConn(int fd) {
  auto it = conn_rank_.find(fd);
  if (it != conn_rank_.end()) {
    auto r = ranks_.find(it->second);
    if (r != ranks_.end() && r->second.conn == fd) r->second.conn = -1;
    conn_rank_.erase(it);
  }
  ::close(fd);
}

void Snapshotd::Cleanup() {
  // The peer service reads slot memory: it stops before anything is unmapped.
  if (ec_) {
    ec_->Shutdown();
    ec_.reset();
  }
  // Persistence first: a version queued before Finish still reaches the disk, and nothing may
  // read a slot after it is unmapped.
  if (persister_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      persist_stop_ = true;
    }
    cv_.notify_all();
    persister_.join();
  }
  for (auto& [rank, st] : ranks_) {
    for (Slot& s : st.slots) {
      if (s.base != nullptr) ::munmap(s.base, SlotBytes(st.bytes_per_version));
      s.base = nullptr;
      if (!s.shm_name.empty()) ::shm_unlink(s.shm_name.c_str());
    }
  }
  ranks_.clear();
  conn_rank_.clear();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
    ::unlink(socket_path_.c_str());
  }
  for (int& fd : wake_pipe_) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  if (lock_fd_ >= 0) {
    // The lock file stays: removing it while another server opens it would let two servers hold
    // locks on different inodes of the same path.
    ::close(lock_fd_);
    lock_fd_ = -1;
  }
}

proto::SnapshotReply Snapshotd::Handle(int fd, const proto::SnapshotRequest& req, bool* finish) {
  proto::SnapshotReply reply;
  Status st;
  auto rank_of_conn = [&]() -> RankState* {
    auto it = conn_rank_.find(fd);
    if (it == conn_rank_.end()) return nullptr;
    auto r = ranks_.find(it->second);
    return r == ranks_.end() ? nullptr : &r->second;
  };
  switch (req.body_case()) {
    case proto::SnapshotRequest::kRegisterRank: {
      auto r = DoRegister(fd, req.register_rank());
      if (r.ok()) *reply.mutable_register_rank() = std::move(*r);
      st = r.status();
      break;
    }
    case proto::SnapshotRequest::kBeginVersion: {
      RankState* rs = rank_of_conn();
      if (rs == nullptr) {
        st = Status::FailedPrecondition("BeginVersion before Register on this connection");
        break;
      }
      auto r = DoBegin(*rs, req.begin_version());
      if (r.ok()) *reply.mutable_begin_version() = std::move(*r);
      st = r.status();
      break;
    }
    case proto::SnapshotRequest::kPublish: {
      RankState* rs = rank_of_conn();
      if (rs == nullptr) {
        st = Status::FailedPrecondition("Publish before Register on this connection");
        break;
      }
      auto r = DoPublish(*rs, req.publish());
      if (r.ok()) *reply.mutable_publish() = std::move(*r);
      st = r.status();
      break;
    }
    case proto::SnapshotRequest::kLatest:
    {
      auto r = DoLatest(req.latest().max_disk_version());
      if (r.ok()) *reply.mutable_latest() = std::move(*r);
      st = r.status();
      break;
    }
    case proto::SnapshotRequest::kRepair: {
      auto r = DoRepair(req.repair().version());
      if (r.ok()) *reply.mutable_repair() = std::move(*r);
      st = r.status();
      break;
    }
    case proto::SnapshotRequest::kFinish:
      reply.mutable_finish();
      *finish = true;
      break;
    case proto::SnapshotRequest::kPing:
      reply.mutable_ping()->set_pid(::getpid());
      reply.mutable_ping()->set_run(options_.run);
      break;
    case proto::SnapshotRequest::BODY_NOT_SET:
      st = Status::InvalidArgument("empty request");
      break;
  }
  if (!st.ok()) {
    reply.clear_body();
    reply.set_code(static_cast<int>(st.code()));
    reply.set_message(st.message());
    STRATA_LOG(DEBUG, CKPT, "snapshotd: request failed: {}", st.ToString());
  }
  return reply;
}

StatusOr<Snapshotd::RankState*> Snapshotd::OpenRank(int rank, int world, size_t bytes,
                                                     bool* reattached_out) {
  const size_t slot_bytes = SlotBytes(bytes);
  RankState st;
  st.rank = rank;
  st.world_size = world;
  st.bytes_per_version = bytes;
  bool reattached_all = true;
  for (int i = 0; i < 2; ++i) {
    Slot& s = st.slots[i];
    s.shm_name = SlotShmName(shm_run_, rank, i);
    const int shm = ::shm_open(s.shm_name.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    Status err;
    if (shm < 0) err = ErrnoStatus(fmt::format("shm_open {}", s.shm_name), errno);
    struct stat sb {};
    bool reattached = false;
    if (err.ok() && ::fstat(shm, &sb) != 0) err = ErrnoStatus("fstat shm", errno);
    if (err.ok()) {
      reattached = static_cast<size_t>(sb.st_size) == slot_bytes;
      if (!reattached) {
        // Fresh, or left by a job of another size: start from zeros. posix_fallocate reserves
        // the pages now so a full /dev/shm is an error here rather than SIGBUS in a trainer.
        if (::ftruncate(shm, 0) != 0 || ::ftruncate(shm, static_cast<off_t>(slot_bytes)) != 0) {
          err = ErrnoStatus(fmt::format("ftruncate {}", s.shm_name), errno);
        } else if (const int e = ::posix_fallocate(shm, 0, static_cast<off_t>(slot_bytes));
                   e != 0) {
          err = e == ENOSPC ? Status::ResourceExhausted(fmt::format(
                                  "shared memory full: cannot reserve {} bytes for {}",
                                  slot_bytes, s.shm_name))
                            : ErrnoStatus(fmt::format("posix_fallocate {}", s.shm_name), e);
        }
      }
    }
    if (err.ok()) {
      void* p = ::mmap(nullptr, slot_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, shm, 0);
      if (p == MAP_FAILED) {
        err = ErrnoStatus(fmt::format("mmap {}", s.shm_name), errno);
      } else {
        s.base = static_cast<uint8_t*>(p);
      }
    }
    if (shm >= 0) ::close(shm);
    if (!err.ok()) {
      for (Slot& u : st.slots) {
        if (u.base != nullptr) ::munmap(u.base, slot_bytes);
        if (!u.shm_name.empty()) ::shm_unlink(u.shm_name.c_str());
      }
      return err;
    }
    reattached_all = reattached_all && reattached;
    if (reattached) {
      // What this slot held for a snapshotd that died: only committed versions matter (see
      // RecoverFromSlots); anything else is treated as free.
      // A published version is kept too (its sections are in the room): the other local ranks
      // may have published it as well before the snapshotd died, which commits it here.
      auto m = ReadSlotManifest(s.base, bytes);
      if (m.ok() && m->ranks_size() == 1 && m->ranks(0).rank() == rank &&
          (m->committed() || m->ranks(0).sections_size() > 0)) {
        s.version = m->version();
        s.published = true;
        s.sections.assign(m->ranks(0).sections().begin(), m->ranks(0).sections().end());
      }
    }
  }
  world_size_ = world;
  *reattached_out = reattached_all;
  RankState& placed = ranks_[rank];
  placed = std::move(st);
  return &placed;
}

StatusOr<proto::RegisterReply> Snapshotd::DoRegister(int fd, const proto::RegisterRequest& r) {
  if (r.world_size() <= 0 || r.rank() < 0 || r.rank() >= r.world_size()) {
    return Status::InvalidArgument(
        fmt::format("Register: rank {} of world size {} is invalid", r.rank(), r.world_size()));
  }
  if (r.bytes_per_version() == 0 || r.bytes_per_version() > kMaxBytesPerVersion) {
    return Status::InvalidArgument(
        fmt::format("Register: bytes_per_version {} out of range", r.bytes_per_version()));
  }
  if (world_size_ != 0 && r.world_size() != world_size_) {
    return Status::FailedPrecondition(fmt::format(
        "Register: rank {} says world size {}, this run's ranks said {}", r.rank(),
        r.world_size(), world_size_));
  }
  auto prev = conn_rank_.find(fd);
  if (prev != conn_rank_.end() && prev->second != r.rank()) {
    return Status::FailedPrecondition(fmt::format(
        "Register: this connection is already rank {}; use one connection per rank",
        prev->second));
  }
  proto::RegisterReply reply;
  const size_t bytes = r.bytes_per_version();
  const size_t slot_bytes = SlotBytes(bytes);
  if (ranks_.empty() && committed_version_ < 0) AdoptSurvivingRanks(r.rank(), r.world_size());
  if (!ranks_.count(r.rank())) DropAdoptedStrangers();
  auto existing = ranks_.find(r.rank());
  if (existing != ranks_.end()) {
    RankState& st = existing->second;
    if (st.bytes_per_version != bytes) {
      return Status::FailedPrecondition(fmt::format(
          "Register: rank {} registered {} bytes per version before, now {}; a different job "
          "needs a different --run",
          r.rank(), st.bytes_per_version, bytes));
    }
    if (st.conn >= 0 && st.conn != fd) {
      STRATA_LOG(WARN, CKPT, "snapshotd: rank {} re-registered on a new connection; the old one "
                             "no longer speaks for it", r.rank());
      conn_rank_.erase(st.conn);
    }
    st.conn = fd;
    st.adopted = false;
    conn_rank_[fd] = r.rank();
    for (const Slot& s : st.slots) reply.add_shm_names(s.shm_name);
    reply.set_slot_bytes(slot_bytes);
    reply.set_reattached(true);
    STRATA_LOG(INFO, CKPT, "snapshotd: rank {} reattached (committed version {})", r.rank(),
               committed_version_);
    return reply;
  }

  bool reattached_all = false;
  STRATA_ASSIGN_OR_RETURN(RankState * created,
                          OpenRank(r.rank(), r.world_size(), bytes, &reattached_all));
  RankState& st = *created;
  st.conn = fd;
  conn_rank_[fd] = r.rank();
  for (const Slot& s : st.slots) reply.add_shm_names(s.shm_name);
  reply.set_slot_bytes(slot_bytes);
  reply.set_reattached(reattached_all);
  STRATA_LOG(INFO, CKPT, "snapshotd: rank {}/{} registered, {} bytes per version{}", r.rank(),
             r.world_size(), bytes, reattached_all ? " (existing shared memory)" : "");
  if (committed_version_ < 0 || recovered_) RecoverFromSlots();
  return reply;
}

void Snapshotd::AdoptSurvivingRanks(int registering, int world) {
  if (options_.expected_local_ranks <= 1) return;  // one rank: it registers itself
  // Which ranks of this world left both slots here, each with a manifest room this run wrote.
  std::map<int, size_t> found;  // rank -> bytes_per_version
  for (int rank = 0; rank < world; ++rank) {
    size_t bytes = 0;
    bool ok = true;
    for (int i = 0; i < 2 && ok; ++i) {
      const std::string name = SlotShmName(shm_run_, rank, i);
      const int fd = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
      if (fd < 0) {
        ok = false;
        break;
      }
      struct stat sb {};
      ok = ::fstat(fd, &sb) == 0 && static_cast<size_t>(sb.st_size) > kManifestRoomBytes &&
           (static_cast<size_t>(sb.st_size) - kManifestRoomBytes) % kSlotAlign == 0;
      void* room = MAP_FAILED;
      if (ok) {
        room = ::mmap(nullptr, kManifestRoomBytes, PROT_READ, MAP_SHARED, fd,
                      static_cast<off_t>(sb.st_size - kManifestRoomBytes));
      }
      ::close(fd);
      if (room == MAP_FAILED) {
        ok = false;
        break;
      }
      // The room read as the slot of a version of zero data bytes: it starts the mapping.
      auto m = ReadSlotManifest(static_cast<const uint8_t*>(room), 0);
      ::munmap(room, kManifestRoomBytes);
      if (!m.ok()) continue;  // never written (a slot not used yet): the other decides
      ok = m->run() == options_.run && m->world_size() == world && m->ranks_size() == 1 &&
           m->ranks(0).rank() == rank &&
           SlotBytes(m->ranks(0).bytes_per_version()) == static_cast<size_t>(sb.st_size) &&
           (bytes == 0 || bytes == m->ranks(0).bytes_per_version());
      bytes = m->ranks(0).bytes_per_version();
    }
    if (ok && bytes > 0) found[rank] = bytes;
  }
  // Only the exact set a restarted snapshotd expects: anything else is not this node's ranks
  // of this launch (e.g. a relaunch mapped ranks to nodes differently), and they register.
  if (static_cast<int>(found.size()) != options_.expected_local_ranks ||
      !found.count(registering)) {
    return;
  }
  for (const auto& [rank, bytes] : found) {
    bool reattached = false;
    StatusOr<RankState*> st = OpenRank(rank, world, bytes, &reattached);
    if (!st.ok()) {
      STRATA_LOG(WARN, CKPT, "snapshotd: adopting rank {}'s surviving slots: {}", rank,
                 st.status().ToString());
      for (auto& [r, rs] : ranks_) {
        for (Slot& s : rs.slots) {
          if (s.base != nullptr) ::munmap(s.base, SlotBytes(rs.bytes_per_version));
        }
      }
      ranks_.clear();
      world_size_ = 0;
      return;
    }
    (*st)->adopted = true;
  }
  STRATA_LOG(INFO, CKPT, "snapshotd: found the shared memory of all {} local ranks of a "
                         "snapshotd that served this run before; adopting it",
             found.size());
  RecoverFromSlots();
}

void Snapshotd::DropAdoptedStrangers() {
  // A rank registering that was not adopted, on a node that has all its expected ranks: the
  // adopted ranks that never registered are not this launch's ranks here. Forget them (their
  // shared memory stays until the run finishes) and recover from the ranks that are.
  if (options_.expected_local_ranks <= 0 ||
      static_cast<int>(ranks_.size()) < options_.expected_local_ranks) {
    return;
  }
  bool dropped = false;
  for (auto it = ranks_.begin(); it != ranks_.end();) {
    if (!it->second.adopted) {
      ++it;
      continue;
    }
    STRATA_LOG(WARN, CKPT, "snapshotd: rank {} left shared memory here but another rank "
                           "registered in its place; not counting it", it->first);
    for (Slot& s : it->second.slots) {
      if (s.base != nullptr) ::munmap(s.base, SlotBytes(it->second.bytes_per_version));
    }
    it = ranks_.erase(it);
    dropped = true;
  }
  if (dropped) {
    committed_version_ = -1;
    committed_.Clear();
    recovered_ = false;
    for (auto& [rank, st] : ranks_) st.committed_slot = -1;
  }
}

void Snapshotd::RecoverFromSlots() {
  // The newest version that every registered rank holds as committed in one of its slots.
  std::set<int64_t> common;
  bool first = true;
  for (const auto& [rank, st] : ranks_) {
    std::set<int64_t> mine;
    for (const Slot& s : st.slots) {
      if (s.published && s.version >= 0) mine.insert(s.version);
    }
    if (first) {
      common = std::move(mine);
      first = false;
    } else {
      std::set<int64_t> both;
      std::set_intersection(common.begin(), common.end(), mine.begin(), mine.end(),
                            std::inserter(both, both.begin()));
      common = std::move(both);
    }
  }
  const bool enough = options_.expected_local_ranks == 0 ||
                      static_cast<int>(ranks_.size()) >= options_.expected_local_ranks;
  if (common.empty() || !enough) {
    if (recovered_) {
      committed_version_ = -1;
      committed_.Clear();
      for (auto& [rank, st] : ranks_) st.committed_slot = -1;
    }
    return;
  }
  const int64_t v = *common.rbegin();
  // Re-derive the commit from scratch: the set of ranks may have grown since the last recovery.
  committed_version_ = -1;
  for (auto& [rank, st] : ranks_) st.committed_slot = -1;
  bool committed = false;
  MaybeCommit(v, &committed, /*recovering=*/true);
  recovered_ = committed;
  STRATA_LOG(INFO, CKPT, "snapshotd: recovered committed version {} from surviving shared memory",
             v);
}

StatusOr<proto::BeginVersionReply> Snapshotd::DoBegin(RankState& st,
                                                      const proto::BeginVersionRequest& r) {
  const int64_t v = r.version();
  if (v < 0) return Status::InvalidArgument(fmt::format("BeginVersion: version {} < 0", v));
  if (ec_ && v <= committed_version_ && v > group_version_) {
    // A restarted trainer redoes versions that committed here but never across the group
    // (Latest() sent it back to the group-committed one): forget them locally and in the group.
    STRATA_LOG(INFO, CKPT, "snapshotd: version {} redone; rolling back to group-committed {}", v,
               group_version_);
    ec_->Withdraw(group_version_);
    committed_version_ = group_version_;
    committed_ = group_manifest_;
    for (auto& [rank, rs] : ranks_) {
      rs.committed_slot = -1;
      for (const auto& rk : group_manifest_.ranks()) {
        if (rk.rank() == rank) rs.committed_slot = rk.slot();
      }
    }
  }
  if (v <= committed_version_) {
    return Status::FailedPrecondition(fmt::format(
        "BeginVersion({}): version {} is already committed; versions must increase", v,
        committed_version_));
  }
  if (ec_) WithdrawStalled();
  int best = -1;
  std::string why;
  for (int i = 0; i < 2; ++i) {
    if (i == st.committed_slot) continue;
    const Slot& s = st.slots[i];
    if (s.pins > 0) {
      why = fmt::format("slot {} is pinned (being persisted to disk, or holding a version that "
                        "erasure coding across nodes still protects)", i);
      continue;
    }
    if (s.published && s.version > committed_version_ && s.version < v) {
      why = fmt::format("version {} is published by rank {} but not committed yet (other local "
                        "ranks have not published it)", s.version, st.rank);
      continue;
    }
    if (best < 0 || st.slots[best].version > s.version) best = i;
  }
  if (best < 0) {
    return Status::Unavailable(fmt::format("BeginVersion({}) for rank {}: busy: {}", v, st.rank,
                                           why));
  }
  Slot& s = st.slots[best];
  s.version = v;
  s.published = false;
  s.sections.clear();
  // The slot's manifest room must stop claiming the version it held before we overwrite data.
  STRATA_RETURN_IF_ERROR(WriteUncommittedManifest(st, best, v));
  proto::BeginVersionReply reply;
  reply.set_slot(best);
  return reply;
}

Status Snapshotd::WriteUncommittedManifest(RankState& st, int slot, int64_t version) {
  const Slot& s = st.slots[slot];
  proto::SnapshotManifest m;
  m.set_run(options_.run);
  m.set_version(version);
  m.set_world_size(st.world_size);
  m.set_committed(false);
  proto::RankSnapshot* rk = m.add_ranks();
  rk->set_rank(st.rank);
  rk->set_shm_name(s.shm_name);
  rk->set_slot(slot);
  rk->set_bytes_per_version(st.bytes_per_version);
  for (const proto::SnapshotSection& sec : s.sections) *rk->add_sections() = sec;
  return WriteSlotManifest(s.base, st.bytes_per_version, m);
}

StatusOr<proto::PublishReply> Snapshotd::DoPublish(RankState& st, const proto::PublishRequest& r) {
  const int64_t v = r.version();
  int idx = -1;
  for (int i = 0; i < 2; ++i) {
    if (st.slots[i].version == v && !st.slots[i].published && i != st.committed_slot) idx = i;
  }
  if (idx < 0) {
    return Status::FailedPrecondition(
        fmt::format("Publish({}) for rank {}: no BeginVersion({}) in progress", v, st.rank, v));
  }
  if (r.sections_size() > kMaxSections) {
    return Status::InvalidArgument(fmt::format("Publish: {} sections, limit {}",
                                               r.sections_size(), kMaxSections));
  }
  std::set<std::string> names;
  for (const proto::SnapshotSection& sec : r.sections()) {
    if (sec.name().empty() || !names.insert(sec.name()).second) {
      return Status::InvalidArgument(
          fmt::format("Publish: section name '{}' empty or repeated", sec.name()));
    }
    if (sec.offset() > st.bytes_per_version ||
        sec.bytes() > st.bytes_per_version - sec.offset()) {
      return Status::InvalidArgument(fmt::format(
          "Publish: section '{}' [{}, +{}) exceeds the {} bytes registered for rank {}",
          sec.name(), sec.offset(), sec.bytes(), st.bytes_per_version, st.rank));
    }
  }
  Slot& s = st.slots[idx];
  s.sections.assign(r.sections().begin(), r.sections().end());
  s.published = true;
  STRATA_RETURN_IF_ERROR(WriteUncommittedManifest(st, idx, v));
  bool committed = false;
  MaybeCommit(v, &committed);
  proto::PublishReply reply;
  reply.set_committed(committed);
  reply.set_committed_version(committed_version_);
  return reply;
}

void Snapshotd::MaybeCommit(int64_t version, bool* committed, bool recovering) {
  *committed = false;
  if (version <= committed_version_) return;
  const size_t needed = options_.expected_local_ranks > 0
                            ? static_cast<size_t>(options_.expected_local_ranks)
                            : ranks_.size();
  if (ranks_.size() < needed || ranks_.empty()) return;
  std::map<int, int> slot_of;
  for (const auto& [rank, st] : ranks_) {
    for (int i = 0; i < 2; ++i) {
      if (st.slots[i].version == version && st.slots[i].published) slot_of[rank] = i;
    }
    if (!slot_of.count(rank)) return;  // this rank has not published `version`
  }
  proto::SnapshotManifest m;
  m.set_run(options_.run);
  m.set_version(version);
  m.set_world_size(world_size_);
  m.set_committed(true);
  m.set_commit_time_ns(NowNs());
  for (auto& [rank, st] : ranks_) {
    const int i = slot_of[rank];
    Slot& s = st.slots[i];
    proto::RankSnapshot* rk = m.add_ranks();
    rk->set_rank(rank);
    rk->set_shm_name(s.shm_name);
    rk->set_slot(i);
    rk->set_bytes_per_version(st.bytes_per_version);
    for (const auto& sec : s.sections) *rk->add_sections() = sec;
    // Mark the slot committed in its own manifest room, so a snapshotd restarted over surviving
    // shared memory can find the committed version again.
    proto::SnapshotManifest own = m;
    own.clear_ranks();
    *own.add_ranks() = *rk;
    Status w = WriteSlotManifest(s.base, st.bytes_per_version, own);
    if (!w.ok()) STRATA_LOG(WARN, CKPT, "snapshotd: slot manifest: {}", w.ToString());
    st.committed_slot = i;
  }
  committed_ = std::move(m);
  committed_version_ = version;
  recovered_ = false;
  *committed = true;
  if (recovering) return;  // counted and persisted when it first committed
  ++commits_;
  STRATA_LOG(DEBUG, CKPT, "snapshotd run={}: version {} committed ({} local ranks)", options_.run,
             version, ranks_.size());
  if (ec_) SubmitToEc();
  // By version, not by count of commits here: the snapshotds of a job's nodes then persist the
  // same versions even when one of them was restarted (or rebuilt) mid-run, so every node has
  // the version a disk fallback needs.
  if (options_.persist_every > 0 && version % options_.persist_every == 0) {
    PersistJob job;
    job.manifest = committed_;
    for (auto& [rank, st] : ranks_) {
      Slot& s = st.slots[st.committed_slot];
      ++s.pins;
      job.pinned.push_back({rank, st.committed_slot});
      job.bases.push_back(s.base);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
}

StatusOr<proto::LatestReply> Snapshotd::DoLatest(int64_t max_disk_version) {
  proto::LatestReply reply;
  Status ec_error;
  if (ec_) {
    ProcessEc();
    if (group_version_ >= 0) {
      reply.set_found(true);
      reply.set_parity_protected(true);
      *reply.mutable_manifest() = group_manifest_;
      if (group_version_ == rebuilt_version_) {
        reply.set_rebuilt(true);
        reply.set_note(rebuilt_note_);
        reply.set_rebuilt_from_nodes(rebuilt_from_nodes_);
      }
      return reply;
    }
    if (committed_version_ < 0) {
      auto rebuilt = ec_->Rebuild(
          [this](const proto::EcNodeManifest& m) { return RebuildSlots(m); });
      if (rebuilt.ok()) {
        STRATA_RETURN_IF_ERROR(InstallRebuilt(*rebuilt));
        reply.set_found(true);
        reply.set_parity_protected(true);
        reply.set_rebuilt(true);
        reply.set_note(rebuilt_note_);
        reply.set_rebuilt_from_nodes(rebuilt_from_nodes_);
        *reply.mutable_manifest() = group_manifest_;
        return reply;
      }
      if (rebuilt.status().code() != StatusCode::kNotFound) ec_error = rebuilt.status();
    } else {
      reply.set_found(true);
      reply.set_note("committed on this node only; not yet protected by parity across nodes");
      *reply.mutable_manifest() = committed_;
      return reply;
    }
  }
  if (committed_version_ >= 0) {
    reply.set_found(true);
    *reply.mutable_manifest() = committed_;
    return reply;
  }
  if (!options_.persist_dir.empty()) {
    auto disk = LatestFromDisk(max_disk_version);
    if (disk.ok()) {
      if (!ec_error.ok()) disk->set_note(ec_error.message());
      return std::move(*disk);
    }
    if (disk.status().code() != StatusCode::kNotFound) {
      STRATA_LOG(WARN, CKPT, "snapshotd: reading {}: {}", options_.persist_dir,
                 disk.status().ToString());
    }
  }
  if (!ec_error.ok()) return ec_error;
  reply.set_found(false);
  return reply;
}

StatusOr<proto::RepairReply> Snapshotd::DoRepair(int64_t version) {
  if (!ec_) {
    return Status::FailedPrecondition(
        "this snapshotd does not erasure-code across nodes: nothing to repair a corrupted "
        "snapshot from (resume from disk, or start the run again)");
  }
  ProcessEc();
  if (version != group_version_) {
    return Status::FailedPrecondition(fmt::format(
        "version {} is not the group-committed version of node {} ({}): only that one has "
        "parity to repair from", version, options_.node, group_version_));
  }
  STRATA_ASSIGN_OR_RETURN(EcRepaired r, ec_->RepairLocal(version));
  proto::RepairReply reply;
  reply.set_repaired(r.repaired);
  reply.set_note(r.repaired ? r.note
                            : fmt::format("node {}'s data of version {} is intact", options_.node,
                                          version));
  return reply;
}

void Snapshotd::SubmitToEc() {
  EcLocal local;
  local.manifest = committed_;
  proto::EcNodeManifest em;
  em.set_world_size(world_size_);
  std::vector<EcSegment> segments;
  // The node buffer: ranks ascending (ranks_ is ordered), each rank's whole slot data.
  for (auto& [rank, st] : ranks_) {
    Slot& s = st.slots[st.committed_slot];
    ++s.pins;  // held until the EcPeer releases the version
    local.pinned.push_back({rank, st.committed_slot});
    segments.push_back({s.base, st.bytes_per_version});
  }
  *em.mutable_ranks() = committed_.ranks();
  ec_local_[committed_version_] = std::move(local);
  ec_->SubmitLocal(committed_version_, std::move(em), std::move(segments));
}

void Snapshotd::WithdrawStalled() {
  ProcessEc();
  const std::vector<int64_t> stalled = ec_->StalledLocal();
  if (stalled.empty()) return;
  // Older local versions that will never group-commit only hold slots: let them go.
  for (int64_t w : stalled) {
    if (w < committed_version_ && w > group_version_) ec_->WithdrawVersion(w);
  }
  // The newest local version, when it is stalled and the other slot of every rank holds the
  // group-committed version: one of the two must go for the next version to have a slot. The
  // group-committed one stays: it is what every node can resume from, parity included.
  if (committed_version_ <= group_version_ || group_version_ < 0 ||
      !std::binary_search(stalled.begin(), stalled.end(), committed_version_)) {
    return;
  }
  STRATA_LOG(INFO, CKPT, "snapshotd node {}: version {} withdrawn (it cannot commit across the "
                         "group); back to group-committed version {}",
             options_.node, committed_version_, group_version_);
  const int64_t withdrawn = committed_version_;
  ec_->Withdraw(group_version_);
  for (auto& [rank, st] : ranks_) {
    st.committed_slot = -1;
    for (const auto& rk : group_manifest_.ranks()) {
      if (rk.rank() == rank) st.committed_slot = rk.slot();
    }
    for (int i = 0; i < 2; ++i) {
      Slot& s = st.slots[i];
      if (s.version != withdrawn || i == st.committed_slot) continue;
      // No longer a version of this node: a restarted snapshotd must not find it committed.
      s.published = false;
      s.sections.clear();
      Status w = WriteUncommittedManifest(st, i, withdrawn);
      if (!w.ok()) STRATA_LOG(WARN, CKPT, "snapshotd: slot manifest: {}", w.ToString());
    }
  }
  committed_version_ = group_version_;
  committed_ = group_manifest_;
}

void Snapshotd::ProcessEc() {
  for (int64_t v : ec_->TakeReleased()) {
    auto it = ec_local_.find(v);
    if (it == ec_local_.end()) continue;
    for (const auto& [rank, slot] : it->second.pinned) {
      auto r = ranks_.find(rank);
      if (r != ranks_.end() && r->second.slots[slot].pins > 0) --r->second.slots[slot].pins;
    }
    ec_local_.erase(it);
  }
  const int64_t g = ec_->group_version();
  if (g > group_version_) {
    auto it = ec_local_.find(g);
    if (it != ec_local_.end()) {
      group_version_ = g;
      group_manifest_ = it->second.manifest;
      STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: version {} group-committed", options_.node, g);
    }
  }
}

StatusOr<std::vector<EcSegment>> Snapshotd::RebuildSlots(const proto::EcNodeManifest& m,
                                                          std::vector<Slot*>* slots) {
  std::vector<EcSegment> segments;
  if (slots != nullptr) slots->clear();
  for (const proto::RankSnapshot& rk : m.ranks()) {
    const size_t bytes = rk.bytes_per_version();
    RankState* st = nullptr;
    auto it = ranks_.find(rk.rank());
    if (it != ranks_.end()) {
      st = &it->second;
      if (st->bytes_per_version != bytes) {
        return Status::FailedPrecondition(fmt::format(
            "rank {} registered {} bytes per version; the rebuilt snapshot holds {}", rk.rank(),
            st->bytes_per_version, bytes));
      }
    } else {
      bool reattached = false;
      STRATA_ASSIGN_OR_RETURN(st, OpenRank(rk.rank(), m.world_size(), bytes, &reattached));
    }
    Slot& slot = st->slots[st->committed_slot == 0 ? 1 : 0];
    if (slot.pins > 0) return Status::Unavailable("slot busy; retry");
    segments.push_back({slot.base, bytes});
    if (slots != nullptr) slots->push_back(&slot);
  }
  return segments;
}

Status Snapshotd::InstallRebuilt(EcRebuilt& rebuilt) {
  const int64_t t0 = NowNs();
  const proto::EcNodeManifest& m = rebuilt.manifest;
  // The same slots RebuildSlots gave a streaming rebuild (nothing changed them since).
  std::vector<Slot*> slots;
  STRATA_ASSIGN_OR_RETURN(std::vector<EcSegment> segments, RebuildSlots(m, &slots));
  size_t off = 0;
  for (int r = 0; r < m.ranks_size(); ++r) {
    const proto::RankSnapshot& rk = m.ranks(r);
    const size_t bytes = rk.bytes_per_version();
    if (!rebuilt.in_place) {
      if (off + bytes > rebuilt.data.size()) {
        return Status::Corruption("rebuilt node buffer is shorter than its manifest says");
      }
      std::memcpy(const_cast<uint8_t*>(segments[r].data), rebuilt.data.as<uint8_t>() + off,
                  bytes);
    }
    Slot& s = *slots[r];
    s.version = rebuilt.version;
    s.published = true;
    s.sections.assign(rk.sections().begin(), rk.sections().end());
    off += bytes;
  }
  STRATA_LOG(DEBUG, CKPT, "snapshotd: rebuilt version {} {} the slots in {:.3f} s",
             rebuilt.version, rebuilt.in_place ? "(decoded in place) installed in" : "copied into",
             (NowNs() - t0) / 1e9);
  world_size_ = m.world_size();
  committed_version_ = -1;
  for (auto& [rank, st] : ranks_) st.committed_slot = -1;
  bool committed = false;
  MaybeCommit(rebuilt.version, &committed, /*recovering=*/true);
  if (!committed) {
    return Status::FailedPrecondition(fmt::format(
        "rebuilt version {} does not cover every rank registered on this node", rebuilt.version));
  }
  recovered_ = false;
  EcLocal local;
  local.manifest = committed_;
  for (auto& [rank, st] : ranks_) {
    ++st.slots[st.committed_slot].pins;
    local.pinned.push_back({rank, st.committed_slot});
  }
  ec_local_[rebuilt.version] = std::move(local);
  ec_->AdoptRebuilt(rebuilt, std::move(segments));
  group_version_ = rebuilt.version;
  group_manifest_ = committed_;
  rebuilt_version_ = rebuilt.version;
  rebuilt_from_nodes_ = ec_->group_size() - static_cast<int>(rebuilt.missing.size());
  std::string missing, repaired;
  for (int n : rebuilt.missing) missing += fmt::format("{}{}", missing.empty() ? "" : ",", n);
  for (int n : rebuilt.repaired) repaired += fmt::format("{}{}", repaired.empty() ? "" : ",", n);
  rebuilt_note_ = fmt::format(
      "version {} of node {} was rebuilt by erasure decoding (k={} m={}, lost nodes {}; {}) in "
      "{:.3f} s{}", rebuilt.version, options_.node, options_.ec_k, options_.ec_m, missing,
      !rebuilt.in_place        ? "whole buffers fetched"
      : rebuilt.parity_pending ? "streamed, decoded in place; its parity follows in the background"
                               : "streamed, decoded in place",
      rebuilt.seconds,
      repaired.empty() ? "" : "; repaired corrupted parity of nodes " + repaired);
  STRATA_LOG(INFO, CKPT, "snapshotd: {}", rebuilt_note_);
  return Status::OK();
}

StatusOr<proto::LatestReply> Snapshotd::LatestFromDisk(int64_t max_version) const {
  const fs::path root = fs::path(options_.persist_dir) / SanitizeRunName(options_.run);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return Status::NotFound("no persisted versions");
  std::vector<std::pair<int64_t, fs::path>> versions;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t v = ParseVersionDir(e.path().filename().string());
    if (v >= 0 && (max_version <= 0 || v <= max_version) && e.is_directory(ec)) {
      versions.push_back({v, e.path()});
    }
  }
  std::sort(versions.rbegin(), versions.rend());
  for (const auto& [v, dir] : versions) {
    // A directory named v<N> only exists after its rename, so it is complete unless the disk
    // lost it since; check anyway and fall back to an older one.
    std::string bytes;
    {
      const std::string mpath = (dir / "manifest.pb").string();
      const int fd = ::open(mpath.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) continue;
      char buf[65536];
      ssize_t r;
      while ((r = ::read(fd, buf, sizeof(buf))) > 0 && bytes.size() < kMaxFrameBytes) {
        bytes.append(buf, static_cast<size_t>(r));
      }
      ::close(fd);
    }
    proto::SnapshotManifest m;
    if (!m.ParseFromString(bytes) || !m.committed() || m.version() != v) {
      STRATA_LOG(WARN, CKPT, "snapshotd: {} has no valid manifest, skipping", dir.string());
      continue;
    }
    bool complete = true;
    for (proto::RankSnapshot& rk : *m.mutable_ranks()) {
      const fs::path file = dir / rk.path();
      uint64_t end = 0;
      for (const auto& sec : rk.sections()) end = std::max<uint64_t>(end, sec.offset() + sec.bytes());
      if (!fs::is_regular_file(file, ec) || fs::file_size(file, ec) < end) complete = false;
      rk.set_path(file.string());
    }
    if (!complete) {
      STRATA_LOG(WARN, CKPT, "snapshotd: {} is missing rank files, skipping", dir.string());
      continue;
    }
    proto::LatestReply reply;
    reply.set_found(true);
    reply.set_from_disk(true);
    reply.set_disk_dir(dir.string());
    *reply.mutable_manifest() = std::move(m);
    return reply;
  }
  return Status::NotFound("no complete persisted version");
}

void Snapshotd::PersistLoop() {
  for (;;) {
    PersistJob job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return persist_stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop requested and nothing left to write
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    const int64_t t0 = NowNs();
    Status st = PersistOne(job);
    if (st.ok()) {
      STRATA_LOG(INFO, CKPT, "snapshotd: version {} persisted in {:.1f} ms",
                 job.manifest.version(), (NowNs() - t0) / 1e6);
    } else {
      STRATA_LOG(ERROR, CKPT, "snapshotd: persisting version {} failed: {}",
                 job.manifest.version(), st.ToString());
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.push_back(std::move(job));
    }
    if (wake_pipe_[1] >= 0) {
      const char c = 'p';
      [[maybe_unused]] ssize_t r = ::write(wake_pipe_[1], &c, 1);
    }
  }
}

Status Snapshotd::PersistOne(const PersistJob& job) {
  const fs::path root = fs::path(options_.persist_dir) / SanitizeRunName(options_.run);
  const int64_t v = job.manifest.version();
  const fs::path tmp = root / fmt::format(".tmp-v{}", v);
  const fs::path final_dir = root / fmt::format("v{}", v);
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return Status::IOError(fmt::format("mkdir {}: {}", root.string(), ec.message()));
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  if (ec) return Status::IOError(fmt::format("mkdir {}: {}", tmp.string(), ec.message()));
  proto::SnapshotManifest disk = job.manifest;
  for (int i = 0; i < disk.ranks_size(); ++i) {
    proto::RankSnapshot* rk = disk.mutable_ranks(i);
    const uint8_t* base = job.bases[i];
    uint64_t end = 0;
    for (const auto& sec : rk->sections()) {
      // Never persist a corrupted section: verifying here costs one read of data being read anyway.
      if (FragmentChecksum(base + sec.offset(), sec.bytes()) != sec.crc32c()) {
        fs::remove_all(tmp, ec);
        return Status::Corruption(fmt::format(
            "version {} rank {} section '{}': checksum mismatch in shared memory; not persisted",
            v, rk->rank(), sec.name()));
      }
      end = std::max<uint64_t>(end, sec.offset() + sec.bytes());
    }
    const std::string name = fmt::format("rank{}.bin", rk->rank());
    STRATA_RETURN_IF_ERROR(WriteFileDurably((tmp / name).string(), base, end));
    rk->clear_shm_name();
    rk->set_slot(0);
    rk->set_path(name);
  }
  const std::string mbytes = disk.SerializeAsString();
  STRATA_RETURN_IF_ERROR(WriteFileDurably((tmp / "manifest.pb").string(),
                                          reinterpret_cast<const uint8_t*>(mbytes.data()),
                                          mbytes.size()));
  STRATA_RETURN_IF_ERROR(FsyncDir(tmp.string()));
  fs::remove_all(final_dir, ec);  // the same version persisted by an earlier incarnation
  fs::rename(tmp, final_dir, ec);
  if (ec) return Status::IOError(fmt::format("rename {}: {}", tmp.string(), ec.message()));
  STRATA_RETURN_IF_ERROR(FsyncDir(root.string()));
  if (options_.persist_keep > 0) {
    std::vector<std::pair<int64_t, fs::path>> versions;
    for (const auto& e : fs::directory_iterator(root, ec)) {
      const int64_t ver = ParseVersionDir(e.path().filename().string());
      if (ver >= 0) versions.push_back({ver, e.path()});
    }
    std::sort(versions.rbegin(), versions.rend());
    for (size_t i = static_cast<size_t>(options_.persist_keep); i < versions.size(); ++i) {
      fs::remove_all(versions[i].second, ec);
    }
  }
  return Status::OK();
}

void Snapshotd::ReapPersisted() {
  std::vector<PersistJob> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done.swap(done_);
  }
  for (const PersistJob& job : done) {
    for (const auto& [rank, slot] : job.pinned) {
      auto it = ranks_.find(rank);
      if (it != ranks_.end() && it->second.slots[slot].pins > 0) --it->second.slots[slot].pins;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// EnsureSnapshotd

namespace {

Status Ping(const std::string& socket_path) {
  STRATA_ASSIGN_OR_RETURN(int fd, ConnectUnix(socket_path));
  proto::SnapshotRequest req;
  req.mutable_ping();
  Status st = WriteFrame(fd, req, 1000);
  proto::SnapshotReply reply;
  if (st.ok()) st = ReadFrame(fd, &reply, 1000);
  ::close(fd);
  if (st.ok() && !reply.has_ping()) st = Status::Internal("snapshotd: unexpected ping reply");
  return st;
}

}  // namespace

Status EnsureSnapshotd(const SnapshotdOptions& options, const std::string& strata_binary) {
  const std::string path = SnapshotdSocketPath(options);
  if (Ping(path).ok()) return Status::OK();
  if (options.run.empty()) return Status::InvalidArgument("EnsureSnapshotd: empty run name");

  std::vector<std::string> args = {strata_binary, "snapshotd", "--run", options.run,
                                   "--socket", path};
  if (!options.persist_dir.empty()) {
    args.insert(args.end(), {"--persist-dir", options.persist_dir, "--persist-every",
                             std::to_string(options.persist_every), "--persist-keep",
                             std::to_string(options.persist_keep)});
  }
  if (options.peers.size() > 1) {
    std::string peers;
    for (const std::string& p : options.peers) peers += (peers.empty() ? "" : ",") + p;
    args.insert(args.end(), {"--peers", peers, "--node", std::to_string(options.node)});
    if (options.ec_k > 0) {
      args.insert(args.end(), {"--ec", fmt::format("{},{}", options.ec_k, options.ec_m)});
    }
    if (!options.listen.empty()) args.insert(args.end(), {"--listen", options.listen});
    if (!options.shm_tag.empty()) args.insert(args.end(), {"--shm-tag", options.shm_tag});
    if (options.ec_io_timeout_ms > 0) {
      args.insert(args.end(),
                  {"--peer-timeout", fmt::format("{}", options.ec_io_timeout_ms / 1000.0)});
    }
  }
  args.insert(args.end(), {"--idle-timeout", fmt::format("{}", options.idle_timeout_s),
                           "--expected-local-ranks",
                           std::to_string(options.expected_local_ranks)});
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log = fmt::format("/tmp/strata-snapshotd-{}.log", SanitizeRunName(options.run));

  // The daemon serves every rank of the node, and rebuilds a lost node's snapshot while the
  // ranks wait: it must not inherit the CPU binding of the rank that happens to start it
  // (mpirun binds a rank to one core), or the rebuild runs on that core alone. It asks for
  // every CPU; the kernel keeps it inside the job's cpuset.
  cpu_set_t all_cpus;
  CPU_ZERO(&all_cpus);
  const long ncpu = ::sysconf(_SC_NPROCESSORS_CONF);
  for (long c = 0; c < ncpu && c < CPU_SETSIZE; ++c) CPU_SET(static_cast<int>(c), &all_cpus);

  // Double fork: the daemon is reparented to init (never a zombie of the trainer), and setsid
  // detaches it from the trainer's session so a signal to the job's process group spares it.
  // The daemon keeps this pipe's write end (as fd 3, STRATA_SNAPSHOTD_READY_FD) until it has
  // bound the socket or lost the race to another one: we return only after that, so no daemon
  // we started can come up after the job has finished and linger until its idle timeout.
  int ready[2];
  if (::pipe2(ready, O_CLOEXEC) != 0) return ErrnoStatus("EnsureSnapshotd: pipe", errno);
  const pid_t child = ::fork();
  if (child < 0) {
    const int err = errno;
    ::close(ready[0]);
    ::close(ready[1]);
    return ErrnoStatus("EnsureSnapshotd: fork", err);
  }
  if (child == 0) {
    ::setsid();
    (void)::sched_setaffinity(0, sizeof(all_cpus), &all_cpus);  // best effort
    const pid_t grandchild = ::fork();
    if (grandchild != 0) ::_exit(grandchild < 0 ? 1 : 0);
    const int null_fd = ::open("/dev/null", O_RDONLY);
    const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (null_fd >= 0) ::dup2(null_fd, 0);
    if (log_fd >= 0) {
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
    }
    if (ready[1] == 3) {
      ::fcntl(3, F_SETFD, 0);
    } else {
      ::dup2(ready[1], 3);  // the copy is not close-on-exec
    }
    ::setenv("STRATA_SNAPSHOTD_READY_FD", "3", 1);
    // No trainer sockets, MPI fds or the trainer's shm fds leak into the daemon.
    if (::close_range(4, ~0u, 0) != 0) {
      for (int fd = 4; fd < 65536; ++fd) ::close(fd);
    }
    ::execv(strata_binary.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(ready[1]);
  int wstatus = 0;
  while (::waitpid(child, &wstatus, 0) < 0 && errno == EINTR) {
  }
  const int64_t deadline = NowNs() + 5'000'000'000;
  Status last;
  bool decided = false;
  while (NowNs() < deadline) {
    if (!decided) {
      pollfd p{ready[0], POLLIN, 0};
      char c;
      decided = ::poll(&p, 1, 0) == 1 && ::read(ready[0], &c, 1) <= 0;  // EOF: it decided
    }
    last = Ping(path);
    if (last.ok() && decided) break;
    ::usleep(decided ? 20000 : 5000);
  }
  ::close(ready[0]);
  if (last.ok()) return Status::OK();
  return Status::Unavailable(fmt::format(
      "EnsureSnapshotd: started '{} snapshotd --run {}' but nothing answered on {} within 5 s "
      "(see {}): {}",
      strata_binary, options.run, path, log, last.message()));
}

}  // namespace strata::checkpoint
