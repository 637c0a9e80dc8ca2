#include "checkpoint/snapshot_wire.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <string>

#include <fmt/format.h>

#include "base/clock.h"
#include "checkpoint/erasure.h"

namespace strata::checkpoint {
namespace {

constexpr uint32_t kManifestMagic = 0x534e4150;  // "SNAP"
constexpr size_t kManifestHeader = 16;           // magic, length, crc32c, reserved

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

// Milliseconds left until `deadline_ns`, or -1 (forever) when there is no deadline.
int RemainingMs(int64_t deadline_ns) {
  if (deadline_ns < 0) return -1;
  const int64_t left = deadline_ns - NowNs();
  return left <= 0 ? 0 : static_cast<int>((left + 999999) / 1000000);
}

// Waits for `events` on fd; DeadlineExceeded when the deadline passes first.
Status WaitFd(int fd, short events, int64_t deadline_ns) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int ms = RemainingMs(deadline_ns);
    const int r = ::poll(&p, 1, ms);
    if (r > 0) return Status::OK();  // readable, writable, or HUP/ERR: the I/O call will say
    if (r == 0) return Status::DeadlineExceeded("snapshotd socket: timed out");
    if (errno != EINTR) return ErrnoStatus("snapshotd socket: poll", errno);
  }
}

Status WriteAll(int fd, const uint8_t* p, size_t n, int64_t deadline_ns) {
  while (n > 0) {
    // MSG_NOSIGNAL: a peer that died must give EPIPE here, not SIGPIPE to the whole trainer.
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      STRATA_RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline_ns));
      continue;
    }
    const int err = errno;
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) {
      return Status::Unavailable(
          fmt::format("snapshotd socket: peer closed the connection ({})", std::strerror(err)));
    }
    return ErrnoStatus("snapshotd socket: send", err);
  }
  return Status::OK();
}

Status ReadAll(int fd, uint8_t* p, size_t n, int64_t deadline_ns) {
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, MSG_DONTWAIT);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return Status::Unavailable("snapshotd socket: peer closed the connection");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      STRATA_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline_ns));
      continue;
    }
    const int err = errno;
    if (err == ECONNRESET || err == ENOTCONN) {
      return Status::Unavailable(
          fmt::format("snapshotd socket: peer reset the connection ({})", std::strerror(err)));
    }
    return ErrnoStatus("snapshotd socket: recv", err);
  }
  return Status::OK();
}

int64_t DeadlineFrom(int timeout_ms) {
  return timeout_ms < 0 ? -1 : NowNs() + static_cast<int64_t>(timeout_ms) * 1000000;
}

}  // namespace

std::string SanitizeRunName(const std::string& run) {
  std::string out = run.empty() ? std::string("default") : run;
  for (char& c : out) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) c = '_';
  }
  // sun_path holds 108 bytes; keep "/tmp/strata-snapshotd-" + name + ".sock" well inside it.
  constexpr size_t kMaxName = 64;
  if (out.size() > kMaxName || out != run) {
    // Two different runs must not collide after sanitizing ("a/b" vs "a_b"): add a hash of the
    // original whenever characters were replaced or cut.
    const size_t h = std::hash<std::string>{}(run);
    out = fmt::format("{}-{:08x}", out.substr(0, kMaxName - 9), static_cast<uint32_t>(h));
  }
  return out;
}

std::string DefaultSocketPath(const std::string& run) {
  return fmt::format("/tmp/strata-snapshotd-{}.sock", SanitizeRunName(run));
}

std::string NodeSocketPath(const std::string& run, const std::string& tag) {
  return DefaultSocketPath(tag.empty() ? run : run + "." + tag);
}

std::string SlotShmName(const std::string& run, int rank, int slot) {
  return fmt::format("/strata-snap-{}-r{}-s{}", SanitizeRunName(run), rank, slot);
}

size_t SlotBytes(size_t bytes_per_version) {
  return SlotDataBytes(bytes_per_version) + kManifestRoomBytes;
}

Status WriteSlotManifest(uint8_t* slot, size_t bytes_per_version,
                         const proto::SnapshotManifest& manifest) {
  const std::string body = manifest.SerializeAsString();
  if (body.size() + kManifestHeader > kManifestRoomBytes) {
    return Status::ResourceExhausted(fmt::format(
        "snapshot manifest of {} bytes does not fit the {} byte manifest room (too many sections)",
        body.size(), kManifestRoomBytes - kManifestHeader));
  }
  uint8_t* room = slot + SlotDataBytes(bytes_per_version);
  // Invalidate first, so a reader (or a crash) in the middle never pairs a new body with an old
  // header: the checksum would catch it anyway, this just makes the window explicit.
  PutU32(room, 0);
  std::memcpy(room + kManifestHeader, body.data(), body.size());
  PutU32(room + 4, static_cast<uint32_t>(body.size()));
  PutU32(room + 8, FragmentChecksum(body.data(), body.size()));
  PutU32(room + 12, 0);
  PutU32(room, kManifestMagic);
  return Status::OK();
}

StatusOr<proto::SnapshotManifest> ReadSlotManifest(const uint8_t* slot,
                                                   size_t bytes_per_version) {
  const uint8_t* room = slot + SlotDataBytes(bytes_per_version);
  if (GetU32(room) != kManifestMagic) return Status::NotFound("slot manifest never written");
  const uint32_t len = GetU32(room + 4);
  if (len > kManifestRoomBytes - kManifestHeader) {
    return Status::Corruption(fmt::format("slot manifest length {} out of range", len));
  }
  if (FragmentChecksum(room + kManifestHeader, len) != GetU32(room + 8)) {
    return Status::Corruption("slot manifest checksum mismatch");
  }
  proto::SnapshotManifest m;
  if (!m.ParseFromArray(room + kManifestHeader, static_cast<int>(len))) {
    return Status::Corruption("slot manifest does not parse");
  }
  return m;
}

Status WriteFrame(int fd, const google::protobuf::MessageLite& msg, int timeout_ms) {
  const size_t size = msg.ByteSizeLong();
  if (size > kMaxFrameBytes) {
    return Status::InvalidArgument(
        fmt::format("snapshot frame of {} bytes exceeds the {} byte limit", size, kMaxFrameBytes));
  }
  std::string buf(4 + size, '\0');
  PutU32(reinterpret_cast<uint8_t*>(buf.data()), static_cast<uint32_t>(size));
  if (!msg.SerializeToArray(buf.data() + 4, static_cast<int>(size))) {
    return Status::Internal("snapshot frame: serialization failed");
  }
  return WriteAll(fd, reinterpret_cast<const uint8_t*>(buf.data()), buf.size(),
                  DeadlineFrom(timeout_ms));
}

Status ReadFrame(int fd, google::protobuf::MessageLite* msg, int timeout_ms) {
  const int64_t deadline = DeadlineFrom(timeout_ms);
  uint8_t hdr[4];
  STRATA_RETURN_IF_ERROR(ReadAll(fd, hdr, 4, deadline));
  const uint32_t size = GetU32(hdr);
  if (size > kMaxFrameBytes) {
    return Status::InvalidArgument(fmt::format(
        "malformed snapshot frame: length {} exceeds the {} byte limit", size, kMaxFrameBytes));
  }
  std::string buf(size, '\0');
  STRATA_RETURN_IF_ERROR(ReadAll(fd, reinterpret_cast<uint8_t*>(buf.data()), size, deadline));
  if (!msg->ParseFromString(buf)) {
    return Status::InvalidArgument(
        fmt::format("malformed snapshot frame: {} bytes do not parse as {}", size,
                    msg->GetTypeName()));
  }
  return Status::OK();
}

StatusOr<int> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(fmt::format("socket path too long: {}", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoStatus("snapshotd: socket", errno);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::Unavailable(fmt::format("snapshotd: nothing listens on {} ({})", path,
                                           std::strerror(err)));
  }
  return fd;
}

Status WriteBytes(int fd, const void* data, size_t n, int timeout_ms) {
  return WriteAll(fd, static_cast<const uint8_t*>(data), n, DeadlineFrom(timeout_ms));
}

Status ReadBytes(int fd, void* data, size_t n, int timeout_ms) {
  return ReadAll(fd, static_cast<uint8_t*>(data), n, DeadlineFrom(timeout_ms));
}

}  // namespace strata::checkpoint
