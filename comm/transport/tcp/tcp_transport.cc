#include "comm/transport/tcp/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sched.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <set>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/logging.h"

namespace strata::comm::tcp {
namespace {

constexpr uint32_t kMsgMagic = 0x53545231;    // "STR1": every message header starts with it
constexpr uint32_t kHelloMagic = 0x53544830;  // "STH0": first bytes on a new connection

struct Header {
  uint32_t magic;
  int32_t tag;
  uint64_t bytes;
};
static_assert(sizeof(Header) == 16);

struct Hello {
  uint32_t magic;
  int32_t rank;
  int32_t size;
};

struct SendOp {
  Request id;
  Header header;
  const char* buf;
  size_t bytes;
  size_t sent = 0;  // counts header bytes too
};

struct RecvOp {
  Request id;
  char* buf;
  size_t bytes;
  int tag;
};

// A message that arrived before its receive was posted.
struct Unexpected {
  int tag;
  std::vector<char> data;
  int64_t ready_at_ns;
};

struct Peer {
  int fd = -1;
  std::string addr;
  std::deque<SendOp> sends;
  std::deque<RecvOp> recvs;
  std::deque<Unexpected> unexpected;
  Status failure;  // non-OK once the connection broke or the stream was inconsistent

  // Receive state machine for the message currently arriving.
  Header header{};
  size_t header_got = 0;
  bool in_payload = false;
  char* dst = nullptr;
  size_t payload_got = 0;
  Request target = kNullRequest;  // kNullRequest: reading into unexpected_buf
  std::vector<char> unexpected_buf;
};

struct RequestState {
  bool in_use = false;
  bool done = false;
  int peer = -1;
  int64_t ready_at_ns = 0;  // completion becomes visible then (emulated delay)
  Status status;
};

Status SetSocketOptions(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return ErrnoStatus("tcp: setsockopt TCP_NODELAY", errno);
  }
  return Status::OK();
}

Status SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoStatus("tcp: fcntl O_NONBLOCK", errno);
  }
  return Status::OK();
}

// Blocking I/O with a deadline, used only during connection setup.
Status WriteFull(int fd, const void* buf, size_t n, const Deadline& deadline) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    pollfd pfd{fd, POLLOUT, 0};
    const int rc = ::poll(&pfd, 1, static_cast<int>(deadline.remaining_ms_for_poll()));
    if (rc == 0) return Status::DeadlineExceeded("tcp: handshake write timed out");
    if (rc < 0 && errno != EINTR) return ErrnoStatus("tcp: poll", errno);
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return ErrnoStatus("tcp: handshake send", errno);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}

Status ReadFull(int fd, void* buf, size_t n, const Deadline& deadline) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int rc = ::poll(&pfd, 1, static_cast<int>(deadline.remaining_ms_for_poll()));
    if (rc == 0) return Status::DeadlineExceeded("tcp: handshake read timed out");
    if (rc < 0 && errno != EINTR) return ErrnoStatus("tcp: poll", errno);
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r == 0) return Status::Unavailable("tcp: peer closed the connection during handshake");
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return ErrnoStatus("tcp: handshake recv", errno);
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::OK();
}

StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos) return Status::InvalidArgument("tcp: bad address '" + s + "'");
  return std::make_pair(s.substr(0, colon), std::stoi(s.substr(colon + 1)));
}

class TcpTransport final : public Transport {
 public:
  TcpTransport(int rank, int size, int64_t delay_us, int64_t spin_us)
      : rank_(rank), size_(size), delay_ns_(delay_us * 1000), spin_ns_(spin_us * 1000),
        peers_(size) {}

  ~TcpTransport() override { Close(); }

  // Orderly goodbye: finish queued sends, half-close, then read until every peer has half-closed
  // too. Closing a socket that still has unread bytes makes the kernel send RST, which can destroy
  // data a slower peer has not read yet; a rank that finishes its last collective first must not
  // break the others.
  void Close() {
    const Deadline deadline = Deadline::After(std::chrono::seconds(10));
    for (int r = 0; r < size_; ++r) {
      while (peers_[r].fd >= 0 && !peers_[r].sends.empty() && !deadline.expired()) {
        DriveSends(r);
        if (!peers_[r].sends.empty()) {
          pollfd pfd{peers_[r].fd, POLLOUT, 0};
          ::poll(&pfd, 1, 10);
        }
      }
      if (peers_[r].fd >= 0) ::shutdown(peers_[r].fd, SHUT_WR);
    }
    char sink[4096];
    while (!deadline.expired()) {
      std::vector<pollfd> fds;
      for (const Peer& p : peers_) {
        if (p.fd >= 0) fds.push_back(pollfd{p.fd, POLLIN, 0});
      }
      if (fds.empty()) break;
      if (::poll(fds.data(), fds.size(), 100) < 0 && errno != EINTR) break;
      for (const pollfd& f : fds) {
        if (f.revents == 0) continue;
        const ssize_t n = ::recv(f.fd, sink, sizeof(sink), 0);
        if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR))) continue;
        for (Peer& p : peers_) {
          if (p.fd == f.fd) {
            ::close(p.fd);
            p.fd = -1;
          }
        }
      }
    }
    for (Peer& p : peers_) {
      if (p.fd >= 0) ::close(p.fd);
      p.fd = -1;
    }
  }

  Status Connect(Rendezvous& rendezvous, const TcpOptions& options) {
    const Deadline deadline = Deadline::After(options.connect_timeout);
    STRATA_ASSIGN_OR_RETURN(std::string ip,
                            ResolveInterfaceAddress(options.ifname, options.single_node));

    const int listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0) return ErrnoStatus("tcp: socket", errno);
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{listen_fd};
    int one = 1;
    ::setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;  // ephemeral: several ranks per host never collide
    if (::inet_pton(AF_INET, ip.c_str(), &addr.sin_addr) != 1) {
      return Status::InvalidArgument("tcp: bad IPv4 address '" + ip + "'");
    }
    if (::bind(listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      return ErrnoStatus("tcp: bind " + ip, errno);
    }
    if (::listen(listen_fd, size_) != 0) return ErrnoStatus("tcp: listen", errno);
    socklen_t len = sizeof(addr);
    ::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len);
    const std::string me = ip + ":" + std::to_string(ntohs(addr.sin_port));

    STRATA_ASSIGN_OR_RETURN(std::vector<std::string> addrs,
                            rendezvous.AllGather(me, deadline));
    for (int r = 0; r < size_; ++r) peers_[r].addr = addrs[r];

    // Lower ranks listen, higher ranks connect: every pair gets exactly one connection. All
    // ranks listen before the rendezvous completes, so connects land in the backlog.
    for (int r = 0; r < rank_; ++r) {
      STRATA_ASSIGN_OR_RETURN(int fd, ConnectTo(addrs[r], deadline));
      peers_[r].fd = fd;
      const Hello hello{kHelloMagic, rank_, size_};
      STRATA_RETURN_IF_ERROR(WriteFull(fd, &hello, sizeof(hello), deadline));
    }
    for (int accepted = rank_ + 1; accepted < size_; ++accepted) {
      pollfd pfd{listen_fd, POLLIN, 0};
      const int rc = ::poll(&pfd, 1, static_cast<int>(deadline.remaining_ms_for_poll()));
      if (rc == 0) {
        return Status::DeadlineExceeded("tcp: rank " + std::to_string(rank_) +
                                        " timed out waiting for connections from higher ranks");
      }
      if (rc < 0) {
        if (errno == EINTR) { --accepted; continue; }
        return ErrnoStatus("tcp: poll(listen)", errno);
      }
      const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return ErrnoStatus("tcp: accept", errno);
      Hello hello{};
      Status st = ReadFull(fd, &hello, sizeof(hello), deadline);
      if (!st.ok() || hello.magic != kHelloMagic || hello.size != size_ || hello.rank <= rank_ ||
          hello.rank >= size_ || peers_[hello.rank].fd >= 0) {
        ::close(fd);
        if (!st.ok()) return st;
        return Status::Internal("tcp: bad handshake (magic/rank/size mismatch: another job on "
                                "this port, or ranks launched with different sizes?)");
      }
      peers_[hello.rank].fd = fd;
    }
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      STRATA_RETURN_IF_ERROR(SetSocketOptions(peers_[r].fd));
      STRATA_RETURN_IF_ERROR(SetNonBlocking(peers_[r].fd));
    }
    STRATA_LOG(INFO, COMM, "tcp: rank {} listening on {}, connected to {} peers{}", rank_, me,
               size_ - 1,
               delay_ns_ > 0 ? fmt::format(" (EMULATED link delay {} us)", delay_ns_ / 1000)
                             : std::string());
    return Status::OK();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "tcp"; }
  int64_t emulated_delay_us() const override { return delay_ns_ / 1000; }
  Status health() const override { return health_; }

  StatusOr<Request> Isend(int peer, const void* buf, size_t bytes, int tag) override {
    STRATA_RETURN_IF_ERROR(CheckPeer(peer));
    Peer& p = peers_[peer];
    const Request id = NewRequest(peer);
    STRATA_LOG(TRACE, COMM, "tcp: isend req {} to {} tag {} bytes {}", id, peer, tag, bytes);
    p.sends.push_back(SendOp{id, Header{kMsgMagic, tag, bytes}, static_cast<const char*>(buf),
                             bytes});
    // Write right away: on an idle connection the whole message usually fits the socket buffer,
    // so the common small send costs one syscall and never waits for the progress loop.
    if (p.sends.size() == 1) DriveSends(peer);
    return id;
  }

  StatusOr<Request> Irecv(int peer, void* buf, size_t bytes, int tag) override {
    // A peer that finished and closed its end may still have sent what this receive wants:
    // messages already read are delivered before its departure counts as an error.
    const bool queued = peer >= 0 && peer < size_ && peer != rank_ && health_.ok() &&
                        !peers_[peer].unexpected.empty();
    if (!queued) STRATA_RETURN_IF_ERROR(CheckPeer(peer));
    Peer& p = peers_[peer];
    const Request id = NewRequest(peer);
    STRATA_LOG(TRACE, COMM, "tcp: irecv req {} from {} tag {} bytes {} (unexpected queued: {})",
               id, peer, tag, bytes, p.unexpected.size());
    if (!p.unexpected.empty()) {
      Unexpected u = std::move(p.unexpected.front());
      p.unexpected.pop_front();
      Status st = CheckMatch(peer, tag, bytes, u.tag, u.data.size());
      if (st.ok() && bytes > 0) std::memcpy(buf, u.data.data(), bytes);
      Complete(id, u.ready_at_ns, std::move(st));
      return id;
    }
    p.recvs.push_back(RecvOp{id, static_cast<char*>(buf), bytes, tag});
    return id;
  }

  StatusOr<size_t> WaitAny(std::span<Request> requests, const Deadline& deadline) override {
    const int64_t spin_until = NowNs() + spin_ns_;
    while (true) {
      bool any = false;
      int64_t next_ready = INT64_MAX;
      const int64_t now = NowNs();
      for (size_t i = 0; i < requests.size(); ++i) {
        if (requests[i] == kNullRequest) continue;
        any = true;
        RequestState& rs = requests_[requests[i]];
        if (!rs.done) continue;
        if (!rs.status.ok()) return Finish(requests[i], &requests[i]);
        if (rs.ready_at_ns <= now) {
          STRATA_RETURN_IF_ERROR(Finish(requests[i], &requests[i]));
          return i;
        }
        next_ready = std::min(next_ready, rs.ready_at_ns);
      }
      if (!any) return Status::InvalidArgument("tcp: WaitAny on no active request");
      STRATA_RETURN_IF_ERROR(PollOnce(requests, deadline, next_ready, spin_until));
    }
  }

  Status WaitAll(std::span<Request> requests, const Deadline& deadline) override {
    const int64_t spin_until = NowNs() + spin_ns_;
    while (true) {
      bool pending = false;
      int64_t next_ready = INT64_MAX;
      const int64_t now = NowNs();
      for (Request& r : requests) {
        if (r == kNullRequest) continue;
        RequestState& rs = requests_[r];
        if (rs.done && (!rs.status.ok() || rs.ready_at_ns <= now)) {
          STRATA_RETURN_IF_ERROR(Finish(r, &r));
          continue;
        }
        pending = true;
        if (rs.done) next_ready = std::min(next_ready, rs.ready_at_ns);
      }
      if (!pending) return Status::OK();
      STRATA_RETURN_IF_ERROR(PollOnce(requests, deadline, next_ready, spin_until));
    }
  }

  void Abort(const Status& why) override {
    if (health_.ok()) {
      health_ = why.ok() ? Status::Aborted("tcp: aborted") : why;
      STRATA_LOG(WARN, COMM, "tcp: rank {} aborting the group: {}", rank_, health_.ToString());
    }
    // Closing every connection tells each peer at once (EOF), so a failure anywhere propagates
    // to every rank within one round trip instead of each waiting for its own timeout.
    for (int r = 0; r < size_; ++r) {
      Peer& p = peers_[r];
      if (p.fd >= 0) {
        ::shutdown(p.fd, SHUT_RDWR);
        ::close(p.fd);
        p.fd = -1;
      }
      FailPeer(r, health_);
    }
  }

 private:
  Status CheckPeer(int peer) const {
    if (!health_.ok()) {
      return Status::FailedPrecondition("tcp: group is broken by an earlier error: " +
                                        health_.ToString());
    }
    if (peer < 0 || peer >= size_ || peer == rank_) {
      return Status::InvalidArgument("tcp: bad peer " + std::to_string(peer) + " (rank " +
                                     std::to_string(rank_) + " of " + std::to_string(size_) + ")");
    }
    if (!peers_[peer].failure.ok()) return peers_[peer].failure;
    return Status::OK();
  }

  Status CheckMatch(int peer, int want_tag, size_t want_bytes, int got_tag, size_t got_bytes) {
    if (want_tag == got_tag && want_bytes == got_bytes) return Status::OK();
    return Status::Internal(fmt::format(
        "tcp: message from rank {} does not match the posted receive (tag {} vs {}, {} vs {} "
        "bytes): ranks called different operations",
        peer, got_tag, want_tag, got_bytes, want_bytes));
  }

  Request NewRequest(int peer) {
    Request id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = static_cast<Request>(requests_.size());
      requests_.emplace_back();
    }
    requests_[id] = RequestState{true, false, peer, 0, Status::OK()};
    return id;
  }

  void Complete(Request id, int64_t ready_at_ns, Status status) {
    RequestState& rs = requests_[id];
    rs.done = true;
    rs.ready_at_ns = ready_at_ns;
    rs.status = std::move(status);
  }

  Status Finish(Request id, Request* slot) {
    Status st = std::move(requests_[id].status);
    requests_[id].in_use = false;
    free_.push_back(id);
    *slot = kNullRequest;
    return st;
  }

  void FailPeer(int peer, const Status& why) {
    Peer& p = peers_[peer];
    if (p.failure.ok()) p.failure = why;
    for (SendOp& s : p.sends) Complete(s.id, 0, p.failure);
    for (RecvOp& r : p.recvs) Complete(r.id, 0, p.failure);
    if (p.in_payload && p.target != kNullRequest) Complete(p.target, 0, p.failure);
    p.sends.clear();
    p.recvs.clear();
    p.in_payload = false;
    p.header_got = 0;
    p.target = kNullRequest;
  }

  // `orderly`: the peer closed between messages (it finished); only an error for requests that
  // still need it, so it is not worth a warning by itself.
  void PeerBroke(int peer, Status why, bool orderly = false) {
    if (orderly) {
      STRATA_LOG(DEBUG, COMM, "tcp: rank {}: rank {} closed its connection", rank_, peer);
    } else {
      STRATA_LOG(WARN, COMM, "tcp: rank {}: connection to rank {} ({}) failed: {}", rank_, peer,
                 peers_[peer].addr, why.ToString());
    }
    Peer& p = peers_[peer];
    if (p.fd >= 0) {
      ::close(p.fd);
      p.fd = -1;
    }
    FailPeer(peer, why);
  }

  // Writes as much of the peer's send queue as the socket takes.
  void DriveSends(int peer) {
    Peer& p = peers_[peer];
    while (!p.sends.empty()) {
      SendOp& op = p.sends.front();
      iovec iov[2];
      int n = 0;
      if (op.sent < sizeof(Header)) {
        iov[n++] = {reinterpret_cast<char*>(&op.header) + op.sent, sizeof(Header) - op.sent};
        if (op.bytes > 0) iov[n++] = {const_cast<char*>(op.buf), op.bytes};
      } else {
        const size_t off = op.sent - sizeof(Header);
        iov[n++] = {const_cast<char*>(op.buf) + off, op.bytes - off};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      const ssize_t w = ::sendmsg(p.fd, &msg, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        PeerBroke(peer, ErrnoStatus(fmt::format("tcp: send to rank {}", peer), errno));
        return;
      }
      op.sent += static_cast<size_t>(w);
      if (op.sent == sizeof(Header) + op.bytes) {
        Complete(op.id, 0, Status::OK());
        p.sends.pop_front();
      }
    }
  }

  // Reads everything available on the peer's connection, completing receives as they finish.
  void DriveRecvs(int peer) {
    Peer& p = peers_[peer];
    while (p.fd >= 0) {
      if (!p.in_payload) {
        const ssize_t r = ::recv(p.fd, reinterpret_cast<char*>(&p.header) + p.header_got,
                                 sizeof(Header) - p.header_got, 0);
        if (!HandleReadResult(peer, r)) return;
        p.header_got += static_cast<size_t>(r);
        if (p.header_got < sizeof(Header)) continue;
        p.header_got = 0;
        if (p.header.magic != kMsgMagic) {
          PeerBroke(peer, Status::Corruption(fmt::format(
                              "tcp: bad message header from rank {} (stream out of sync)", peer)));
          return;
        }
        StartPayload(peer);
        if (p.fd < 0) return;
      } else {
        const size_t want = p.header.bytes - p.payload_got;
        const ssize_t r = ::recv(p.fd, p.dst + p.payload_got, want, 0);
        if (!HandleReadResult(peer, r)) return;
        p.payload_got += static_cast<size_t>(r);
      }
      if (p.in_payload && p.payload_got == p.header.bytes) FinishPayload(peer);
    }
  }

  // False when nothing more can be read now (EAGAIN) or the connection broke.
  bool HandleReadResult(int peer, ssize_t r) {
    if (r > 0) return true;
    if (r == 0) {
      const Peer& p = peers_[peer];
      PeerBroke(peer,
                Status::Unavailable(fmt::format(
                    "tcp: rank {} ({}) closed the connection (process exited or was killed?)",
                    peer, p.addr)),
                /*orderly=*/!p.in_payload && p.header_got == 0);
      return false;
    }
    if (errno == EINTR) return true;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    PeerBroke(peer, ErrnoStatus(fmt::format("tcp: recv from rank {}", peer), errno));
    return false;
  }

  void StartPayload(int peer) {
    Peer& p = peers_[peer];
    p.in_payload = true;
    p.payload_got = 0;
    if (!p.recvs.empty()) {
      RecvOp op = p.recvs.front();
      p.recvs.pop_front();
      Status st = CheckMatch(peer, op.tag, op.bytes, p.header.tag, p.header.bytes);
      if (!st.ok()) {
        Complete(op.id, 0, st);
        PeerBroke(peer, st);
        return;
      }
      p.target = op.id;
      p.dst = op.buf;
    } else {
      p.target = kNullRequest;
      p.unexpected_buf.assign(p.header.bytes, 0);
      p.dst = p.unexpected_buf.data();
    }
  }

  void FinishPayload(int peer) {
    Peer& p = peers_[peer];
    STRATA_LOG(TRACE, COMM, "tcp: message from {} tag {} bytes {} complete -> req {}", peer,
               p.header.tag, p.header.bytes, p.target);
    p.in_payload = false;
    const int64_t ready = NowNs() + delay_ns_;
    if (p.target != kNullRequest) {
      Complete(p.target, ready, Status::OK());
      p.target = kNullRequest;
      return;
    }
    // A receive may have been posted while this message was arriving: it takes the message.
    if (!p.recvs.empty()) {
      RecvOp op = p.recvs.front();
      p.recvs.pop_front();
      Status st = CheckMatch(peer, op.tag, op.bytes, p.header.tag, p.header.bytes);
      if (st.ok() && op.bytes > 0) std::memcpy(op.buf, p.unexpected_buf.data(), op.bytes);
      Complete(op.id, ready, std::move(st));
      return;
    }
    p.unexpected.push_back(Unexpected{p.header.tag, std::move(p.unexpected_buf), ready});
    p.unexpected_buf = {};
  }

  // One round of poll() over every live connection: readable ones are drained (also to take
  // unexpected messages and notice dead peers early), writable ones get their queued sends.
  Status PollOnce(std::span<const Request> waiting, const Deadline& deadline, int64_t next_ready,
                  int64_t spin_until) {
    if (!health_.ok()) return health_;
    if (deadline.expired()) return TimeoutStatus(waiting);
    pollfds_.clear();
    poll_peers_.clear();
    for (int r = 0; r < size_; ++r) {
      const Peer& p = peers_[r];
      if (r == rank_ || p.fd < 0) continue;
      pollfds_.push_back(pollfd{p.fd, static_cast<short>(POLLIN | (p.sends.empty() ? 0 : POLLOUT)),
                                0});
      poll_peers_.push_back(r);
    }
    // ppoll takes nanoseconds: emulated sub-millisecond delays sleep exactly instead of spinning.
    int64_t timeout_ns =
        deadline.remaining_ms_for_poll() < 0 ? INT64_MAX : deadline.remaining().count();
    if (next_ready != INT64_MAX) timeout_ns = std::min(timeout_ns, std::max<int64_t>(0, next_ready - NowNs()));
    if (pollfds_.empty()) {
      // Nothing to poll: only delayed completions or failed requests remain.
      if (next_ready != INT64_MAX) {
        std::this_thread::sleep_for(std::chrono::nanoseconds(timeout_ns));
        return Status::OK();
      }
      return Status::Unavailable("tcp: no live connection left to wait on");
    }
    const bool spinning = NowNs() < spin_until;
    if (spinning) timeout_ns = 0;
    timespec ts{static_cast<time_t>(timeout_ns / 1000000000),
                static_cast<long>(timeout_ns % 1000000000)};
    const int rc = ::ppoll(pollfds_.data(), pollfds_.size(),
                           timeout_ns == INT64_MAX ? nullptr : &ts, nullptr);
    if (rc < 0) {
      if (errno == EINTR) return Status::OK();
      return ErrnoStatus("tcp: poll", errno);
    }
    if (rc == 0) {
      if (deadline.expired()) return TimeoutStatus(waiting);
      if (spinning) sched_yield();  // other ranks may share this core
      return Status::OK();
    }
    for (size_t i = 0; i < pollfds_.size(); ++i) {
      const short ev = pollfds_[i].revents;
      if (ev == 0) continue;
      const int peer = poll_peers_[i];
      if (ev & (POLLIN | POLLHUP | POLLERR)) DriveRecvs(peer);
      if (peers_[peer].fd >= 0 && (ev & POLLOUT)) DriveSends(peer);
    }
    return Status::OK();
  }

  Status TimeoutStatus(std::span<const Request> waiting) const {
    std::set<int> peers;
    for (Request r : waiting) {
      if (r != kNullRequest && !requests_[r].done) peers.insert(requests_[r].peer);
    }
    return Status::DeadlineExceeded(fmt::format(
        "tcp: rank {} timed out waiting for rank(s) {} (stalled or dead peer; raise "
        "STRATA_COMM_TIMEOUT_MS if the work is just slow)",
        rank_, fmt::join(peers, ",")));
  }

  StatusOr<int> ConnectTo(const std::string& host_port, const Deadline& deadline) {
    STRATA_ASSIGN_OR_RETURN(auto hp, SplitHostPort(host_port));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(hp.second));
    if (::inet_pton(AF_INET, hp.first.c_str(), &addr.sin_addr) != 1) {
      return Status::InvalidArgument("tcp: bad peer address '" + host_port + "'");
    }
    while (true) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) return ErrnoStatus("tcp: socket", errno);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
      const int err = errno;
      ::close(fd);
      if (deadline.expired()) {
        return ErrnoStatus("tcp: connect to " + host_port + " (gave up at the deadline)", err);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  const int rank_;
  const int size_;
  const int64_t delay_ns_;
  const int64_t spin_ns_;
  std::vector<Peer> peers_;
  std::vector<RequestState> requests_;
  std::vector<Request> free_;
  std::vector<pollfd> pollfds_;
  std::vector<int> poll_peers_;
  Status health_;
};

}  // namespace

StatusOr<std::string> ResolveInterfaceAddress(const std::string& ifname, bool single_node) {
  if (ifname == "auto" && single_node) return std::string("127.0.0.1");
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return ErrnoStatus("tcp: getifaddrs", errno);
  std::string found;
  std::vector<std::string> seen;
  for (ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    if (!(a->ifa_flags & IFF_UP)) continue;
    char buf[INET_ADDRSTRLEN];
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf));
    seen.push_back(std::string(a->ifa_name) + "=" + buf);
    const bool match = ifname == "auto" ? !(a->ifa_flags & IFF_LOOPBACK) : ifname == a->ifa_name;
    if (match && found.empty()) found = buf;
  }
  ::freeifaddrs(list);
  if (!found.empty()) return found;
  if (ifname == "auto") return std::string("127.0.0.1");  // a host with only loopback
  return Status::NotFound(fmt::format("tcp: interface '{}' has no IPv4 address that is up "
                                      "(STRATA_TCP_IFNAME; available: {})",
                                      ifname, fmt::join(seen, ", ")));
}

StatusOr<std::unique_ptr<Transport>> CreateTransport(Rendezvous& rendezvous,
                                                     const TcpOptions& options) {
  if (options.link_delay_us < 0) {
    return Status::InvalidArgument("tcp: link delay must be >= 0 us");
  }
  if (options.link_delay_us > 0) {
    // The emulated delay is a timed sleep in ppoll: without this, Linux's default 50 us timer
    // slack would be added to every emulated hop.
    ::prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
  }
  if (options.spin_us < 0) return Status::InvalidArgument("tcp: spin time must be >= 0 us");
  auto t = std::make_unique<TcpTransport>(rendezvous.rank(), rendezvous.size(),
                                          options.link_delay_us, options.spin_us);
  STRATA_RETURN_IF_ERROR(t->Connect(rendezvous, options).WithContext(
      fmt::format("tcp transport setup (rank {} of {})", rendezvous.rank(), rendezvous.size())));
  return std::unique_ptr<Transport>(std::move(t));
}

}  // namespace strata::comm::tcp
