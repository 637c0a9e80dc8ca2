// `strata train`'s side of in-memory snapshots (issue 5): after an optimizer step, each rank copies
// its shard of the training state into its node's snapshotd (checkpoint/snapshotd.h) on a
// background thread, overlapped with the next step's forward and backward and fenced before the
// rank's next optimizer update; on `--resume auto` it reads the newest committed version back.
//
// A rank's snapshot, sections of its snapshotd slot:
//   "state"    TrainSnapshotState: step, world size, slice, layout and model fingerprint, data
//              seed — the data cursor is the step itself, since batches are a pure function of
//              (seed, step) (runtime/train_data.h), and there is no other random state after init
//   "weights"  this rank's slice of the fp32 master weights
//   "adam_m", "adam_v"  this rank's AdamW moments (its slice only)
// Together the ranks' snapshots hold the whole state, so a resumed run continues bitwise
// identically: same weights, same moments, same batches, same schedule.
#pragma once

#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "checkpoint/snapshot_client.h"
#include "checkpoint/snapshotd.h"
#include "comm/communicator.h"
#include "memory/param_store.h"

namespace strata::launcher {

struct TrainSnapshotOptions {
  std::string run;            // names snapshotd's socket, shared memory and disk folder
  int every = 1;              // snapshot every N steps
  std::string persist_dir;    // snapshotd writes every persist_every-th version here; empty: none
  int persist_every = 0;
  int persist_keep = 2;       // complete versions snapshotd keeps on disk
  int local_ranks = 1;        // ranks of this job on this node (a version commits when all did)
  std::string strata_binary;  // to start snapshotd when none runs
  double idle_timeout_s = 600;  // snapshotd exits after this long without a connected rank

  // A job on several nodes: the snapshotds erasure-code each other's versions (snapshot_ec.h).
  // Every rank of the job passes the same peers; empty (or one entry): node-local only.
  std::vector<std::string> peers;  // host:port of every node's snapshotd, node order
  int node = 0;                    // this rank's node (index into peers)
  int ec_k = 0, ec_m = 0;          // group of k + m nodes; 0,0: DefaultEcGroup(peers.size())
  // Names this node's snapshotd socket and shared memory apart from other nodes' (several
  // "nodes" on one machine share /tmp and /dev/shm); empty: the run name alone.
  std::string node_tag;
};

// Where a resume's state comes from, for this rank's node.
enum class ResumeSource { kNone, kMemory, kRebuilt, kDisk };

struct ResumeInfo {
  int64_t step = 0;        // the restored state is the one after this step; 0: nothing restored
  ResumeSource from = ResumeSource::kNone;
  std::string source;      // "snapshotd memory", "disk (…)", "erasure decoding …"
  std::string note;        // snapshotd's remark (how it rebuilt, why it used the disk)
  int rebuilt_from_nodes = 0;  // kRebuilt: surviving nodes decoded from
  bool parity_protected = false;
};

class TrainSnapshotter {
 public:
  // Starts (or finds) the node's snapshotd and registers this rank.
  static StatusOr<std::unique_ptr<TrainSnapshotter>> Start(const TrainSnapshotOptions& options,
                                                           memory::ParamStore* store, int rank,
                                                           int world, uint64_t fingerprint,
                                                           uint64_t seed);
  ~TrainSnapshotter();

  // After step `step`'s update: starts the asynchronous snapshot of version `step` when due.
  Status AfterStep(int64_t step);
  // Waits for the snapshot in flight (if any) and returns its status.
  Status Fence();
  // Finds the newest committed version this rank can resume from (snapshotd memory, a rebuild
  // from the other nodes, or disk not newer than max_disk_version when that is > 0) and checks
  // it belongs to this run: FailedPrecondition when it was taken with a different model, data
  // seed or rank count. step 0 when there is nothing to resume from. Nothing is restored yet.
  StatusOr<ResumeInfo> Probe(int64_t max_disk_version = 0);
  // Restores this rank's slice of weights and moments from the version the last Probe found.
  // With all_weights (every rank of the job on this node, so the version holds every rank's
  // data), also every other rank's slice of the weights, read from the same memory: the caller
  // then has the whole model and need not all-gather it. Otherwise the caller all-gathers.
  // A checksum mismatch in a parity-protected version (bytes corrupted at rest) is repaired by
  // the node's snapshotd from the other nodes' parity and the read redone once; repair_note()
  // then says what happened. Without parity the mismatch is a Corruption error naming rank and
  // section: bad state is never loaded.
  Status Load(bool all_weights = false);
  // Non-empty when Load repaired a corrupted snapshot (one line for the log).
  const std::string& repair_note() const { return repair_note_; }
  // The job is done (rank 0): snapshotd removes its memory and exits.
  Status Finish();
  // One rank per node: makes the node's snapshotd drop its memory (Finish) and waits until the
  // process is gone, so that Reconnect() starts an empty one. For a job whose nodes cannot all
  // resume from memory: they then agree on a disk version.
  Status DiscardNodeMemory();
  // Starts (or finds) snapshotd, connects and registers this rank. A snapshotd that accepts the
  // connection but does not answer within STRATA_SNAPSHOTD_RPC_TIMEOUT_S (hung, stopped) is
  // SIGKILLed and replaced, once; the new one recovers the committed versions from the shared
  // memory left behind.
  Status Reconnect();
  int64_t snapshots() const { return snapshots_; }
  // Times a dead or hung snapshotd was replaced during the run.
  int reconnects() const { return reconnects_; }
  double copy_seconds() const { return copy_ns_ / 1e9; }

 private:
  TrainSnapshotter() = default;
  Status Snapshot(int64_t step);
  Status SnapshotOnce(int64_t step);
  Status LoadOnce(bool all_weights);
  // The connected snapshotd did not answer (`why`): SIGKILL it (checked to be a snapshotd) and
  // wait until it is gone, so that Reconnect can start a new one.
  Status KillHung(const Status& why);
  Status ConnectAndRegister();
  checkpoint::SnapshotdOptions DaemonOptions() const;

  TrainSnapshotOptions opts_;
  memory::ParamStore* store_ = nullptr;
  int rank_ = 0, world_ = 1;
  uint64_t fingerprint_ = 0, seed_ = 0;
  std::unique_ptr<checkpoint::SnapshotClient> client_;
  std::future<Status> inflight_;
  checkpoint::LatestInfo probed_;  // what Probe found, for Load
  std::string repair_note_;
  size_t bytes_ = 0;
  int64_t snapshots_ = 0;
  int reconnects_ = 0;
  uint64_t copy_ns_ = 0;
};

// Where a whole job resumes from, agreed by every rank.
struct JobResume {
  int64_t step = 0;  // 0: nothing to resume (a fresh run)
  std::string source;  // for rank 0's report: "snapshotd memory", "node 1 rebuilt by ...", ...
  std::vector<std::string> remarks;  // further lines for the report (how it rebuilt, why disk)
};

// Collective over `comm` (after every rank's Start): every rank Probes its node's snapshotd and
// the ranks agree on one step to resume from. Nodes may answer differently: a lost node's
// snapshotd rebuilds its version by erasure decoding, and when it cannot (more than m nodes of
// its group gone) it answers from disk while the survivors answer from memory. Then, with
// `have_disk`, every node drops its memory (DiscardNodeMemory) and all resume from the newest
// disk version every node holds. DataLoss when the ranks cannot agree. Nothing is restored yet:
// the caller calls Load() on the agreed version.
StatusOr<JobResume> AgreeOnResume(TrainSnapshotter& snap, comm::Communicator& comm,
                                  bool have_disk);

// The default run name: $SLURM_JOB_NAME, else one derived from the model and data paths.
std::string DefaultRunName(const std::string& model_or_config, const std::string& data);

}  // namespace strata::launcher
