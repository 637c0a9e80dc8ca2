#include "launcher/train_snapshot.h"

#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/logging.h"
#include "checkpoint/snapshotd.h"

namespace strata::launcher {
namespace {

constexpr uint64_t kStateMagic = 0x31504e5341525453ULL;  // "STRASNP1"

// Fixed-size, trivially copyable: what a rank needs besides its tensors to continue bitwise.
struct TrainSnapshotState {
  uint64_t magic;
  int64_t step;
  int64_t world;
  uint64_t slice_begin;
  uint64_t slice_size;
  uint64_t layout_total;
  uint64_t fingerprint;
  uint64_t seed;
};

size_t Align(size_t x) { return (x + 4095) / 4096 * 4096; }

}  // namespace

std::string DefaultRunName(const std::string& model_or_config, const std::string& data) {
  if (const char* job = std::getenv("SLURM_JOB_NAME"); job != nullptr && *job != '\0') {
    return job;
  }
  const uint64_t h = std::hash<std::string>{}(model_or_config + "\n" + data);
  return fmt::format("train-{:016x}", h);
}

StatusOr<std::unique_ptr<TrainSnapshotter>> TrainSnapshotter::Start(
    const TrainSnapshotOptions& options, memory::ParamStore* store, int rank, int world,
    uint64_t fingerprint, uint64_t seed) {
  std::unique_ptr<TrainSnapshotter> s(new TrainSnapshotter());
  s->opts_ = options;
  s->store_ = store;
  s->rank_ = rank;
  s->world_ = world;
  s->fingerprint_ = fingerprint;
  s->seed_ = seed;
  const size_t slice = store->slice_size() * sizeof(float);
  s->bytes_ = Align(sizeof(TrainSnapshotState)) + 3 * Align(slice);
  STRATA_RETURN_IF_ERROR(s->Reconnect());
  return s;
}

TrainSnapshotter::~TrainSnapshotter() {
  if (inflight_.valid()) inflight_.wait();
}

Status TrainSnapshotter::Reconnect() {
  checkpoint::SnapshotdOptions so;
  so.run = opts_.run;
  so.persist_dir = opts_.persist_dir;
  so.persist_every = opts_.persist_every;
  so.expected_local_ranks = opts_.local_ranks;
  STRATA_RETURN_IF_ERROR(checkpoint::EnsureSnapshotd(so, opts_.strata_binary));
  STRATA_ASSIGN_OR_RETURN(client_,
                          checkpoint::SnapshotClient::Connect(checkpoint::SnapshotdSocketPath(so)));
  return client_->Register(rank_, world_, bytes_);
}

Status TrainSnapshotter::Snapshot(int64_t step) {
  const uint64_t t0 = NowNs();
  StatusOr<uint8_t*> begun = client_->BeginVersion(step);
  if (!begun.ok() && begun.status().code() == StatusCode::kUnavailable &&
      begun.status().ToString().find("busy") == std::string::npos) {
    // snapshotd died (killed, OOM): start a new one, which recovers the committed versions from
    // the shared memory the old one left, and carry on; training never stops for it.
    STRATA_LOG(WARN, CKPT, "rank {}: snapshotd of run '{}' is gone ({}); restarting it", rank_,
               opts_.run, begun.status().ToString());
    STRATA_RETURN_IF_ERROR(Reconnect());
    ++reconnects_;
    begun = client_->BeginVersion(step);
  }
  STRATA_RETURN_IF_ERROR(begun.status());
  uint8_t* dst = *begun;
  const size_t slice = store_->slice_size() * sizeof(float);
  const size_t off_w = Align(sizeof(TrainSnapshotState));
  const size_t off_m = off_w + Align(slice), off_v = off_m + Align(slice);
  TrainSnapshotState st{kStateMagic,
                        step,
                        world_,
                        store_->slice_begin(),
                        store_->slice_size(),
                        store_->layout().total(),
                        fingerprint_,
                        seed_};
  std::memcpy(dst, &st, sizeof(st));
  std::memcpy(dst + off_w, store_->weights() + store_->slice_begin(), slice);
  std::memcpy(dst + off_m, store_->moment1(), slice);
  std::memcpy(dst + off_v, store_->moment2(), slice);
  STRATA_RETURN_IF_ERROR(client_->Publish(step, {{"state", 0, sizeof(st)},
                                                 {"weights", off_w, slice},
                                                 {"adam_m", off_m, slice},
                                                 {"adam_v", off_v, slice}}));
  copy_ns_ += NowNs() - t0;
  ++snapshots_;
  return Status::OK();
}

Status TrainSnapshotter::AfterStep(int64_t step) {
  if (opts_.every <= 0 || step % opts_.every != 0) return Status::OK();
  STRATA_RETURN_IF_ERROR(Fence());
  // Reads this rank's slice of weights and its moments, which nothing writes until the next
  // update, and that update waits in Fence() (DpTrainer::set_before_update).
  inflight_ = std::async(std::launch::async, [this, step] { return Snapshot(step); });
  return Status::OK();
}

Status TrainSnapshotter::Fence() {
  if (!inflight_.valid()) return Status::OK();
  return inflight_.get();
}

StatusOr<ResumeInfo> TrainSnapshotter::Resume() {
  ResumeInfo info;
  STRATA_ASSIGN_OR_RETURN(checkpoint::LatestInfo latest, client_->Latest());
  if (!latest.found) return info;
  TrainSnapshotState st{};
  STRATA_RETURN_IF_ERROR(client_->ReadLatest(latest, {{"state", &st, sizeof(st)}}));
  if (st.magic != kStateMagic || st.world != world_ || st.fingerprint != fingerprint_ ||
      st.slice_size != store_->slice_size() || st.slice_begin != store_->slice_begin() ||
      st.layout_total != store_->layout().total() || st.seed != seed_) {
    return Status::FailedPrecondition(fmt::format(
        "run '{}': the snapshot of step {} was taken with {} ranks and another model, data seed "
        "or rank count (this launch: {} ranks); use another --run name or the same settings",
        opts_.run, st.step, st.world, world_));
  }
  const size_t slice = store_->slice_size() * sizeof(float);
  STRATA_RETURN_IF_ERROR(client_->ReadLatest(
      latest, {{"weights", store_->weights() + store_->slice_begin(), slice},
               {"adam_m", store_->moment1(), slice},
               {"adam_v", store_->moment2(), slice}}));
  info.step = latest.version;
  info.source = latest.from_disk ? "disk (" + latest.disk_dir + ")" : "snapshotd memory";
  return info;
}

Status TrainSnapshotter::Finish() {
  STRATA_RETURN_IF_ERROR(Fence());
  return client_->Finish();
}

}  // namespace strata::launcher
