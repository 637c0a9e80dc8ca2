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

#include "base/status.h"
#include "checkpoint/snapshot_client.h"
#include "memory/param_store.h"

namespace strata::launcher {

struct TrainSnapshotOptions {
  std::string run;            // names snapshotd's socket, shared memory and disk folder
  int every = 1;              // snapshot every N steps
  std::string persist_dir;    // snapshotd writes every persist_every-th version here; empty: none
  int persist_every = 0;
  int local_ranks = 1;        // ranks of this job on this node (a version commits when all did)
  std::string strata_binary;  // to start snapshotd when none runs
};

struct ResumeInfo {
  int64_t step = 0;        // the restored state is the one after this step; 0: nothing restored
  std::string source;      // "snapshotd memory", "disk (…)"
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
  // Restores this rank's slice of weights and moments from the newest committed version (the
  // caller then all-gathers the weights). step 0 when there is nothing to resume from.
  // FailedPrecondition when the snapshot belongs to a different model, data seed or rank count.
  StatusOr<ResumeInfo> Resume();
  // The job is done (rank 0): snapshotd removes its memory and exits.
  Status Finish();
  int64_t snapshots() const { return snapshots_; }
  // Times a dead snapshotd was replaced during the run.
  int reconnects() const { return reconnects_; }
  double copy_seconds() const { return copy_ns_ / 1e9; }

 private:
  TrainSnapshotter() = default;
  Status Snapshot(int64_t step);
  // Starts (or finds) snapshotd, connects and registers this rank.
  Status Reconnect();

  TrainSnapshotOptions opts_;
  memory::ParamStore* store_ = nullptr;
  int rank_ = 0, world_ = 1;
  uint64_t fingerprint_ = 0, seed_ = 0;
  std::unique_ptr<checkpoint::SnapshotClient> client_;
  std::future<Status> inflight_;
  size_t bytes_ = 0;
  int64_t snapshots_ = 0;
  int reconnects_ = 0;
  uint64_t copy_ns_ = 0;
};

// The default run name: $SLURM_JOB_NAME, else one derived from the model and data paths.
std::string DefaultRunName(const std::string& model_or_config, const std::string& data);

}  // namespace strata::launcher
