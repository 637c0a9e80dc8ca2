// Pieces shared by snapshotd (checkpoint/snapshotd.h) and its client
// (checkpoint/snapshot_client.h): names derived from the run, the layout of a shared-memory slot,
// and length-prefixed protobuf frames on a Unix socket (proto/snapshot.proto).
//
// Slot layout: [data: bytes_per_version rounded up to 4 KiB][manifest room: kManifestRoomBytes].
// The manifest room holds {magic, length, crc32c, SnapshotManifest bytes} describing what the
// slot holds (written by snapshotd at publish and again at commit), so the slot explains itself
// to anyone who maps it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "base/status.h"
#include "proto/snapshot.pb.h"

namespace strata::checkpoint {

// A frame larger than this is malformed: requests and replies are small (the data itself moves
// through shared memory), so a bigger length prefix means a confused or hostile peer.
inline constexpr uint32_t kMaxFrameBytes = 4u << 20;
inline constexpr size_t kManifestRoomBytes = 64 << 10;
inline constexpr size_t kSlotAlign = 4096;

// Run name with every character outside [A-Za-z0-9._-] replaced by '_'; long names are cut and
// get a hash suffix so they stay unique and fit in a socket path / shm name.
std::string SanitizeRunName(const std::string& run);
// "/tmp/strata-snapshotd-<sanitized run>.sock"
std::string DefaultSocketPath(const std::string& run);
// The socket of node `tag`'s snapshotd when several nodes of a job share one machine (network
// namespaces): DefaultSocketPath(run + "." + tag), or DefaultSocketPath(run) for an empty tag.
std::string NodeSocketPath(const std::string& run, const std::string& tag);
// "/strata-snap-<sanitized run>-r<rank>-s<slot>"
std::string SlotShmName(const std::string& run, int rank, int slot);
// Data bytes rounded up to kSlotAlign plus the manifest room.
size_t SlotBytes(size_t bytes_per_version);
inline size_t SlotDataBytes(size_t bytes_per_version) {
  return (bytes_per_version + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
}

// Writes/reads the manifest room of a mapped slot. Reading: NotFound when the room was never
// written, Corruption when its checksum does not match.
Status WriteSlotManifest(uint8_t* slot, size_t bytes_per_version,
                         const proto::SnapshotManifest& manifest);
StatusOr<proto::SnapshotManifest> ReadSlotManifest(const uint8_t* slot, size_t bytes_per_version);

// One frame. `timeout_ms` < 0 waits forever. Unavailable when the peer closed or reset the
// connection, DeadlineExceeded on timeout, InvalidArgument for a frame over kMaxFrameBytes or one
// that does not parse.
Status WriteFrame(int fd, const google::protobuf::MessageLite& msg, int timeout_ms);
Status ReadFrame(int fd, google::protobuf::MessageLite* msg, int timeout_ms);

// Raw bytes on a stream socket (the bulk that follows some peer frames, snapshot_ec.h); the same
// errors as the frame functions. `timeout_ms` bounds the whole transfer (< 0: forever).
Status WriteBytes(int fd, const void* data, size_t n, int timeout_ms);
Status ReadBytes(int fd, void* data, size_t n, int timeout_ms);

// Connects a SOCK_STREAM Unix socket to `path`; Unavailable when nobody listens there.
StatusOr<int> ConnectUnix(const std::string& path);

}  // namespace strata::checkpoint
