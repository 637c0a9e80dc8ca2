// snapshotd: the node-local snapshot manager (#5, after REFT). One process per node and run owns
// the shared memory that the node's training ranks snapshot into, so a trainer that crashes (or is
// killed) loses nothing: the restarted rank reattaches to the same regions and resumes from the
// newest committed version, bitwise identical.
//
// Per rank, two POSIX shared-memory slots (checkpoint/snapshot_wire.h: SlotShmName). A version is
// written into the slot that does NOT hold the newest committed version, so a writer dying
// mid-snapshot never touches it. When every local rank has published version v (with per-section
// CRC-32C), v commits: its manifest is recorded (in memory and in each slot's manifest room), and
// the previous committed version's slots become writable again. Every `persist_every` commits a
// background thread copies the committed version to persist_dir/<run>/v<version>/ (temp + fsync +
// rename); a snapshotd started with empty memory answers Latest() from the newest complete disk
// version and says so. snapshotd exits (removing its shared memory and socket) on Finish, or after
// `idle_timeout_s` with no client connected.
//
// Protocol: proto/snapshot.proto over a Unix socket, one connection per local rank, one request
// at a time per connection; a single poll() loop serves all of them. A malformed frame closes
// that connection only.
//
// BeginVersion(v) while the rank's writable slot holds a published version w < v that has not
// committed yet (another local rank is behind) answers Unavailable ("busy"): overwriting w would
// make it impossible to ever commit, so the client retries until the other ranks catch up (see
// SnapshotClient::Options::begin_timeout_s). v <= w (a restarted job redoing a step) overwrites.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "proto/snapshot.pb.h"

namespace strata::checkpoint {

class EcPeer;
struct EcRebuilt;
struct EcSegment;

struct SnapshotdOptions {
  std::string run;          // job name; names the socket, the shm objects and the disk folder
  std::string socket_path;  // empty: DefaultSocketPath(run) = /tmp/strata-snapshotd-<run>.sock
  std::string persist_dir;  // empty: no disk copies
  int persist_every = 0;    // persist every N-th committed version; 0: never
  int persist_keep = 2;     // complete versions kept on disk (older ones removed); 0: keep all
  double idle_timeout_s = 600;   // exit after this long with no client connected; <= 0: never
  // Closed as soon as this server has bound its socket or lost the race for it (EnsureSnapshotd
  // passes a pipe here): the process that started it then knows it will not come up later.
  int ready_fd = -1;
  int expected_local_ranks = 0;  // 0: a version commits once every rank registered so far
                                 // published it; N: once N ranks did

  // Erasure coding across nodes (checkpoint/snapshot_ec.h). With fewer than two peers the
  // snapshotd is node-local only (no TCP) and everything below is ignored.
  std::vector<std::string> peers;  // host:port of every node's snapshotd, in node order
  int node = 0;                    // this node's index in peers
  int ec_k = 0;                    // data nodes per group; 0 (with ec_m 0): DefaultEcGroup
  int ec_m = 0;                    // parity nodes per group (nodes it may lose)
  std::string listen;              // TCP host:port to bind; empty: peers[node]
  std::string shm_tag;             // appended to the run in shm names ("<run>.<tag>"): lets
                                   // several nodes' snapshotds share one machine (tests)
  int ec_threads = 2;              // ISA-L encode/decode threads
  int ec_io_timeout_ms = 0;        // one exchange with a peer snapshotd; 0: EcOptions' default
};

// Resolves the default socket path.
std::string SnapshotdSocketPath(const SnapshotdOptions& options);

class Snapshotd {
 public:
  // Validates options; does not touch the file system yet (Run does).
  static StatusOr<std::unique_ptr<Snapshotd>> Create(SnapshotdOptions options);
  ~Snapshotd();
  Snapshotd(const Snapshotd&) = delete;
  Snapshotd& operator=(const Snapshotd&) = delete;

  // Binds the socket and serves until Finish, the idle timeout or Stop(). On return every shared
  // memory object it created and the socket are removed. AlreadyExists when another live
  // snapshotd already serves this socket (a lost start race: not an error for the caller that
  // only wanted one running).
  Status Run();
  // From any thread (or a signal handler): makes Run() clean up and return OK.
  void Stop();

  const SnapshotdOptions& options() const { return options_; }
  // The run name used in this server's shm object names: run, or "<run>.<shm_tag>".
  const std::string& shm_run() const { return shm_run_; }

 private:
  explicit Snapshotd(SnapshotdOptions options);

  struct Slot {
    std::string shm_name;
    uint8_t* base = nullptr;  // mapped SlotBytes(bytes_per_version)
    int64_t version = -1;     // version written (or being written) here; -1: none
    bool published = false;   // `version` was published (sections valid)
    int pins = 0;             // background persistence reading it: not writable
    std::vector<proto::SnapshotSection> sections;
  };
  struct RankState {
    int rank = -1;
    int world_size = 0;
    size_t bytes_per_version = 0;
    Slot slots[2];
    int committed_slot = -1;  // slot holding the newest committed version
    int conn = -1;            // fd of the connection that registered it, -1: none
    bool adopted = false;     // found in shared memory (AdoptSurvivingRanks), not registered yet
  };
  struct PersistJob {
    proto::SnapshotManifest manifest;
    std::vector<std::pair<int, int>> pinned;  // (rank, slot), in manifest.ranks order
    std::vector<const uint8_t*> bases;        // the pinned slots' mappings, same order
  };

  Status Bind();
  void Cleanup();
  void CloseConn(int fd);
  proto::SnapshotReply Handle(int fd, const proto::SnapshotRequest& req, bool* finish);
  StatusOr<proto::RegisterReply> DoRegister(int fd, const proto::RegisterRequest& r);
  StatusOr<proto::BeginVersionReply> DoBegin(RankState& st, const proto::BeginVersionRequest& r);
  StatusOr<proto::PublishReply> DoPublish(RankState& st, const proto::PublishRequest& r);
  StatusOr<proto::RepairReply> DoRepair(int64_t version);
  StatusOr<proto::LatestReply> DoLatest(int64_t max_disk_version);
  // Writes slot `slot`'s manifest room as holding `version`, not committed, with the slot's
  // sections (none: begun, not published).
  Status WriteUncommittedManifest(RankState& st, int slot, int64_t version);
  // Creates (or reattaches) `rank`'s two slots and adds it to ranks_ with no connection.
  StatusOr<RankState*> OpenRank(int rank, int world, size_t bytes, bool* reattached);
  // Erasure coding: hands the just committed version to the EcPeer (pinning its slots), takes
  // group commits and released versions back, and installs a version rebuilt from peers.
  void SubmitToEc();
  void ProcessEc();
  // A peer snapshotd unreachable (or silent) must not stop the trainers: versions that cannot
  // commit across the group (EcPeer::StalledLocal) give their slots back, and when the newest
  // one is such a version it is withdrawn in favour of the group-committed one.
  void WithdrawStalled();
  // The slots a rebuilt version of this node goes to (each rank's uncommitted one; ranks not
  // registered yet are opened), as segments in node-buffer order, and (when `slots` is given)
  // the Slot of each, same order.
  StatusOr<std::vector<EcSegment>> RebuildSlots(const proto::EcNodeManifest& m,
                                                std::vector<Slot*>* slots = nullptr);
  Status InstallRebuilt(EcRebuilt& rebuilt);
  // Commits `version` when every local rank published it. `recovering`: adopting a version
  // found in surviving slots (not counted for persistence).
  void MaybeCommit(int64_t version, bool* committed, bool recovering = false);
  // Adopts a committed version recorded in reattached slots' manifest rooms (a snapshotd that
  // restarted while the shared memory survived).
  void RecoverFromSlots();
  // A snapshotd that replaced one mid-run (it hung or died while the trainers went on) sees
  // one rank register first, while the others are in the middle of a step. Waiting for all of
  // them before recovering can deadlock: the first rank's next snapshot cannot commit, and the
  // others wait for it in a collective. So at the first registration it opens the slots of all
  // the node's ranks from the shared memory they left, when it finds exactly the expected
  // number of them, and recovers from those.
  void AdoptSurvivingRanks(int registering, int world);
  // Forgets adopted ranks that never registered once another rank registers in their place.
  void DropAdoptedStrangers();
  // The newest complete version on disk (<= max_version when that is > 0).
  StatusOr<proto::LatestReply> LatestFromDisk(int64_t max_version) const;
  void PersistLoop();
  Status PersistOne(const PersistJob& job);
  void ReapPersisted();

  SnapshotdOptions options_;
  std::string socket_path_;
  std::string shm_run_;
  int listen_fd_ = -1;
  int lock_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};
  std::atomic<bool> stop_{false};

  std::map<int, RankState> ranks_;
  std::map<int, int> conn_rank_;  // fd -> rank (registered connections)
  int world_size_ = 0;
  int64_t committed_version_ = -1;
  proto::SnapshotManifest committed_;
  int64_t commits_ = 0;
  bool recovered_ = false;  // committed_ came from slot manifest rooms, not from a commit here

  // Erasure coding across nodes (null when node-local only).
  std::unique_ptr<EcPeer> ec_;
  struct EcLocal {
    proto::SnapshotManifest manifest;
    std::vector<std::pair<int, int>> pinned;  // (rank, slot)
  };
  std::map<int64_t, EcLocal> ec_local_;  // versions handed to ec_ and not released yet
  int64_t group_version_ = -1;
  proto::SnapshotManifest group_manifest_;
  int64_t rebuilt_version_ = -1;
  std::string rebuilt_note_;
  int rebuilt_from_nodes_ = 0;

  // Background persistence: the loop thread queues jobs, the persister writes them and hands
  // the pins back through done_ (the loop releases them, so slot state has one owner).
  std::thread persister_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<PersistJob> queue_;
  std::vector<PersistJob> done_;
  bool persist_stop_ = false;
};

// Makes sure a snapshotd serves `options`' socket: if nothing answers there, starts
// `<strata_binary> snapshotd --run ... ` detached (fork + setsid + exec, output appended to
// /tmp/strata-snapshotd-<run>.log) and waits up to 5 s for it to answer. Two ranks racing here
// is fine: the second server sees the first holding the socket's lock and exits, and both
// callers connect to the winner.
Status EnsureSnapshotd(const SnapshotdOptions& options, const std::string& strata_binary);

}  // namespace strata::checkpoint
