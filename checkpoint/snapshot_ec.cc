#include "checkpoint/snapshot_ec.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cerrno>
#include <cstring>
#include <random>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/logging.h"
#include "checkpoint/snapshot_wire.h"

namespace strata::checkpoint {
namespace {

constexpr size_t kBulkChunk = 4 << 20;  // raw bytes move in pieces of this size

int Mod(int a, int n) { return ((a % n) + n) % n; }

StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& hp) {
  const size_t colon = hp.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == hp.size()) {
    return Status::InvalidArgument(fmt::format("snapshotd peer '{}' is not host:port", hp));
  }
  return std::make_pair(hp.substr(0, colon), hp.substr(colon + 1));
}

StatusOr<addrinfo*> Resolve(const std::string& hp, bool passive) {
  STRATA_ASSIGN_OR_RETURN(auto parts, SplitHostPort(hp));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const int r = ::getaddrinfo(parts.first.c_str(), parts.second.c_str(), &hints, &res);
  if (r != 0 || res == nullptr) {
    return Status::InvalidArgument(
        fmt::format("snapshotd peer '{}': cannot resolve: {}", hp, ::gai_strerror(r)));
  }
  return res;
}

uint32_t SegmentsCrc(const std::vector<EcSegment>& segs) {
  uint32_t crc = 0;
  for (const EcSegment& s : segs) crc = FragmentChecksumExtend(crc, s.data, s.bytes);
  return crc;
}

// Calls fn(ptr, len) for the bytes [offset, offset + len) of the concatenated segments.
template <typename Fn>
Status ForRange(const std::vector<EcSegment>& segs, size_t offset, size_t len, Fn&& fn) {
  size_t base = 0;
  for (const EcSegment& s : segs) {
    if (len == 0) break;
    if (offset < base + s.bytes) {
      const size_t from = offset - base;
      const size_t take = std::min(len, s.bytes - from);
      STRATA_RETURN_IF_ERROR(fn(s.data + from, take));
      offset += take;
      len -= take;
    }
    base += s.bytes;
  }
  return Status::OK();
}

Status SendBulk(int fd, const std::vector<EcSegment>& segs, size_t offset, size_t len,
                int timeout_ms) {
  return ForRange(segs, offset, len, [&](const uint8_t* p, size_t n) -> Status {
    for (size_t o = 0; o < n; o += kBulkChunk) {
      STRATA_RETURN_IF_ERROR(WriteBytes(fd, p + o, std::min(kBulkChunk, n - o), timeout_ms));
    }
    return Status::OK();
  });
}

Status ReadBulk(int fd, uint8_t* dst, size_t len, int timeout_ms) {
  for (size_t o = 0; o < len; o += kBulkChunk) {
    STRATA_RETURN_IF_ERROR(ReadBytes(fd, dst + o, std::min(kBulkChunk, len - o), timeout_ms));
  }
  return Status::OK();
}

// Writes a decoded chunk of data piece f (bytes [o, o + c) of a fragment of P bytes) into the
// node buffer `dest` of `own` bytes: only the part that exists (the rest is zero padding).
Status PutDataChunk(const std::vector<EcSegment>& dest, size_t own, size_t P, int f, size_t o,
                    const uint8_t* src, size_t c) {
  const size_t begin = static_cast<size_t>(f) * P + o;
  const size_t have = begin >= own ? 0 : std::min(c, own - begin);
  // The segments are writable memory (rank slots this snapshotd owns).
  return ForRange(dest, begin, have, [&](const uint8_t* to, size_t n) {
    std::memcpy(const_cast<uint8_t*>(to), src, n);
    src += n;
    return Status::OK();
  });
}

// Fragment ids [from, to): 0..k-1 data pieces, k..k+m-1 parity slots (EcFetch.fragments).
std::vector<int> FragmentIds(int from, int to) {
  std::vector<int> ids;
  for (int f = from; f < to; ++f) ids.push_back(f);
  return ids;
}

proto::EcPeerReply ErrorReply(const Status& st) {
  proto::EcPeerReply r;
  r.set_code(static_cast<int>(st.code()));
  r.set_message(st.message());
  return r;
}

Status ReplyStatus(const proto::EcPeerReply& r) {
  if (r.code() == 0) return Status::OK();
  return Status(static_cast<StatusCode>(r.code()), r.message());
}

}  // namespace

std::pair<int, int> DefaultEcGroup(int nodes) {
  if (nodes <= 1) return {0, 0};
  if (nodes == 2) return {1, 1};
  if (nodes == 3) return {2, 1};
  if (nodes <= 8) return {nodes - 2, 2};
  for (int g = 8; g >= 4; --g) {
    if (nodes % g == 0) return {g - 2, 2};
  }
  return {nodes - 2, 2};
}

std::string EcParityShmName(const std::string& shm_run, int node, int64_t version) {
  return fmt::format("/strata-ec-{}-n{}-v{}", SanitizeRunName(shm_run), node, version);
}

struct EcPeer::Version {
  int64_t version = -1;
  // This node's own data.
  bool local = false;
  bool local_ready = false;  // CRC computed, announced to self
  uint64_t nonce = 0;
  std::vector<EcSegment> segments;
  // Every node's announce, by group index.
  std::vector<std::optional<proto::EcNodeManifest>> manifests;
  size_t B = 0, P = 0;  // known once every node announced
  bool layout_known = false;
  // Pieces of the stripes whose parity this node holds: [p][d].
  struct Piece {
    std::vector<uint8_t> buf;  // P bytes, zero padded
    uint64_t nonce = 0;
    bool valid = false;
  };
  std::vector<std::vector<Piece>> pieces;
  std::vector<bool> stripe_done;
  std::string parity_name;
  uint8_t* parity = nullptr;
  size_t parity_len = 0;
  bool parity_complete = false;
  uint32_t parity_crc = 0;
  bool done_sent = false;
  std::vector<std::optional<proto::EcParityDone>> done;
  bool group_committed = false;
  // This node's part could not be delivered (a peer unreachable, or silent past the timeout):
  // the version cannot group-commit, and snapshotd may withdraw it (StalledLocal).
  bool stalled = false;
  bool announced = false;  // every other node of the group took this node's announce
  int64_t submitted_ns = 0;
  int readers = 0;       // threads using segments / parity outside mu_
  bool dropped = false;  // out of versions_; retire once readers == 0
  bool retired = false;
};

EcPeer::EcPeer(EcOptions options, std::function<void()> wake)
    : options_(std::move(options)), wake_(std::move(wake)) {
  std::random_device rd;
  do {
    incarnation_ = rd();
  } while (incarnation_ == 0);
}

bool NonceOlder(uint64_t a, uint64_t b) {
  return (a >> 32) == (b >> 32) && static_cast<uint32_t>(a) < static_cast<uint32_t>(b);
}

StatusOr<std::unique_ptr<EcPeer>> EcPeer::Create(EcOptions options, std::function<void()> wake) {
  const int nodes = static_cast<int>(options.peers.size());
  const int n = options.k + options.m;
  if (options.k < 1 || options.m < 1 || n > ReedSolomon::kMaxFragments) {
    return Status::InvalidArgument(
        fmt::format("snapshotd: erasure group k={} m={} needs k >= 1, m >= 1", options.k,
                    options.m));
  }
  if (nodes % n != 0) {
    return Status::InvalidArgument(fmt::format(
        "snapshotd: {} nodes do not split into groups of k + m = {}", nodes, n));
  }
  if (options.node < 0 || options.node >= nodes) {
    return Status::InvalidArgument(
        fmt::format("snapshotd: node index {} outside the {} peers", options.node, nodes));
  }
  for (const std::string& p : options.peers) {
    auto hp = SplitHostPort(p);
    if (!hp.ok()) return hp.status();
  }
  std::unique_ptr<EcPeer> e(new EcPeer(std::move(options), std::move(wake)));
  e->n_ = n;
  e->group_base_ = e->options_.node / n * n;
  e->li_ = e->options_.node - e->group_base_;
  STRATA_ASSIGN_OR_RETURN(ReedSolomon rs, ReedSolomon::Create(e->options_.k, e->options_.m));
  e->rs_.emplace(std::move(rs));
  e->pool_ = std::make_unique<ThreadPool>(std::max(1, e->options_.threads));
  return e;
}

EcPeer::~EcPeer() { Shutdown(); }

Status EcPeer::Start() {
  const std::string addr = options_.listen.empty() ? options_.peers[options_.node]
                                                   : options_.listen;
  STRATA_ASSIGN_OR_RETURN(addrinfo * ai, Resolve(addr, true));
  listen_fd_ = ::socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) {
    ::freeaddrinfo(ai);
    return ErrnoStatus("snapshotd: tcp socket", errno);
  }
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const int b = ::bind(listen_fd_, ai->ai_addr, ai->ai_addrlen);
  const int err = errno;
  ::freeaddrinfo(ai);
  if (b != 0) return ErrnoStatus(fmt::format("snapshotd: bind {}", addr), err);
  if (::listen(listen_fd_, 128) != 0) return ErrnoStatus("snapshotd: tcp listen", errno);
  if (::pipe2(stop_pipe_, O_CLOEXEC | O_NONBLOCK) != 0) return ErrnoStatus("pipe2", errno);
  acceptor_ = std::thread([this] { AcceptLoop(); });
  STRATA_LOG(INFO, CKPT, "snapshotd node {}: erasure group {}..{} (k={} m={}), peers on {}",
             options_.node, group_base_, group_base_ + n_ - 1, options_.k, options_.m, addr);
  return Status::OK();
}

void EcPeer::Shutdown() {
  stop_.store(true);
  if (stop_pipe_[1] >= 0) {
    const char c = 's';
    [[maybe_unused]] ssize_t r = ::write(stop_pipe_[1], &c, 1);
  }
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
    cv_.notify_all();
    // Handlers and senders are detached; wait for every one to leave.
    cv_.wait(lock, [&] { return active_ == 0; });
    for (auto& [ver, v] : versions_) {
      if (v->parity != nullptr) ::munmap(v->parity, v->parity_len);
      v->parity = nullptr;
      if (!v->parity_name.empty()) ::shm_unlink(v->parity_name.c_str());
    }
    versions_.clear();
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  for (int& fd : stop_pipe_) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
}

void EcPeer::Spawn(std::function<void()> fn) {
  ++active_;  // mu_ held by the caller
  std::thread([this, fn = std::move(fn)] {
    fn();
    std::lock_guard<std::mutex> lock(mu_);
    --active_;
    cv_.notify_all();
  }).detach();
}

void EcPeer::AcceptLoop() {
  for (;;) {
    pollfd p[2] = {{stop_pipe_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
    const int r = ::poll(p, 2, -1);
    if (stop_.load()) return;
    if (r < 0) {
      if (errno == EINTR) continue;
      STRATA_LOG(ERROR, CKPT, "snapshotd: tcp poll: {}", std::strerror(errno));
      return;
    }
    if (!(p[1].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_.load()) {
        ::close(fd);
        return;
      }
      conn_fds_.push_back(fd);
      Spawn([this, fd] {
        ServeConnection(fd);
        std::lock_guard<std::mutex> l(mu_);
        std::erase(conn_fds_, fd);
        ::close(fd);
      });
    }
  }
}

std::shared_ptr<EcPeer::Version> EcPeer::GetOrMake(int64_t version) {
  auto it = versions_.find(version);
  if (it != versions_.end()) return it->second;
  auto v = std::make_shared<Version>();
  v->version = version;
  v->manifests.resize(n_);
  v->done.resize(n_);
  v->stripe_done.assign(options_.m, false);
  v->pieces.resize(options_.m);
  for (auto& row : v->pieces) row.resize(options_.k);
  versions_[version] = v;
  // Bound the memory of versions that never complete (a peer that died mid-way): keep the
  // group-committed one and the three newest others.
  int others = 0;
  for (auto r = versions_.rbegin(); r != versions_.rend(); ++r) {
    if (r->first != group_version_ && ++others > 3) {
      DropVersion(r->first);
      break;
    }
  }
  return v;
}

void EcPeer::Retire(Version& v) {
  if (v.retired || !v.dropped || v.readers > 0) return;
  v.retired = true;
  if (v.parity != nullptr) ::munmap(v.parity, v.parity_len);
  v.parity = nullptr;
  if (!v.parity_name.empty()) ::shm_unlink(v.parity_name.c_str());
  Recycle(v);
  if (v.local) {
    released_.push_back(v.version);
    if (wake_) wake_();
  }
}

void EcPeer::Recycle(Version& v) {
  for (auto& row : v.pieces) {
    for (auto& pc : row) {
      if (pc.buf.capacity() > 0 && spare_.size() < 4 * static_cast<size_t>(options_.k * options_.m)) {
        spare_.push_back(std::move(pc.buf));
      }
    }
  }
  v.pieces.clear();
}

void EcPeer::DropVersion(int64_t version) {
  auto it = versions_.find(version);
  if (it == versions_.end()) return;
  std::shared_ptr<Version> v = it->second;
  versions_.erase(it);
  v->dropped = true;
  Retire(*v);
  cv_.notify_all();
}

StatusOr<EcShm> EcShm::Create(const std::string& name, size_t bytes) {
  const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(fmt::format("shm_open {}", name), errno);
  EcShm shm;
  shm.name_ = name;  // unlinked by ~EcShm on every error below
  if (const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
    ::close(fd);
    return ErrnoStatus(fmt::format("posix_fallocate {}", name), e);
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) return ErrnoStatus(fmt::format("mmap {}", name), err);
  shm.data_ = static_cast<uint8_t*>(p);
  shm.size_ = bytes;
  return shm;
}

EcShm& EcShm::operator=(EcShm&& o) noexcept {
  if (this != &o) {
    Reset();
    name_ = std::move(o.name_);
    data_ = o.data_;
    size_ = o.size_;
    o.Release();
  }
  return *this;
}

void EcShm::Reset() {
  if (data_ != nullptr) ::munmap(data_, size_);
  if (!name_.empty()) ::shm_unlink(name_.c_str());
  Release();
}

Status EcPeer::EnsureParityShm(Version& v) {
  if (v.parity != nullptr || v.parity_len == 0) return Status::OK();
  STRATA_ASSIGN_OR_RETURN(
      EcShm shm,
      EcShm::Create(EcParityShmName(options_.shm_run, options_.node, v.version), v.parity_len));
  v.parity_name = shm.name();
  v.parity = shm.data();
  shm.Release();  // Retire unmaps and unlinks it
  return Status::OK();
}

void EcPeer::SubmitLocal(int64_t version, proto::EcNodeManifest manifest,
                         std::vector<EcSegment> segments) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // This process's incarnation, then a count of attempts: receivers can tell a late message
    // of an older attempt from the newest one (NonceOlder).
    const uint64_t nonce = static_cast<uint64_t>(incarnation_) << 32 | ++attempts_;
    if (stop_.load()) return;
    if (version <= group_version_) {
      released_.push_back(version);  // nothing to protect: an older version than the group's
      if (wake_) wake_();
      return;
    }
    DetachLocal(version);  // a redone version: the old attempt's own data is void
    std::shared_ptr<Version> v = GetOrMake(version);
    v->local = true;
    v->nonce = nonce;
    v->stalled = false;
    v->announced = false;
    v->submitted_ns = NowNs();
    v->segments = std::move(segments);
    v->manifests[li_].reset();
    size_t total = 0;
    for (const EcSegment& s : v->segments) total += s.bytes;
    manifest.set_node(options_.node);
    manifest.set_version(version);
    manifest.set_nonce(nonce);
    manifest.set_node_bytes(total);
    ++v->readers;
    // The CRC and the announce happen on the sender thread: a 1 GiB CRC must not stall the
    // snapshotd loop that the local ranks talk to.
    Spawn([this, v, manifest]() mutable {
      manifest.set_node_crc32c(SegmentsCrc(v->segments));
      SendLoop(v, std::move(manifest));
    });
  }
}

void EcPeer::SendLoop(std::shared_ptr<Version> v, proto::EcNodeManifest manifest) {
  // The segments are read (held as a reader) for the CRC, done by now, and for the pieces, but
  // not while the announces wait on peers: a version withdrawn meanwhile (a peer unreachable)
  // gives its slots back at once instead of after the exchange timeout.
  bool reading = true;
  auto finish = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    if (reading) --v->readers;
    Retire(*v);
  };
  // 1. Announce to self and to every other node of the group.
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (v->dropped || v->nonce != manifest.nonce()) {
      lock.unlock();
      return finish();
    }
    InstallAnnounce(*v, li_, manifest);
    v->local_ready = true;
    Progress(lock, v);
    --v->readers;
    reading = false;
  }
  proto::EcPeerRequest ann;
  *ann.mutable_announce()->mutable_manifest() = manifest;
  // A peer that stays unreachable is retried for io_timeout_ms (it may be restarting), unless
  // the group is already degraded: then the first failure gives this version up.
  const int64_t deadline = NowNs() + static_cast<int64_t>(options_.io_timeout_ms) * 1000000;
  bool announced = true;
  for (int j = 0; j < n_ && announced; ++j) {
    if (j == li_) continue;
    for (;;) {
      proto::EcPeerReply reply;
      Status st = SendToPeer(j, ann, nullptr, 0, 0, &reply);
      if (st.ok()) st = ReplyStatus(reply);
      if (st.ok()) break;
      bool give_up = stop_.load() || NowNs() > deadline;
      {
        std::lock_guard<std::mutex> lock(mu_);
        give_up = give_up || v->dropped || degraded_;
        if (give_up && !v->dropped && !stop_.load()) {
          MarkStalled(*v, fmt::format("not announced to node {}: {}", GroupNode(j),
                                      st.ToString()));
        }
      }
      if (give_up) {
        announced = false;
        break;
      }
      ::usleep(50000);
      std::lock_guard<std::mutex> lock(mu_);
      if (v->dropped) {  // redone or withdrawn meanwhile: its announce would only mislead
        announced = false;
        break;
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    v->announced = announced;
  }
  if (!announced) return finish();
  // 2. Wait until every node announced: then B and P are known.
  std::vector<EcSegment> segs;
  size_t P = 0, own = 0;
  {
    std::unique_lock<std::mutex> lock(mu_);
    const bool ready = cv_.wait_until(
        lock, std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io_timeout_ms),
        [&] { return stop_.load() || v->dropped || v->layout_known; });
    if (!ready || stop_.load() || v->dropped || v->nonce != manifest.nonce()) {
      if (!ready) MarkStalled(*v, "not every node of the group announced it");
      lock.unlock();
      return finish();
    }
    ++v->readers;
    reading = true;
    segs = v->segments;
    P = v->P;
    own = manifest.node_bytes();
  }
  // 3. Each piece j of this node to the m parity nodes of its stripe, one thread per target.
  std::map<int, std::vector<std::pair<int, int>>> by_target;  // target -> (stripe, d)
  for (int j = 0; j < options_.k; ++j) {
    const int s = Mod(li_ - options_.m - j, n_);
    for (int p = 0; p < options_.m; ++p) by_target[Mod(s + p, n_)].push_back({s, j});
  }
  std::vector<std::thread> senders;
  for (auto& [target, list] : by_target) {
    senders.emplace_back([&, target = target, list = list] {
      for (const auto& [s, d] : list) {
        const size_t off = static_cast<size_t>(d) * P;
        const size_t len = off >= own ? 0 : std::min(P, own - off);
        proto::EcPeerRequest req;
        proto::EcPiece* pc = req.mutable_piece();
        pc->set_version(v->version);
        pc->set_nonce(manifest.nonce());
        pc->set_from(li_);
        pc->set_stripe(s);
        pc->set_d(d);
        pc->set_length(len);
        proto::EcPeerReply reply;
        Status st = SendToPeer(target, req, segs.data(), segs.size(), off, &reply, len);
        if (st.ok()) st = ReplyStatus(reply);
        if (!st.ok()) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!v->dropped && !stop_.load()) {
            MarkStalled(*v, fmt::format("piece {} to node {}: {}", d, GroupNode(target),
                                        st.ToString()));
          }
          return;
        }
      }
    });
  }
  for (std::thread& t : senders) t.join();
  finish();
}

void EcPeer::InstallAnnounce(Version& v, int from, const proto::EcNodeManifest& m) {
  if (v.manifests[from] && NonceOlder(m.nonce(), v.manifests[from]->nonce())) {
    // A late announce of an attempt the node has redone since (its sender retried it while
    // the redo went out): installing it would void the newer attempt here for good.
    STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: ignored a late announce of version {} by node {}",
               options_.node, v.version, GroupNode(from));
    return;
  }
  if (v.manifests[from] && v.manifests[from]->nonce() != m.nonce()) {
    STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: node {} announced version {} again (nonce {:x} "
                            "after {:x})", options_.node, GroupNode(from), v.version, m.nonce(),
               v.manifests[from]->nonce());
    // The node redid this version: the parity built from its old data is void (the stripes it
    // is a data node of), and so is every parity-done that counted its old data.
    for (int p = 0; p < options_.m && p < static_cast<int>(v.pieces.size()); ++p) {
      const int s = Mod(li_ - p, n_);
      const int d = Mod(from - s - options_.m, n_);
      if (d < options_.k) {
        v.pieces[p][d].valid = false;
        v.stripe_done[p] = false;
        v.parity_complete = false;
      }
    }
    // A parity-done that already saw the new attempt (messages from different nodes race)
    // stays.
    for (auto& dn : v.done) {
      if (dn && (dn->nonces_size() <= from || dn->nonces(from) != m.nonce())) dn.reset();
    }
    if (!v.done[li_]) v.done_sent = false;
  }
  v.manifests[from] = m;
  size_t B = 0;
  for (const auto& mf : v.manifests) {
    if (!mf) return;
    B = std::max<size_t>(B, mf->node_bytes());
  }
  const size_t P = (B + options_.k - 1) / options_.k;
  if (!v.layout_known || v.B != B) {
    if (v.layout_known) {
      // A node redid the version with another size: every fragment length changed.
      for (auto& row : v.pieces) {
        for (auto& pc : row) pc = Version::Piece{};
      }
      for (auto& dn : v.done) dn.reset();
      v.done_sent = false;
    }
    v.stripe_done.assign(options_.m, false);
    v.parity_complete = false;
    if (v.parity != nullptr) ::munmap(v.parity, v.parity_len);
    v.parity = nullptr;
    v.B = B;
    v.P = P;
    v.parity_len = static_cast<size_t>(options_.m) * P;
    v.layout_known = true;
  }
  cv_.notify_all();
}

void EcPeer::Progress(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Version>& v) {
  (void)lock;
  if (v->dropped || !v->layout_known) return;
  if (v->parity == nullptr && v->parity_len > 0) {
    Status st = EnsureParityShm(*v);
    if (!st.ok()) {
      STRATA_LOG(ERROR, CKPT, "snapshotd node {}: parity of version {}: {}", options_.node,
                 v->version, st.ToString());
      return;
    }
  }
  bool all_done = true;
  for (int p = 0; p < options_.m; ++p) {
    if (v->stripe_done[p]) continue;
    const int s = Mod(li_ - p, n_);
    std::vector<const uint8_t*> data(options_.k);
    bool ready = true;
    for (int d = 0; d < options_.k; ++d) {
      const auto& pc = v->pieces[p][d];
      const int from = Mod(s + options_.m + d, n_);
      ready = ready && pc.valid && pc.nonce == v->manifests[from]->nonce() &&
              pc.buf.size() <= v->P;
      if (!ready) break;
      v->pieces[p][d].buf.resize(v->P);  // zero padding up to P (pieces may precede P)
      data[d] = v->pieces[p][d].buf.data();
    }
    if (!ready) {
      all_done = false;
      continue;
    }
    if (v->P > 0) {
      std::lock_guard<std::mutex> pl(pool_mu_);
      Status st = rs_->EncodeRow(p, data.data(), v->parity + static_cast<size_t>(p) * v->P,
                                 v->P, pool_.get());
      if (!st.ok()) {
        STRATA_LOG(ERROR, CKPT, "snapshotd: encode: {}", st.ToString());
        return;
      }
    }
    v->stripe_done[p] = true;  // pieces are kept until group commit: a redone piece re-encodes
  }
  if (!all_done) return;
  if (!v->parity_complete) {
    v->parity_crc = FragmentChecksum(v->parity, v->parity_len);
    v->parity_complete = true;
  }
  if (!v->local_ready || v->done_sent) return;
  v->done_sent = true;
  const proto::EcParityDone done = ParityDone(*v, li_, v->parity_crc);
  v->done[li_] = done;
  MaybeGroupCommit(v);
  SendParityDone(v, done, "");
}

proto::EcParityDone EcPeer::ParityDone(const Version& v, int from, uint32_t parity_crc) const {
  proto::EcParityDone done;
  done.set_version(v.version);
  done.set_from(from);
  for (const auto& mf : v.manifests) done.add_nonces(mf->nonce());
  done.set_parity_crc32c(parity_crc);
  return done;
}

void EcPeer::SendParityDone(const std::shared_ptr<Version>& v, const proto::EcParityDone& done,
                            const char* what) {
  if (v->dropped) return;
  ++v->readers;
  Spawn([this, v, done, what] {
    proto::EcPeerRequest req;
    *req.mutable_parity_done() = done;
    for (int j = 0; j < n_; ++j) {
      if (j == li_) continue;
      proto::EcPeerReply reply;
      Status st = SendToPeer(j, req, nullptr, 0, 0, &reply);
      if (st.ok()) st = ReplyStatus(reply);
      if (!st.ok()) {
        STRATA_LOG(WARN, CKPT, "snapshotd node {}: parity-done of {}version {} to node {}: {}",
                   options_.node, what, v->version, GroupNode(j), st.ToString());
      }
    }
    std::lock_guard<std::mutex> l(mu_);
    --v->readers;
    Retire(*v);
  });
}

void EcPeer::MaybeGroupCommit(const std::shared_ptr<Version>& v) {
  if (v->group_committed || !v->local_ready || !v->parity_complete) return;
  for (int j = 0; j < n_; ++j) {
    if (!v->done[j] || !v->manifests[j]) return;
    const auto& d = *v->done[j];
    if (d.nonces_size() != n_) return;
    for (int i = 0; i < n_; ++i) {
      if (d.nonces(i) != v->manifests[i]->nonce()) return;  // built from another attempt's data
    }
  }
  MarkGroupCommitted(v);
}

void EcPeer::MarkStalled(Version& v, const std::string& why) {
  v.stalled = true;
  if (!degraded_) {
    STRATA_LOG(WARN, CKPT, "snapshotd node {}: version {} cannot commit across the group ({}); "
                           "until the group answers again, versions stay on this node only and "
                           "the last group-committed one ({}) keeps its parity",
               options_.node, v.version, why, group_version_);
  } else {
    STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: version {} stalled: {}", options_.node,
               v.version, why);
  }
  degraded_ = true;
  if (wake_) wake_();
}

std::vector<int64_t> EcPeer::StalledLocal() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  // Delivered but never completed (a peer that died after taking the pieces) counts too, once
  // twice the exchange timeout has passed.
  const int64_t timeout_ns = static_cast<int64_t>(options_.io_timeout_ms) * 1000000;
  const int64_t now = NowNs();
  const int64_t late = now - 2 * timeout_ns;
  // Once degraded, a version whose announces have not gone through within a quarter of the
  // timeout is not waited for (against a silent peer each would take the whole timeout). Not at
  // once: when the group is reachable again, every node's announces of one version must get
  // through before any node gives that version up, or the group never recovers (on a loaded
  // machine an announce round can take longer than a training step).
  const int64_t grace = now - std::max<int64_t>(timeout_ns / 4, 100'000'000);
  for (const auto& [ver, v] : versions_) {
    if (v->local && !v->group_committed && !v->dropped &&
        (v->stalled || v->submitted_ns < late ||
         (degraded_ && !v->announced && v->submitted_ns < grace))) {
      out.push_back(ver);
    }
  }
  return out;
}

bool EcPeer::degraded() const {
  std::lock_guard<std::mutex> lock(mu_);
  return degraded_;
}

void EcPeer::MarkGroupCommitted(const std::shared_ptr<Version>& v) {
  v->group_committed = true;
  if (degraded_) {
    STRATA_LOG(WARN, CKPT, "snapshotd node {}: version {} committed across the group again",
               options_.node, v->version);
    degraded_ = false;
  }
  Recycle(*v);
  if (v->version > group_version_) group_version_ = v->version;
  std::vector<int64_t> older;
  for (const auto& [ver, x] : versions_) {
    if (ver < v->version) older.push_back(ver);
  }
  for (int64_t o : older) DropVersion(o);
  STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: version {} group-committed", options_.node,
             v->version);
  if (wake_) wake_();
}

int64_t EcPeer::group_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return group_version_;
}

std::vector<int64_t> EcPeer::TakeReleased() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  out.swap(released_);
  return out;
}

void EcPeer::WithdrawVersion(int64_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = versions_.find(version);
  if (it != versions_.end() && !it->second->group_committed) DetachLocal(version);
}

void EcPeer::Withdraw(int64_t keep) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> mine;
  for (const auto& [ver, v] : versions_) {
    if (ver > keep && !v->group_committed && v->local) mine.push_back(ver);
  }
  for (int64_t ver : mine) DetachLocal(ver);
}

void EcPeer::DetachLocal(int64_t version) {
  auto it = versions_.find(version);
  if (it == versions_.end() || !it->second->local) return;
  // What the other nodes sent (announces, pieces, the parity built from them: this node's
  // stripes never hold its own data) stays; only this node's own part goes. The old object
  // keeps the segments until its readers are gone, then reports them released.
  std::shared_ptr<Version> old = it->second;
  auto fresh = std::make_shared<Version>();
  fresh->version = version;
  fresh->manifests = old->manifests;
  fresh->manifests[li_].reset();
  fresh->B = old->B;
  fresh->P = old->P;
  fresh->pieces = std::move(old->pieces);
  fresh->stripe_done = old->stripe_done;
  fresh->parity_name = std::move(old->parity_name);
  fresh->parity = old->parity;
  fresh->parity_len = old->parity_len;
  fresh->parity_complete = old->parity_complete;
  fresh->parity_crc = old->parity_crc;
  fresh->done.resize(n_);
  old->parity = nullptr;
  old->parity_name.clear();
  versions_[version] = fresh;
  old->dropped = true;
  Retire(*old);
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Talking to peers

StatusOr<int> EcPeer::ConnectPeer(int li) const {
  const std::string& hp = options_.peers[GroupNode(li)];
  STRATA_ASSIGN_OR_RETURN(addrinfo * ai, Resolve(hp, false));
  const int fd = ::socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    ::freeaddrinfo(ai);
    return ErrnoStatus("snapshotd: tcp socket", errno);
  }
  int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
  int err = errno;
  ::freeaddrinfo(ai);
  if (r != 0 && err == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    r = ::poll(&p, 1, options_.connect_timeout_ms);
    if (r == 1) {
      socklen_t len = sizeof(err);
      ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      r = err == 0 ? 0 : -1;
    } else {
      err = r == 0 ? ETIMEDOUT : errno;
      r = -1;
    }
  }
  if (r != 0) {
    ::close(fd);
    return Status::Unavailable(fmt::format("snapshotd node {} ({}) unreachable: {}",
                                           GroupNode(li), hp, std::strerror(err)));
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

Status EcPeer::SendToPeer(int li, const proto::EcPeerRequest& req, const EcSegment* bulk,
                          size_t nbulk, size_t bulk_offset, proto::EcPeerReply* reply,
                          size_t bulk_bytes) {
  STRATA_ASSIGN_OR_RETURN(int fd, ConnectPeer(li));
  Status st = WriteFrame(fd, req, options_.io_timeout_ms);
  if (st.ok() && bulk_bytes > 0) {
    std::vector<EcSegment> segs(bulk, bulk + nbulk);
    st = SendBulk(fd, segs, bulk_offset, bulk_bytes, options_.io_timeout_ms);
  }
  if (st.ok()) st = ReadFrame(fd, reply, options_.io_timeout_ms);
  ::close(fd);
  return st;
}

Status EcPeer::SendStriped(int fd, const Version& v, size_t chunk,
                           const std::vector<int>& fragments) const {
  static const std::vector<uint8_t> zeros(kBulkChunk, 0);
  const size_t P = v.P;
  const size_t own = v.manifests[li_]->node_bytes();
  const int timeout = options_.io_timeout_ms;
  for (size_t o = 0; o < P; o += chunk) {
    const size_t c = std::min(chunk, P - o);
    for (int f : fragments) {
      if (f < options_.k) {
        const size_t begin = static_cast<size_t>(f) * P + o;
        const size_t have = begin >= own ? 0 : std::min(c, own - begin);
        if (have > 0) STRATA_RETURN_IF_ERROR(SendBulk(fd, v.segments, begin, have, timeout));
        if (have < c) STRATA_RETURN_IF_ERROR(WriteBytes(fd, zeros.data(), c - have, timeout));
      } else {
        STRATA_RETURN_IF_ERROR(WriteBytes(
            fd, v.parity + static_cast<size_t>(f - options_.k) * P + o, c, timeout));
      }
    }
  }
  return Status::OK();
}

void EcPeer::ServeConnection(int fd) {
  for (;;) {
    proto::EcPeerRequest req;
    Status st = ReadFrame(fd, &req, -1);
    if (!st.ok() || stop_.load()) return;
    proto::EcPeerReply reply;
    const uint8_t* bulk = nullptr;
    size_t bulk_len = 0;
    std::shared_ptr<Version> reading;  // holds readers while bulk is sent
    size_t striped_chunk = 0;          // > 0: send the fragments striped (EcFetch)
    std::vector<int> striped_fragments;
    switch (req.body_case()) {
      case proto::EcPeerRequest::kAnnounce: {
        const auto& m = req.announce().manifest();
        const int from = m.node() - group_base_;
        if (from < 0 || from >= n_ || from == li_) {
          reply = ErrorReply(Status::InvalidArgument("announce from outside the group"));
          break;
        }
        std::unique_lock<std::mutex> lock(mu_);
        if (m.version() <= group_version_) break;  // stale
        auto v = GetOrMake(m.version());
        InstallAnnounce(*v, from, m);
        Progress(lock, v);
        break;
      }
      case proto::EcPeerRequest::kPiece: {
        Status s = HandlePiece(fd, req.piece());
        if (!s.ok()) {
          if (s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDeadlineExceeded) {
            return;  // the bulk did not arrive: the stream is unusable
          }
          reply = ErrorReply(s);
        }
        break;
      }
      case proto::EcPeerRequest::kParityDone: {
        const auto& d = req.parity_done();
        if (d.from() < 0 || d.from() >= n_) break;
        std::unique_lock<std::mutex> lock(mu_);
        if (d.version() <= group_version_ && versions_.count(d.version()) == 0) break;
        auto v = GetOrMake(d.version());
        bool late = false;
        if (const auto& have = v->done[d.from()]; have && have->nonces_size() == d.nonces_size()) {
          for (int i = 0; i < d.nonces_size(); ++i) {
            late = late || NonceOlder(d.nonces(i), have->nonces(i));
          }
        }
        if (!late) v->done[d.from()] = d;  // else: counted older attempts than one already here
        MaybeGroupCommit(v);
        break;
      }
      case proto::EcPeerRequest::kState: {
        std::lock_guard<std::mutex> lock(mu_);
        proto::EcStateReply* sr = reply.mutable_state();
        sr->set_node(options_.node);
        for (const auto& [ver, v] : versions_) {
          proto::EcHeld* h = sr->add_held();
          h->set_version(ver);
          h->set_group_committed(v->group_committed);
          h->set_data_present(v->local_ready);
          h->set_parity_complete(v->parity_complete);
          bool all = true;
          for (const auto& mf : v->manifests) all = all && mf.has_value();
          if (all) {
            for (const auto& mf : v->manifests) *h->add_manifests() = *mf;
          }
          for (const auto& d : v->done) {
            h->add_parity_crc32c(d ? d->parity_crc32c() : 0);
            h->add_parity_reported(d.has_value());
          }
        }
        break;
      }
      case proto::EcPeerRequest::kFetch: {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = versions_.find(req.fetch().version());
        if (it == versions_.end() || !it->second->local_ready ||
            (req.fetch().parity() && !it->second->parity_complete)) {
          reply = ErrorReply(Status::NotFound(fmt::format(
              "node {} does not hold version {}", options_.node, req.fetch().version())));
          break;
        }
        if (req.fetch().chunk_bytes() > 0) {
          Version& v = *it->second;
          const int nf = options_.k + options_.m;
          striped_fragments.assign(req.fetch().fragments().begin(),
                                   req.fetch().fragments().end());
          if (striped_fragments.empty()) striped_fragments = FragmentIds(0, nf);
          bool valid = true;
          for (size_t i = 0; i < striped_fragments.size(); ++i) {
            const int f = striped_fragments[i];
            valid = valid && f >= 0 && f < nf && (i == 0 || f > striped_fragments[i - 1]);
          }
          if (!valid) {
            reply = ErrorReply(Status::InvalidArgument(
                "striped fetch: fragments must be ascending ids below k + m"));
            break;
          }
          const bool wants_parity = striped_fragments.back() >= options_.k;
          if (!v.layout_known || (wants_parity && !v.parity_complete) ||
              req.fetch().piece_bytes() != v.P) {
            reply = ErrorReply(Status::FailedPrecondition(fmt::format(
                "node {} holds version {} with pieces of {} bytes{}, not {}", options_.node,
                v.version, v.P, wants_parity && !v.parity_complete ? " (parity incomplete)" : "",
                req.fetch().piece_bytes())));
            break;
          }
          reading = it->second;
          ++reading->readers;
          striped_chunk = std::min<size_t>(req.fetch().chunk_bytes(), kBulkChunk);
          reply.set_length(static_cast<uint64_t>(striped_fragments.size()) * v.P);
          break;
        }
        reading = it->second;
        ++reading->readers;
        if (req.fetch().parity()) {
          bulk = reading->parity;
          bulk_len = reading->parity_len;
          reply.set_crc32c(reading->parity_crc);
        } else {
          bulk_len = reading->manifests[li_]->node_bytes();
          reply.set_crc32c(reading->manifests[li_]->node_crc32c());
        }
        reply.set_length(bulk_len);
        break;
      }
      case proto::EcPeerRequest::kPutParity: {
        const auto& pp = req.put_parity();
        std::vector<uint8_t> buf(pp.length());
        if (!ReadBulk(fd, buf.data(), buf.size(), options_.io_timeout_ms).ok()) return;
        std::lock_guard<std::mutex> lock(mu_);
        auto it = versions_.find(pp.version());
        if (it == versions_.end() || it->second->parity == nullptr ||
            it->second->parity_len != buf.size()) {
          reply = ErrorReply(Status::NotFound("no parity of that version and size here"));
          break;
        }
        Version& v = *it->second;
        if (FragmentChecksum(buf.data(), buf.size()) != v.parity_crc) {
          reply = ErrorReply(Status::Corruption("repaired parity does not match its checksum"));
          break;
        }
        std::memcpy(v.parity, buf.data(), buf.size());
        STRATA_LOG(WARN, CKPT, "snapshotd node {}: parity of version {} was corrupted; "
                               "repaired by a peer's erasure decoding", options_.node, v.version);
        break;
      }
      case proto::EcPeerRequest::BODY_NOT_SET:
        reply = ErrorReply(Status::InvalidArgument("empty peer request"));
        break;
    }
    if (striped_chunk > 0) {
      // The receiver decodes as the chunks arrive and can check only the end result, so a
      // fragment corrupted at rest here must be caught here: check this node's data and parity
      // against their stored checksums first (one CRC pass; the whole-buffer fetch instead lets
      // the receiver check, and repair parity).
      // Only what is asked for is checked (and read).
      const char* bad = nullptr;
      if (striped_fragments.front() < options_.k &&
          SegmentsCrc(reading->segments) != reading->manifests[li_]->node_crc32c()) {
        bad = "data";
      } else if (striped_fragments.back() >= options_.k &&
                 FragmentChecksum(reading->parity, reading->parity_len) != reading->parity_crc) {
        bad = "parity";
      }
      if (bad != nullptr) {
        reply = ErrorReply(Status::Corruption(fmt::format(
            "node {}'s {} of version {} fails its CRC-32C", options_.node, bad,
            reading->version)));
        striped_chunk = 0;
        std::lock_guard<std::mutex> lock(mu_);
        --reading->readers;
        Retire(*reading);
        reading.reset();
      }
    }
    st = WriteFrame(fd, reply, options_.io_timeout_ms);
    if (st.ok() && reading) {
      if (striped_chunk > 0) {
        st = SendStriped(fd, *reading, striped_chunk, striped_fragments);
      } else if (bulk != nullptr) {
        for (size_t o = 0; st.ok() && o < bulk_len; o += kBulkChunk) {
          st = WriteBytes(fd, bulk + o, std::min(kBulkChunk, bulk_len - o),
                          options_.io_timeout_ms);
        }
      } else {
        st = SendBulk(fd, reading->segments, 0, bulk_len, options_.io_timeout_ms);
      }
      std::lock_guard<std::mutex> lock(mu_);
      --reading->readers;
      Retire(*reading);
    }
    if (!st.ok()) return;
  }
}

Status EcPeer::HandlePiece(int fd, const proto::EcPiece& pc) {
  int p = -1;
  const int s = pc.stripe();
  if (s >= 0 && s < n_) p = Mod(li_ - s, n_);
  // Read the bytes first in any case: the stream must stay in step. The piece may arrive before
  // this node heard every announce (P unknown yet): it is padded to P when encoded. Buffers are
  // recycled across versions: fresh pages would cost a page fault per 4 KiB every snapshot.
  std::vector<uint8_t> buf;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!spare_.empty()) {
      buf = std::move(spare_.back());
      spare_.pop_back();
    }
  }
  buf.resize(pc.length());
  STRATA_RETURN_IF_ERROR(ReadBulk(fd, buf.data(), pc.length(), options_.io_timeout_ms));
  if (p < 0 || p >= options_.m || pc.d() < 0 || pc.d() >= options_.k ||
      Mod(s + options_.m + pc.d(), n_) != pc.from()) {
    return Status::InvalidArgument(fmt::format(
        "piece of stripe {} d {} from {} does not belong to node {}", s, pc.d(), pc.from(),
        options_.node));
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (pc.version() <= group_version_ && versions_.count(pc.version()) == 0) {
    return Status::OK();  // stale
  }
  auto v = GetOrMake(pc.version());
  if (v->layout_known && pc.length() > v->P) {
    return Status::InvalidArgument("piece longer than the stripe's fragments");
  }
  auto& slot = v->pieces[p][pc.d()];
  const auto& sender = v->manifests[pc.from()];
  if ((slot.valid && NonceOlder(pc.nonce(), slot.nonce)) ||
      (sender && NonceOlder(pc.nonce(), sender->nonce()))) {
    if (spare_.size() < 4 * static_cast<size_t>(options_.k * options_.m)) {
      spare_.push_back(std::move(buf));
    }
    return Status::OK();  // of an attempt the sender has redone since
  }
  slot.buf = std::move(buf);
  slot.nonce = pc.nonce();
  slot.valid = true;
  Progress(lock, v);
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// Rebuild

std::vector<std::optional<proto::EcStateReply>> EcPeer::QueryStates(int* reachable) {
  std::vector<std::optional<proto::EcStateReply>> states(n_);
  *reachable = 0;
  for (int j = 0; j < n_; ++j) {
    if (j == li_) continue;
    proto::EcPeerRequest req;
    req.mutable_state();
    proto::EcPeerReply reply;
    Status st = SendToPeer(j, req, nullptr, 0, 0, &reply);
    if (st.ok()) st = ReplyStatus(reply);
    if (st.ok()) {
      states[j] = reply.state();
      ++*reachable;
    } else {
      STRATA_LOG(INFO, CKPT, "snapshotd node {}: node {}: {}", options_.node, GroupNode(j),
                 st.ToString());
    }
  }
  return states;
}

std::vector<bool> EcPeer::HoldersOf(
    int64_t version, const std::vector<std::optional<proto::EcStateReply>>& states) const {
  std::vector<bool> present(n_, false);
  for (int j = 0; j < n_; ++j) {
    if (!states[j]) continue;
    for (const auto& h : states[j]->held()) {
      if (h.version() == version && h.data_present() && h.parity_complete()) present[j] = true;
    }
  }
  return present;
}

StatusOr<EcRepaired> EcPeer::RepairLocal(int64_t version) {
  const int64_t t0 = NowNs();
  std::shared_ptr<Version> v;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = versions_.find(version);
    if (it == versions_.end() || !it->second->local_ready || !it->second->group_committed ||
        !it->second->manifests[li_]) {
      return Status::FailedPrecondition(fmt::format(
          "node {} holds no group-committed data of version {} to repair", options_.node,
          version));
    }
    v = it->second;
    ++v->readers;
  }
  struct Release {
    EcPeer* self;
    std::shared_ptr<Version> v;
    ~Release() {
      std::lock_guard<std::mutex> lock(self->mu_);
      --v->readers;
      self->Retire(*v);
    }
  } release{this, v};
  EcRepaired out;
  const uint32_t want = v->manifests[li_]->node_crc32c();
  if (SegmentsCrc(v->segments) == want) return out;  // intact: another rank asked first

  int reachable = 0;
  const std::vector<bool> present = HoldersOf(version, QueryStates(&reachable));
  std::string from;
  for (int j = 0; j < n_; ++j) {
    if (present[j]) from += fmt::format("{}{}", from.empty() ? "" : ",", GroupNode(j));
  }
  const size_t own = v->manifests[li_]->node_bytes(), P = v->P;
  // Back into the slots the version lives in: the bytes that were right stay the same.
  auto put = [&](int f, size_t o, const uint8_t* src, size_t c) {
    return PutDataChunk(v->segments, own, P, f, o, src, c);
  };
  STRATA_RETURN_IF_ERROR(
      StreamFragments(version, P, present, FragmentIds(0, options_.k), put, nullptr, &out.sources)
          .WithContext(fmt::format("repairing version {} of node {}", version, options_.node)));
  if (SegmentsCrc(v->segments) != want) {
    return Status::Corruption(fmt::format(
        "version {} of node {} still fails its CRC-32C after erasure decoding from nodes {}",
        version, options_.node, from));
  }
  out.repaired = true;
  out.seconds = (NowNs() - t0) / 1e9;
  out.note = fmt::format("node {}'s data of version {} failed its CRC-32C; rebuilt in place by "
                         "erasure decoding (k={} m={}) from nodes {} in {:.3f} s",
                         options_.node, version, options_.k, options_.m, from, out.seconds);
  STRATA_LOG(WARN, CKPT, "snapshotd: {}", out.note);
  return out;
}

StatusOr<EcRebuilt> EcPeer::Rebuild(const EcRebuildTarget& target) {
  const int64_t t0 = NowNs();
  int reachable = 0;
  const std::vector<std::optional<proto::EcStateReply>> states = QueryStates(&reachable);
  // The newest version any survivor reports group-committed.
  int64_t ver = -1;
  const proto::EcHeld* ref = nullptr;
  for (const auto& s : states) {
    if (!s) continue;
    for (const auto& h : s->held()) {
      if (h.group_committed() && h.version() > ver && h.manifests_size() == n_) {
        ver = h.version();
        ref = &h;
      }
    }
  }
  if (ref == nullptr) {
    return Status::NotFound(fmt::format(
        "no group-committed version on the {} reachable nodes of the group", reachable));
  }
  std::vector<bool> present = HoldersOf(ver, states);
  std::vector<uint32_t> parity_crc(n_, 0);
  for (int j = 0; j < n_; ++j) parity_crc[j] = ref->parity_crc32c(j);
  auto count_missing = [&] {
    return static_cast<int>(std::count(present.begin(), present.end(), false));
  };
  auto too_many = [&](const std::string& why) {
    std::string lost;
    for (int j = 0; j < n_; ++j) {
      if (!present[j]) lost += fmt::format("{}{}", lost.empty() ? "" : ",", GroupNode(j));
    }
    return Status::DataLoss(fmt::format(
        "cannot rebuild snapshot version {} of node {}: nodes {} of the erasure group {}..{} are "
        "lost{}, a k={} m={} group survives at most {}; restore from disk", ver, options_.node,
        lost, group_base_, group_base_ + n_ - 1, why, options_.k, options_.m, options_.m));
  };
  if (count_missing() > options_.m) return too_many("");

  size_t B = 0;
  for (const auto& mf : ref->manifests()) B = std::max<size_t>(B, mf.node_bytes());
  STRATA_ASSIGN_OR_RETURN(StripeLayout layout, StripeLayout::Create(options_.k, options_.m, B));
  if (target) {
    // This node's parity of `ver` only matters if another node is lost before a newer version
    // commits, so it is rebuilt after the ranks resume (RebuildParityLater), which halves what
    // must cross the network first for 1+1 (a third less for 2+1). Unless a survivor has not
    // group-committed `ver` yet (the lost node died while sending its parity-dones): that
    // survivor commits it only on this node's parity-done, which must then be true at once.
    bool defer = true;
    for (int j = 0; j < n_; ++j) {
      if (!present[j]) continue;
      bool committed = false;
      for (const auto& h : states[j]->held()) {
        committed = committed || (h.version() == ver && h.group_committed());
      }
      defer = defer && committed;
    }
    STRATA_ASSIGN_OR_RETURN(std::vector<EcSegment> dest, target(ref->manifests(li_)));
    StatusOr<EcRebuilt> streamed =
        RebuildStreaming(ver, *ref, layout, present, parity_crc, dest, t0, defer);
    if (streamed.ok()) return streamed;
    STRATA_LOG(WARN, CKPT, "snapshotd node {}: streaming rebuild of version {}: {}; fetching "
                           "whole buffers instead", options_.node, ver,
               streamed.status().ToString());
  }
  const int64_t t_state = NowNs();
  // Uninitialized: every byte is either fetched, zeroed padding, or a decoding destination.
  // (Zero-filled vectors took 6.3 s of a 7.5 s rebuild of 0.75 GiB: the page faults plus a
  // memset of ~3x the node's data.)
  std::vector<AlignedBuffer> data, parity;
  for (int j = 0; j < n_; ++j) {
    data.emplace_back(B, 4096);
    parity.emplace_back(layout.parity_bytes(), 4096);
  }
  std::vector<bool> bad_parity(n_, false);
  std::vector<std::thread> fetchers;
  std::mutex fmu;
  for (int j = 0; j < n_; ++j) {
    if (!present[j]) continue;
    fetchers.emplace_back([&, j] {
      for (int which = 0; which < 2; ++which) {
        proto::EcPeerRequest req;
        req.mutable_fetch()->set_version(ver);
        req.mutable_fetch()->set_parity(which == 1);
        auto fd = ConnectPeer(j);
        Status st = fd.status();
        proto::EcPeerReply reply;
        uint8_t* dst = which == 0 ? data[j].as<uint8_t>() : parity[j].as<uint8_t>();
        const size_t want = which == 0 ? ref->manifests(j).node_bytes() : parity[j].size();
        // A node with less data than the largest is zero-padded up to B (as it was encoded).
        if (which == 0 && want < B) std::memset(dst + want, 0, B - want);
        if (st.ok()) st = WriteFrame(*fd, req, options_.io_timeout_ms);
        if (st.ok()) st = ReadFrame(*fd, &reply, options_.io_timeout_ms);
        if (st.ok()) st = ReplyStatus(reply);
        if (st.ok() && reply.length() != want) {
          st = Status::Corruption(fmt::format("sent {} bytes, expected {}", reply.length(), want));
        }
        if (st.ok()) st = ReadBulk(*fd, dst, want, options_.io_timeout_ms);
        if (fd.ok()) ::close(*fd);
        const uint32_t expect = which == 0 ? ref->manifests(j).node_crc32c() : parity_crc[j];
        if (st.ok() && FragmentChecksum(dst, want) != expect) {
          st = Status::Corruption(fmt::format("{} of node {} fails its CRC-32C",
                                              which == 0 ? "data" : "parity", GroupNode(j)));
        }
        if (!st.ok()) {
          STRATA_LOG(WARN, CKPT, "snapshotd node {}: rebuild: {} of node {}: {}", options_.node,
                     which == 0 ? "data" : "parity", GroupNode(j), st.ToString());
          std::lock_guard<std::mutex> l(fmu);
          present[j] = false;
          if (which == 1 && st.code() == StatusCode::kCorruption) bad_parity[j] = true;
          return;
        }
      }
    });
  }
  const int64_t t_alloc = NowNs();
  for (std::thread& t : fetchers) t.join();
  const int64_t t_fetched = NowNs();
  if (count_missing() > options_.m) return too_many(" (or hold corrupted fragments)");

  std::vector<uint8_t*> dp(n_), pp(n_);
  for (int j = 0; j < n_; ++j) {
    dp[j] = data[j].as<uint8_t>();
    pp[j] = parity[j].as<uint8_t>();
  }
  {
    std::lock_guard<std::mutex> pl(pool_mu_);
    STRATA_RETURN_IF_ERROR(RebuildGroup(*rs_, layout, dp.data(), pp.data(), present,
                                        pool_.get()));
  }
  const int64_t t_decoded = NowNs();
  EcRebuilt out;
  out.version = ver;
  out.manifest = ref->manifests(li_);
  const size_t own = out.manifest.node_bytes();
  if (FragmentChecksum(data[li_].data(), own) != out.manifest.node_crc32c()) {
    return Status::Corruption(fmt::format(
        "rebuilt snapshot version {} of node {} does not match its manifest's CRC-32C", ver,
        options_.node));
  }
  if (FragmentChecksum(parity[li_].data(), parity[li_].size()) != parity_crc[li_]) {
    return Status::Corruption("rebuilt parity does not match the CRC-32C its node reported");
  }
  for (int j = 0; j < n_; ++j) {
    if (present[j] || j == li_) continue;
    out.missing.push_back(GroupNode(j));
    if (!bad_parity[j]) continue;
    proto::EcPeerRequest req;
    req.mutable_put_parity()->set_version(ver);
    req.mutable_put_parity()->set_length(parity[j].size());
    EcSegment seg{parity[j].as<uint8_t>(), parity[j].size()};
    proto::EcPeerReply reply;
    Status st = SendToPeer(j, req, &seg, 1, 0, &reply, parity[j].size());
    if (st.ok()) st = ReplyStatus(reply);
    if (st.ok()) {
      out.repaired.push_back(GroupNode(j));
    } else {
      STRATA_LOG(WARN, CKPT, "snapshotd node {}: repairing parity of node {}: {}",
                 options_.node, GroupNode(j), st.ToString());
    }
  }
  STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: rebuild of version {}: state {:.3f} s, buffers "
                          "{:.3f} s, fetch + check {:.3f} s, decode {:.3f} s, check + repair {:.3f} s",
             options_.node, ver, (t_state - t0) / 1e9, (t_alloc - t_state) / 1e9,
             (t_fetched - t_alloc) / 1e9, (t_decoded - t_fetched) / 1e9,
             (NowNs() - t_decoded) / 1e9);
  out.missing.insert(out.missing.begin(), options_.node);
  out.data = std::move(data[li_]);
  out.parity = std::move(parity[li_]);
  out.parity_crc = parity_crc;
  out.manifests.assign(ref->manifests().begin(), ref->manifests().end());
  out.seconds = (NowNs() - t0) / 1e9;
  STRATA_LOG(INFO, CKPT, "snapshotd node {}: rebuilt version {} ({} bytes) by erasure decoding "
                         "in {:.3f} s", options_.node, ver, own, out.seconds);
  return out;
}

Status EcPeer::StreamFragments(int64_t ver, size_t P, const std::vector<bool>& present,
                              const std::vector<int>& mine, const FragmentSink& put,
                              const std::function<bool()>& cancelled, int* sources) {
  const int k = options_.k, m = options_.m, nf = k + m;
  // Fragment x of stripe s lies on node (s + m + x) for data, (s + x - k) for parity, mod n, as
  // that node's own fragment x; this node's fragment f is in stripe StripeOf(f).
  auto node_of = [&](int s, int x) { return x < k ? Mod(s + m + x, n_) : Mod(s + x - k, n_); };
  auto stripe_of = [&](int f) { return f < k ? Mod(li_ - m - f, n_) : Mod(li_ - (f - k), n_); };
  // Per target fragment: the k source fragment ids it is decoded from (the first present ones,
  // data before parity: for a data node of a stripe whose other data nodes survive, that is
  // mostly data, which the survivors hold without any decoding).
  struct Target {
    int f, stripe;
    std::vector<bool> source;  // by fragment id
  };
  std::vector<Target> targets;
  std::vector<std::vector<int>> want(n_);  // per node: fragment ids to send, ascending
  for (int f : mine) {
    Target t{f, stripe_of(f), std::vector<bool>(nf, false)};
    int got = 0;
    for (int x = 0; x < nf && got < k; ++x) {
      const int j = node_of(t.stripe, x);
      if (j == li_ || !present[j]) continue;
      t.source[x] = true;
      want[j].push_back(x);
      ++got;
    }
    if (got < k) {
      return Status::DataLoss(fmt::format("stripe {} of version {} has {} of the {} fragments it "
                                          "needs", t.stripe, ver, got, k));
    }
    targets.push_back(std::move(t));
  }
  for (auto& w : want) std::sort(w.begin(), w.end());

  struct Fds {
    std::vector<int> fd;
    ~Fds() {
      for (int f : fd) {
        if (f >= 0) ::close(f);
      }
    }
  } conns{std::vector<int>(static_cast<size_t>(n_), -1)};
  std::vector<int> senders;
  for (int j = 0; j < n_; ++j) {
    if (want[j].empty()) continue;
    STRATA_ASSIGN_OR_RETURN(conns.fd[j], ConnectPeer(j));
    proto::EcPeerRequest req;
    req.mutable_fetch()->set_version(ver);
    req.mutable_fetch()->set_chunk_bytes(kStreamChunk);
    req.mutable_fetch()->set_piece_bytes(P);
    for (int x : want[j]) req.mutable_fetch()->add_fragments(x);
    proto::EcPeerReply reply;
    STRATA_RETURN_IF_ERROR(WriteFrame(conns.fd[j], req, options_.io_timeout_ms));
    STRATA_RETURN_IF_ERROR(ReadFrame(conns.fd[j], &reply, options_.io_timeout_ms));
    STRATA_RETURN_IF_ERROR(ReplyStatus(reply).WithContext(fmt::format("node {}", GroupNode(j))));
    if (reply.length() != want[j].size() * P) {
      return Status::Corruption(fmt::format("node {} offers {} striped bytes, expected {}",
                                            GroupNode(j), reply.length(), want[j].size() * P));
    }
    senders.push_back(j);
  }
  if (sources != nullptr) *sources = static_cast<int>(senders.size());

  // Chunk i of every fetched fragment lands in set i % 2, so that chunk i + 1 arrives while
  // chunk i is decoded: buf[set][j][w] is node j's w-th fragment of want[j].
  std::vector<std::vector<AlignedBuffer>> buf[2];
  for (int set = 0; set < 2; ++set) {
    buf[set].resize(n_);
    for (int j = 0; j < n_; ++j) {
      for (size_t w = 0; w < want[j].size(); ++w) buf[set][j].emplace_back(kStreamChunk, 4096);
    }
  }
  // Decoding destinations: the target, and the other fragments of its stripe that were not
  // fetched (Reconstruct rewrites every fragment it is not given).
  std::vector<AlignedBuffer> scratch;
  for (int x = 0; x < nf; ++x) scratch.emplace_back(kStreamChunk, 4096);

  const size_t chunks = (P + kStreamChunk - 1) / kStreamChunk;
  auto chunk_len = [&](size_t i) { return std::min(kStreamChunk, P - i * kStreamChunk); };
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  Status first_error;
  auto fail = [&](Status st) {
    std::lock_guard<std::mutex> l(err_mu);
    if (first_error.ok()) first_error = std::move(st);
    failed.store(true);
  };
  std::barrier sync(static_cast<std::ptrdiff_t>(senders.size() + 1));
  std::vector<std::thread> receivers;
  for (int j : senders) {
    receivers.emplace_back([&, j] {
      for (size_t i = 0; i < chunks; ++i) {
        if (!failed.load()) {
          const size_t c = chunk_len(i);
          for (size_t w = 0; w < want[j].size(); ++w) {
            Status st = ReadBulk(conns.fd[j], buf[i % 2][j][w].as<uint8_t>(), c,
                                 options_.io_timeout_ms);
            if (!st.ok()) {
              fail(st.WithContext(fmt::format("node {}", GroupNode(j))));
              break;
            }
          }
        }
        sync.arrive_and_wait();
      }
    });
  }
  auto decode = [&](size_t i) -> Status {
    const int set = static_cast<int>(i % 2);
    const size_t o = i * kStreamChunk, c = chunk_len(i);
    for (const Target& t : targets) {
      std::vector<uint8_t*> frag(nf);
      for (int x = 0; x < nf; ++x) {
        frag[x] = scratch[x].as<uint8_t>();
        if (!t.source[x]) continue;
        const int j = node_of(t.stripe, x);
        const size_t w = std::find(want[j].begin(), want[j].end(), x) - want[j].begin();
        frag[x] = buf[set][j][w].as<uint8_t>();
      }
      {
        std::lock_guard<std::mutex> pl(pool_mu_);
        STRATA_RETURN_IF_ERROR(rs_->Reconstruct(frag.data(), t.source, c, pool_.get()));
      }
      STRATA_RETURN_IF_ERROR(put(t.f, o, frag[t.f], c));
    }
    return Status::OK();
  };
  for (size_t i = 0; i <= chunks; ++i) {
    if (i > 0 && !failed.load()) {
      if (Status st = decode(i - 1); !st.ok()) fail(st);
    }
    if (i < chunks && !failed.load() && cancelled && cancelled()) {
      fail(Status::Aborted("no longer needed"));
    }
    if (i < chunks) sync.arrive_and_wait();
  }
  for (std::thread& t : receivers) t.join();
  return first_error;
}

StatusOr<EcRebuilt> EcPeer::RebuildStreaming(int64_t ver, const proto::EcHeld& ref,
                                             const StripeLayout& layout,
                                             const std::vector<bool>& present,
                                             const std::vector<uint32_t>& parity_crc,
                                             const std::vector<EcSegment>& dest, int64_t t0,
                                             bool defer_parity) {
  const int k = options_.k, m = options_.m;
  const size_t P = layout.piece_bytes();
  const size_t own = ref.manifests(li_).node_bytes();
  size_t dest_bytes = 0;
  for (const EcSegment& d : dest) dest_bytes += d.bytes;
  if (dest_bytes != own) {
    return Status::Internal(fmt::format("rebuild target holds {} bytes, the node buffer {}",
                                        dest_bytes, own));
  }
  // The parity goes straight into the version's parity object, which AdoptRebuilt takes over;
  // never over one this node still maps (AdoptRebuilt's DropVersion would unlink it by name).
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = versions_.find(ver);
    if (it != versions_.end() && it->second->parity != nullptr) {
      return Status::FailedPrecondition(
          fmt::format("version {} already has a parity buffer on this node", ver));
    }
  }
  EcShm parity_out;
  // Data only, or data and parity (every fragment this node holds).
  const std::vector<int> mine = FragmentIds(0, defer_parity ? k : k + m);
  if (!defer_parity) {
    STRATA_ASSIGN_OR_RETURN(parity_out,
                            EcShm::Create(EcParityShmName(options_.shm_run, options_.node, ver),
                                          layout.parity_bytes()));
  }
  auto put = [&](int f, size_t o, const uint8_t* src, size_t c) -> Status {
    if (f < k) return PutDataChunk(dest, own, P, f, o, src, c);
    std::memcpy(parity_out.data() + static_cast<size_t>(f - k) * P + o, src, c);
    return Status::OK();
  };
  int sources = 0;
  STRATA_RETURN_IF_ERROR(StreamFragments(ver, P, present, mine, put, nullptr, &sources));
  const int64_t t_decoded = NowNs();

  if (SegmentsCrc(dest) != ref.manifests(li_).node_crc32c()) {
    return Status::Corruption(fmt::format(
        "rebuilt snapshot version {} of node {} does not match its manifest's CRC-32C (a "
        "survivor sent corrupted bytes)", ver, options_.node));
  }
  if (!defer_parity &&
      FragmentChecksum(parity_out.data(), parity_out.size()) != parity_crc[li_]) {
    return Status::Corruption("rebuilt parity does not match the CRC-32C its node reported");
  }
  EcRebuilt out;
  out.version = ver;
  out.manifest = ref.manifests(li_);
  out.in_place = true;
  out.parity_pending = defer_parity;
  out.present = present;
  out.missing.push_back(options_.node);
  for (int j = 0; j < n_; ++j) {
    if (!present[j] && j != li_) out.missing.push_back(GroupNode(j));
  }
  out.parity_shm = std::move(parity_out);
  out.parity_crc = parity_crc;
  out.manifests.assign(ref.manifests().begin(), ref.manifests().end());
  out.seconds = (NowNs() - t0) / 1e9;
  STRATA_LOG(DEBUG, CKPT, "snapshotd node {}: streaming rebuild of version {} ({}) from {} "
                          "nodes: fetch + decode {:.3f} s, check {:.3f} s", options_.node, ver,
             defer_parity ? "data; parity later" : "data and parity", sources,
             (t_decoded - t0) / 1e9, (NowNs() - t_decoded) / 1e9);
  STRATA_LOG(INFO, CKPT, "snapshotd node {}: rebuilt version {} ({} bytes) by erasure decoding "
                         "in {:.3f} s", options_.node, ver, own, out.seconds);
  return out;
}

void EcPeer::RebuildParityLater(const std::shared_ptr<Version>& v, std::vector<bool> present) {
  ++v->readers;
  Spawn([this, v, present = std::move(present)] {
    const int64_t t0 = NowNs();
    const int k = options_.k, m = options_.m;
    Status st;
    EcShm shm;
    size_t P = 0;
    uint32_t want_crc = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      P = v->P;
      want_crc = v->parity_crc;
    }
    auto obsolete = [&] {
      std::lock_guard<std::mutex> lock(mu_);
      return stop_.load() || v->dropped || group_version_ > v->version;
    };
    StatusOr<EcShm> made = EcShm::Create(
        EcParityShmName(options_.shm_run, options_.node, v->version), static_cast<size_t>(m) * P);
    if (made.ok()) {
      shm = std::move(*made);
      st = StreamFragments(v->version, P, present, FragmentIds(k, k + m),
                           [&](int f, size_t o, const uint8_t* src, size_t c) {
                             std::memcpy(shm.data() + static_cast<size_t>(f - k) * P + o, src, c);
                             return Status::OK();
                           },
                           obsolete, nullptr);
    } else {
      st = made.status();
    }
    if (st.ok() && FragmentChecksum(shm.data(), shm.size()) != want_crc) {
      st = Status::Corruption("rebuilt parity does not match the CRC-32C its node reported");
    }
    std::lock_guard<std::mutex> lock(mu_);
    --v->readers;
    if (st.ok() && !v->dropped && v->parity == nullptr) {
      v->parity_name = shm.name();
      v->parity = shm.data();
      shm.Release();  // Retire unmaps and unlinks it
      v->stripe_done.assign(m, true);
      v->parity_complete = true;
      v->done_sent = true;
      const proto::EcParityDone done = ParityDone(*v, li_, v->parity_crc);
      v->done[li_] = done;
      STRATA_LOG(INFO, CKPT, "snapshotd node {}: parity of rebuilt version {} rebuilt in the "
                             "background in {:.3f} s", options_.node, v->version,
                 (NowNs() - t0) / 1e9);
      SendParityDone(v, done, "rebuilt ");
    } else if (st.code() == StatusCode::kAborted || v->dropped) {
      STRATA_LOG(INFO, CKPT, "snapshotd node {}: parity of rebuilt version {} no longer needed "
                             "(a newer version is group-committed)", options_.node, v->version);
    } else {
      STRATA_LOG(WARN, CKPT, "snapshotd node {}: background rebuild of the parity of version "
                             "{}: {}; this node's parity of it stays missing (the next "
                             "version protects the job again)", options_.node, v->version,
                 st.ToString());
    }
    Retire(*v);
  });
}

void EcPeer::AdoptRebuilt(EcRebuilt& rebuilt, std::vector<EcSegment> segments) {
  std::unique_lock<std::mutex> lock(mu_);
  auto old = versions_.find(rebuilt.version);
  if (old != versions_.end()) DropVersion(rebuilt.version);
  std::shared_ptr<Version> v = GetOrMake(rebuilt.version);
  v->local = true;
  v->local_ready = true;
  v->nonce = rebuilt.manifest.nonce();
  v->segments = std::move(segments);
  for (int j = 0; j < n_; ++j) InstallAnnounce(*v, j, rebuilt.manifests[j]);
  for (int j = 0; j < n_; ++j) {
    if (j != li_ || !rebuilt.parity_pending) v->done[j] = ParityDone(*v, j, rebuilt.parity_crc[j]);
  }
  v->parity_crc = rebuilt.parity_crc[li_];
  if (rebuilt.parity_pending) {
    // Every survivor group-committed it (Rebuild defers only then): so does this node, with its
    // parity missing until RebuildParityLater puts it in place. Meanwhile this node's EcHeld
    // says parity_complete = false, so another rebuild counts it as lost.
    MarkGroupCommitted(v);
    RebuildParityLater(v, rebuilt.present);
    return;
  }
  const bool in_shm = rebuilt.parity_shm.data() != nullptr;
  const size_t have = in_shm ? rebuilt.parity_shm.size() : rebuilt.parity.size();
  if (in_shm && v->parity == nullptr && v->parity_len == have) {
    v->parity_name = rebuilt.parity_shm.name();
    v->parity = rebuilt.parity_shm.data();
    rebuilt.parity_shm.Release();  // Retire unmaps and unlinks it
  }
  Status st = EnsureParityShm(*v);
  if (!st.ok() || v->parity_len != have) {
    STRATA_LOG(ERROR, CKPT, "snapshotd node {}: keeping rebuilt parity: {}", options_.node,
               st.ToString());
    return;
  }
  if (!in_shm && have > 0) std::memcpy(v->parity, rebuilt.parity.data(), v->parity_len);
  v->stripe_done.assign(options_.m, true);
  v->parity_complete = true;
  v->done_sent = true;
  MaybeGroupCommit(v);
  // The lost node may have died between sending its parity-done of this version to one
  // survivor and to another: then one survivor group-committed it and another never will, and
  // the two would answer different versions forever. This node now holds its data and parity
  // of the version again, so it says so to everyone, which completes the laggard's commit.
  SendParityDone(v, *v->done[li_], "rebuilt ");
}

}  // namespace strata::checkpoint
