// Erasure coding of snapshots ACROSS nodes (#5, item 3; node loss in item 5): the part of
// snapshotd (checkpoint/snapshotd.h) that talks to the snapshotds of the other nodes over TCP.
//
// Groups. The job's nodes (SnapshotdOptions::peers, in node order) form groups of n = k + m
// consecutive nodes: group g is nodes [g * n, (g + 1) * n). A node's index inside its group is
// its "group index". Erasure coding never crosses groups.
//
// Node buffer. When a version commits locally (every local rank published it) the node's bytes of
// that version are the concatenation, ranks ascending, of each rank's committed slot data
// (bytes_per_version bytes each, section gaps included). Its size may differ between nodes; the
// group codes over B = the largest node buffer of the group, shorter ones zero-padded
// (StripeLayout of checkpoint/erasure.h with bytes = B; the padding never exists in memory).
//
// Placement: the rotating StripeLayout. Every node keeps its data where it is (the ranks' shared
// memory slots) and stores m parity fragments of P = ceil(B / k) bytes, m/k of its data, in one
// shared-memory object per version (EcParityShmName).
//
// Commit protocol for version v (every message is a protobuf frame, proto/snapshot.proto):
//   1. Local commit: snapshotd pins the slots and calls SubmitLocal. A sender thread computes the
//      node buffer's CRC-32C and sends EcAnnounce (its EcNodeManifest: rank layout, sections and
//      their CRCs, size, CRC, a random nonce) to every other node of the group.
//   2. Once every node of the group announced v, everyone knows B and P. Each node sends each of
//      its k pieces to the m parity nodes of that piece's stripe (EcPiece + raw bytes: m * B
//      bytes out, m * B in per node).
//   3. A parity node that has all k pieces of a stripe (with the nonces the senders announced)
//      encodes its parity row with ISA-L into its parity shm. When all m of its stripes are done
//      AND its own data of v is committed locally, it computes the parity CRC-32C and sends
//      EcParityDone (the nonces it saw, the CRC) to every node of the group (itself included).
//   4. A node that holds EcParityDone(v) from all n nodes, agreeing on every node's nonce,
//      GROUP-COMMITS v: every node's data is in place and all parity is in place. Only then are
//      the older versions (their slot pins and parity) released. So the previous group-committed
//      version stays complete until v is: a node dying mid-way never leaves nothing.
//   Nodes decide 4. independently; they may disagree for the moment a message is in flight, so
//   a rebuild takes the newest version that the survivors report group-committed and still hold.
//
// Rebuild (Rebuild): an empty snapshotd of a replacement node (same node index) asks the other
// nodes of its group for their state (EcStateRequest), picks that version, fetches every
// survivor's node buffer and parity (EcFetch), checks each against the CRC-32C its manifest /
// EcParityDone recorded (a mismatch makes that node count as lost for this rebuild), runs
// RebuildGroup, checks the rebuilt node buffer against its manifest's CRC and sends rebuilt
// parity back to any survivor whose stored parity was corrupted (EcPutParity: repaired). More
// than m nodes missing: DataLoss (the trainer falls back to the disk copy).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "checkpoint/erasure.h"
#include "proto/snapshot.pb.h"

namespace strata::checkpoint {

struct EcOptions {
  std::vector<std::string> peers;  // host:port of every node's snapshotd, node order
  int node = 0;                    // this node's index in peers
  int k = 0, m = 0;                // group of k + m nodes; peers.size() % (k + m) == 0
  std::string listen;              // host:port to bind; empty: peers[node]
  std::string shm_run;             // names the parity shm objects (run, plus the node tag)
  int threads = 2;                 // ISA-L encode / decode threads
  int io_timeout_ms = 30000;       // one peer exchange (a piece of up to GiBs included)
  int connect_timeout_ms = 1000;   // a peer that does not accept within this is down
};

// Nonces are (incarnation << 32 | attempt): true when `a` is an earlier attempt of the same
// process than `b`. Nonces of different incarnations (a restarted node) are never "older".
bool NonceOlder(uint64_t a, uint64_t b);

// Default (k, m) for `nodes` nodes: 1 node: no coding (0, 0); 2: 1+1; 3: 2+1; 4..8: one group
// of nodes-2 + 2 (any two lost nodes survive); more: the largest group size in [4, 8] that
// divides the node count, with m = 2, else one group of nodes-2 + 2. n = 4 picks 2+2 rather
// than 3+1: parity costs 100% instead of 33% of the snapshot, but two nodes of four may fail.
std::pair<int, int> DefaultEcGroup(int nodes);

// "/strata-ec-<sanitized shm_run>-n<node>-v<version>": a node's parity buffer of a version.
std::string EcParityShmName(const std::string& shm_run, int node, int64_t version);

struct EcSegment {
  const uint8_t* data = nullptr;
  size_t bytes = 0;
};

// A POSIX shared-memory object this process created (filled to its size with posix_fallocate,
// so a full /dev/shm fails here rather than with SIGBUS later) and mapped read-write. Destroyed,
// it is unmapped and unlinked, unless Release()d to a new owner, who then does both.
class EcShm {
 public:
  static StatusOr<EcShm> Create(const std::string& name, size_t bytes);
  EcShm() = default;
  EcShm(EcShm&& o) noexcept { *this = std::move(o); }
  EcShm& operator=(EcShm&& o) noexcept;
  EcShm(const EcShm&) = delete;
  EcShm& operator=(const EcShm&) = delete;
  ~EcShm() { Reset(); }
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  void Release() {
    data_ = nullptr;
    size_ = 0;
    name_.clear();
  }

 private:
  void Reset();
  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// What Rebuild recovered for this node.
struct EcRebuilt {
  int64_t version = -1;
  proto::EcNodeManifest manifest;   // this node's (rank layout, sections, CRCs)
  AlignedBuffer data;               // the node buffer: manifest.node_bytes() bytes, then padding
  std::vector<int> repaired;        // group indices whose corrupted parity was rewritten
  std::vector<int> missing;         // nodes that were lost (this node included)
  double seconds = 0;
  // For AdoptRebuilt: this node's rebuilt parity, every node's manifest and parity CRC-32C.
  AlignedBuffer parity;
  std::vector<proto::EcNodeManifest> manifests;
  std::vector<uint32_t> parity_crc;
  // True when the node buffer was decoded straight into the target's segments (Rebuild with a
  // target); `data` is then empty, and the parity is in `parity_shm` (the version's parity
  // object, which AdoptRebuilt takes over), not in `parity`.
  bool in_place = false;
  EcShm parity_shm;
  // This node's parity was not rebuilt yet: AdoptRebuilt rebuilds it in the background from the
  // survivors marked in `present` (by group index), after the ranks resumed.
  bool parity_pending = false;
  std::vector<bool> present;
};

// What RepairLocal did.
struct EcRepaired {
  bool repaired = false;  // false: the data was intact, nothing written
  int sources = 0;        // nodes that sent fragments
  double seconds = 0;
  std::string note;
};

// Where Rebuild may decode this node's buffer: writable memory of manifest.node_bytes() bytes in
// all, as segments in node-buffer order (snapshotd's rank slots), or an error.
using EcRebuildTarget =
    std::function<StatusOr<std::vector<EcSegment>>(const proto::EcNodeManifest& manifest)>;

class EcPeer {
 public:
  // `wake` is called (from any thread) when the group-committed version or the released
  // versions changed; snapshotd then calls group_version() / TakeReleased() on its loop.
  static StatusOr<std::unique_ptr<EcPeer>> Create(EcOptions options, std::function<void()> wake);
  ~EcPeer();  // Shutdown()
  EcPeer(const EcPeer&) = delete;
  EcPeer& operator=(const EcPeer&) = delete;

  // Binds the listen address and starts serving peers.
  Status Start();
  // Stops every thread, closes every connection, unlinks the parity shm objects.
  void Shutdown();

  // A version committed locally: `segments` (the node buffer, in order) stay valid and unchanged
  // until the version is returned by TakeReleased. manifest: ranks / world_size filled in; node,
  // version, nonce, size and CRC are set here.
  void SubmitLocal(int64_t version, proto::EcNodeManifest manifest,
                   std::vector<EcSegment> segments);
  // Forgets local versions > `keep` that are not group-committed (a restarted trainer redoing
  // them); they come back through TakeReleased.
  void Withdraw(int64_t keep);
  // Forgets one local version that is not group-committed (a stalled one, see StalledLocal).
  void WithdrawVersion(int64_t version);
  // Local versions, not group-committed, that cannot commit across the group: this node's
  // announce or pieces could not be delivered (after io_timeout_ms of retries, or at the first
  // failure once the group is degraded), or, once degraded, not announced to every node within
  // io_timeout_ms / 4, or they were handed over 2 * io_timeout_ms ago and the group never
  // completed them.
  // Ascending.
  std::vector<int64_t> StalledLocal() const;
  // Some local version stalled since the last group commit.
  bool degraded() const;

  // Newest group-committed version, -1 when none.
  int64_t group_version() const;
  // Local versions whose segments are no longer read (snapshotd may unpin their slots).
  std::vector<int64_t> TakeReleased();

  // Recovers this node's node buffer from the survivors (see the file comment). NotFound when no
  // other node of the group holds a group-committed version (a fresh job); DataLoss when more
  // than m nodes are missing; Corruption when the rebuilt bytes do not match the manifest.
  //
  // With a target, only this node's data is rebuilt before Rebuild returns (when every survivor
  // has group-committed the version): the survivors send just the k fragments of each of this
  // node's data stripes, and AdoptRebuilt rebuilds this node's parity in the background while
  // the ranks resume (until then another rebuild counts this node as lost; a newer version
  // group-committing makes that parity moot and stops it). For 1+1 this moves half the bytes
  // before the resume, for 2+1 two thirds.
  //
  // With a target, the survivors send their fragments striped, a chunk at a time, and the chunk
  // is decoded straight into the target's memory as the next one arrives: no buffer of the
  // survivors' data exists, and this node's data is not copied again afterwards (on a restarted
  // node, first-touch page faults of such buffers cost more than the network). The survivors'
  // bytes are then checked end to end, by the rebuilt data's and parity's checksums; if they do
  // not match (or a survivor fails mid-way), Rebuild falls back to fetching whole buffers, which
  // checks every survivor's fragment on its own and so finds and repairs a corrupted one.
  StatusOr<EcRebuilt> Rebuild(const EcRebuildTarget& target = nullptr);
  // This node's own data of group-committed `version` (in the rank slots) fails its CRC-32C
  // (bytes corrupted at rest, found by a rank's restore): rebuilds it in place by erasure
  // decoding from the other nodes of the group, the same streamed path as a lost node's data,
  // and checks it. Intact data is left alone. FailedPrecondition when this node does not hold
  // the version group-committed; DataLoss when too few other nodes hold it; Corruption when the
  // result still fails the checksum.
  StatusOr<EcRepaired> RepairLocal(int64_t version);
  // After Rebuild: the rebuilt data now lives in `segments` (the rank slots snapshotd wrote);
  // this node holds the version as group-committed again, parity included.
  void AdoptRebuilt(EcRebuilt& rebuilt, std::vector<EcSegment> segments);

  int group_size() const { return n_; }
  int group_index() const { return li_; }
  const EcOptions& options() const { return options_; }

 private:
  struct Version;
  EcPeer(EcOptions options, std::function<void()> wake);

  int GroupNode(int li) const { return group_base_ + li; }
  void AcceptLoop();
  void ServeConnection(int fd);
  Status HandlePiece(int fd, const proto::EcPiece& piece);
  // The striped answer to an EcFetch with chunk_bytes (see snapshot.proto): `fragments` of this
  // node's (ids as in EcFetch.fragments), chunk by chunk; v held as a reader.
  Status SendStriped(int fd, const Version& v, size_t chunk,
                     const std::vector<int>& fragments) const;
  // Decoded chunk of this node's fragment f (an EcFetch.fragments id) at offset o: len bytes.
  using FragmentSink = std::function<Status(int f, size_t o, const uint8_t* src, size_t len)>;
  // Rebuilds this node's fragments `mine` of version `ver` (pieces of P bytes): for each, k
  // fragments of its stripe are streamed from the nodes marked in `present`, kStreamChunk at a
  // time, and decoded chunk by chunk into `put`. `cancelled` (may be null) is asked between
  // chunks; true stops with Aborted. *sources: how many nodes sent.
  Status StreamFragments(int64_t ver, size_t P, const std::vector<bool>& present,
                         const std::vector<int>& mine, const FragmentSink& put,
                         const std::function<bool()>& cancelled, int* sources);
  StatusOr<EcRebuilt> RebuildStreaming(int64_t ver, const proto::EcHeld& ref,
                                       const StripeLayout& layout, const std::vector<bool>& present,
                                       const std::vector<uint32_t>& parity_crc,
                                       const std::vector<EcSegment>& dest, int64_t t0,
                                       bool defer_parity);
  // mu_ held: rebuilds v's parity on a spawned thread (v held as a reader), then completes v
  // (parity_complete, this node's parity-done, sent to the group). Gives up when a newer version
  // group-commits first.
  void RebuildParityLater(const std::shared_ptr<Version>& v, std::vector<bool> present);
  void MarkGroupCommitted(const std::shared_ptr<Version>& v);  // mu_ held
  void MarkStalled(Version& v, const std::string& why);         // mu_ held
  // EcStateRequest to every other node of the group: its reply, or nullopt when unreachable.
  std::vector<std::optional<proto::EcStateReply>> QueryStates(int* reachable);
  // By group index: the nodes whose `states` say they hold `version`'s data and all its parity.
  std::vector<bool> HoldersOf(int64_t version,
                              const std::vector<std::optional<proto::EcStateReply>>& states) const;
  void SendLoop(std::shared_ptr<Version> v, proto::EcNodeManifest manifest);
  static constexpr size_t kStreamChunk = 1 << 20;  // bytes per fragment per streamed chunk
  // Runs fn on a detached thread that Shutdown waits for. mu_ held.
  void Spawn(std::function<void()> fn);
  void InstallAnnounce(Version& v, int from, const proto::EcNodeManifest& m);  // mu_ held
  void Retire(Version& v);  // mu_ held: frees a dropped version once nobody reads it
  // Takes mu_ held; encodes finished stripes and sends EcParityDone when this node is done.
  void Progress(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Version>& v);
  void MaybeGroupCommit(const std::shared_ptr<Version>& v);  // mu_ held
  // mu_ held: sends `done` to every other node of the group on a spawned thread (holding v as a
  // reader meanwhile); `what` qualifies the version in warnings ("" or "rebuilt ").
  // mu_ held, every manifest of v known: the parity-done of group index `from` for v.
  proto::EcParityDone ParityDone(const Version& v, int from, uint32_t parity_crc) const;
  void SendParityDone(const std::shared_ptr<Version>& v, const proto::EcParityDone& done,
                      const char* what);
  void DropVersion(int64_t version);                         // mu_ held
  void DetachLocal(int64_t version);                         // mu_ held
  void Recycle(Version& v);  // mu_ held: piece buffers back to spare_
  std::shared_ptr<Version> GetOrMake(int64_t version);       // mu_ held
  // One request (plus `bulk_bytes` raw bytes from offset `bulk_offset` of the concatenated
  // segments) on a fresh connection, and its reply.
  Status SendToPeer(int li, const proto::EcPeerRequest& req, const EcSegment* bulk,
                    size_t nbulk, size_t bulk_offset, proto::EcPeerReply* reply,
                    size_t bulk_bytes = 0);
  StatusOr<int> ConnectPeer(int li) const;
  Status EnsureParityShm(Version& v);  // mu_ held

  EcOptions options_;
  std::function<void()> wake_;
  int n_ = 0, li_ = 0, group_base_ = 0;
  std::optional<ReedSolomon> rs_;
  std::unique_ptr<ThreadPool> pool_;
  std::mutex pool_mu_;  // one ISA-L pass at a time on the pool

  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  std::thread acceptor_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, std::shared_ptr<Version>> versions_;
  int64_t group_version_ = -1;
  uint32_t incarnation_ = 0;  // random, nonzero: the high half of this process's nonces
  uint32_t attempts_ = 0;     // local submissions so far: the low half
  bool degraded_ = false;  // a local version stalled since the last group commit
  std::vector<int64_t> released_;
  std::vector<std::vector<uint8_t>> spare_;  // piece buffers of finished versions
  int active_ = 0;  // detached threads (connection handlers, senders) still running
  std::vector<int> conn_fds_;
};

}  // namespace strata::checkpoint
