// The trainer's side of node-local snapshots (checkpoint/snapshotd.h): one SnapshotClient per
// rank, connected to the node's snapshotd. A snapshot of step v is
//
//   STRATA_ASSIGN_OR_RETURN(uint8_t* dst, client->BeginVersion(v));  // this rank's writable slot
//   memcpy(dst + off_w, weights, nw); memcpy(dst + off_m, m, nm); ...  // any thread may copy
//   STRATA_RETURN_IF_ERROR(client->Publish(v, {{"weights", off_w, nw}, {"adam_m", off_m, nm},
//                                              ...}));               // CRC-32C computed here
//
// and a restart is Register (same rank, same bytes: the same regions come back) + Latest +
// ReadLatest into the caller's buffers, every section's checksum verified.
//
// Every call is one request/reply on the socket and is bounded by Options::rpc_timeout_s: a
// snapshotd that died answers Unavailable (connection closed or refused), one that hangs
// DeadlineExceeded; neither blocks the trainer forever. Not thread-safe: one thread talks to the
// client at a time (the memcpy into the slot may happen anywhere between BeginVersion and
// Publish).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "proto/snapshot.pb.h"

namespace strata::checkpoint {

// A named byte range of this rank's slot; offsets are from the pointer BeginVersion returned.
struct Section {
  std::string name;
  size_t offset = 0;
  size_t bytes = 0;
  // The section's CRC-32C when the caller has it already (CopyAndChecksum); else Publish reads
  // the section again to compute it.
  std::optional<uint32_t> crc32c;
};

// memcpy and CRC-32C in one pass over memory. Each 256 KiB chunk of the source is checksummed,
// which brings it into cache, and then copied from there; copies of a MiB or more write with
// non-temporal stores, so the destination is not first read into cache only to be overwritten
// (a third less memory traffic: snapshots and restores move GiBs that no cache holds).
// Returns the CRC-32C of the bytes copied.
uint32_t CopyAndChecksum(void* dst, const void* src, size_t bytes);

// Where ReadLatest copies a section to; `bytes` must equal the section's size.
struct SectionBuffer {
  std::string name;
  void* dst = nullptr;
  size_t bytes = 0;
};

struct LatestInfo {
  bool found = false;      // false: nothing committed in memory and nothing on disk
  int64_t version = -1;    // the training step
  bool from_disk = false;  // snapshotd's memory was empty; this came from persist_dir
  std::string disk_dir;    // persist_dir/<run>/v<version> when from_disk
  proto::SnapshotManifest manifest;  // every local rank: shm name or file, sections, crc32c
  // Erasure coding across nodes (snapshotd with peers): the version is group-committed (every
  // node's data and all parity in place), and whether this node's data of it was lost and
  // rebuilt by erasure decoding from the other nodes of its group.
  bool parity_protected = false;
  bool rebuilt = false;
  std::string note;  // snapshotd's remark: how it was rebuilt, why disk was used, ...
  int rebuilt_from_nodes = 0;  // rebuilt: surviving nodes whose data and parity were decoded
};

class SnapshotClient {
 public:
  struct Options {
    double rpc_timeout_s = 30;     // one request/reply; DeadlineExceeded past it
    double begin_timeout_s = 120;  // BeginVersion retries while snapshotd says busy (another
                                   // local rank has not published the previous version yet)
  };

  // Unavailable when nobody listens on `socket_path` (see EnsureSnapshotd).
  static StatusOr<std::unique_ptr<SnapshotClient>> Connect(const std::string& socket_path);
  static StatusOr<std::unique_ptr<SnapshotClient>> Connect(const std::string& socket_path,
                                                           const Options& options);
  ~SnapshotClient();
  SnapshotClient(const SnapshotClient&) = delete;
  SnapshotClient& operator=(const SnapshotClient&) = delete;

  // Registers this connection as `rank` of `world` and maps its two slots. A restarted trainer
  // registering the same rank with the same `bytes` gets the same regions, contents intact
  // (reattached() says so). FailedPrecondition when `bytes` differs from the earlier
  // registration.
  Status Register(int rank, int world, size_t bytes);
  bool reattached() const { return reattached_; }
  int rank() const { return rank_; }
  size_t bytes_per_version() const { return bytes_; }

  // Starts snapshot `version` (must exceed the newest committed one) and returns where to write
  // its `bytes_per_version()` bytes: never the slot holding the newest committed version.
  StatusOr<uint8_t*> BeginVersion(int64_t version);
  // Computes each section's CRC-32C from the slot and hands the version to snapshotd; returns
  // once snapshotd recorded it. The version commits when every local rank published it.
  Status Publish(int64_t version, const std::vector<Section>& sections);
  // True when the last Publish completed its version's commit (this rank was the last).
  bool last_publish_committed() const { return last_committed_; }

  // The newest committed version (or, with snapshotd's memory empty, the newest on disk; with
  // max_disk_version > 0 the newest on disk that is not newer than it).
  StatusOr<LatestInfo> Latest(int64_t max_disk_version = 0);
  // Copies `rank`'s sections of `info` (-1: this client's rank) into `out`, verifying each
  // checksum: Corruption naming rank and section on mismatch, NotFound for a section name the
  // version does not have, InvalidArgument when a buffer's size differs from the section's.
  Status ReadLatest(const LatestInfo& info, const std::vector<SectionBuffer>& out,
                    int rank = -1) const;

  // After ReadLatest found this node's data of parity-protected `version` corrupted: asks
  // snapshotd to rebuild the node's data of it in place from the other nodes' parity
  // (snapshot_ec.h EcPeer::RepairLocal). Returns snapshotd's note of what it did; errors as
  // snapshotd gives them (FailedPrecondition without erasure coding, DataLoss, Corruption).
  StatusOr<std::string> Repair(int64_t version);

  // Ends the job for this node: snapshotd removes all shared memory and its socket and exits.
  // Rank 0 of each node calls it once training is over (not on a crash: then the data must stay).
  Status Finish();
  // Round trip to check snapshotd is alive; returns its process id.
  StatusOr<int> Ping();
  // The process id of the snapshotd this client connected to, from the socket itself
  // (SO_PEERCRED), so known even when that snapshotd never answers; -1 if unknown.
  int server_pid() const { return server_pid_; }

 private:
  SnapshotClient(int fd, Options options) : fd_(fd), options_(options) {}
  StatusOr<proto::SnapshotReply> Call(const proto::SnapshotRequest& req);
  void Unmap();

  int fd_ = -1;
  Options options_;
  int server_pid_ = -1;
  int rank_ = -1;
  size_t bytes_ = 0;
  size_t slot_bytes_ = 0;
  uint8_t* slots_[2] = {nullptr, nullptr};
  std::string slot_names_[2];  // their shared-memory names, as the manifests give them
  int64_t writing_version_ = -1;
  int writing_slot_ = -1;
  bool reattached_ = false;
  bool last_committed_ = false;
};

}  // namespace strata::checkpoint
