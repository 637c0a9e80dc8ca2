#include "launcher/train_snapshot.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "base/clock.h"
#include "base/env.h"
#include "base/logging.h"
#include "checkpoint/snapshot_wire.h"
#include "checkpoint/snapshotd.h"

namespace strata::launcher {
namespace {

// Waits up to 10 s for process `pid` to be gone. It is not our child (EnsureSnapshotd
// double-forks), so there is nothing to reap: gone is no /proc entry, or a zombie (an init that
// does not reap promptly). Waiting matters: a new snapshotd cannot take the socket lock or the
// peer port before this one released them.
Status WaitGone(int pid, const std::string& what, const char* after) {
  const int64_t deadline = NowNs() + 10'000'000'000;
  for (;;) {
    std::ifstream stat(fmt::format("/proc/{}/stat", pid));
    std::string line;
    if (!std::getline(stat, line)) return Status::OK();
    const size_t paren = line.rfind(')');
    if (paren != std::string::npos && paren + 2 < line.size() &&
        (line[paren + 2] == 'Z' || line[paren + 2] == 'X')) {
      return Status::OK();
    }
    if (NowNs() > deadline) {
      return Status::DeadlineExceeded(fmt::format("{} did not exit within 10 s of {}", what, after));
    }
    ::usleep(10000);
  }
}

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

// What one rank found to resume from; fixed size for Allgather.
struct ResumeReport {
  int64_t step;
  int32_t from;  // ResumeSource
  int32_t rebuilt_from_nodes;
  char note[496];
};

std::string NodeList(const std::vector<int>& nodes) {
  return fmt::format("node{} {}", nodes.size() == 1 ? "" : "s", fmt::join(nodes, ","));
}

// The nodes (each represented by its lowest rank) whose report satisfies `pred`.
template <class Pred>
std::vector<int> NodesWhere(const std::vector<ResumeReport>& reports, const comm::Topology& topo,
                            Pred pred) {
  std::vector<int> nodes;
  for (size_t r = 0; r < reports.size(); ++r) {
    const int node = topo.node_of_rank[r];
    if (pred(reports[r]) && std::find(nodes.begin(), nodes.end(), node) == nodes.end()) {
      nodes.push_back(node);
    }
  }
  return nodes;
}

ResumeSource From(const ResumeReport& r) { return static_cast<ResumeSource>(r.from); }

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

checkpoint::SnapshotdOptions TrainSnapshotter::DaemonOptions() const {
  checkpoint::SnapshotdOptions so;
  so.run = opts_.run;
  so.persist_dir = opts_.persist_dir;
  so.persist_every = opts_.persist_every;
  so.persist_keep = opts_.persist_keep;
  so.expected_local_ranks = opts_.local_ranks;
  so.idle_timeout_s = opts_.idle_timeout_s;
  if (!opts_.node_tag.empty()) {
    so.shm_tag = opts_.node_tag;
    so.socket_path = checkpoint::NodeSocketPath(opts_.run, opts_.node_tag);
  }
  if (opts_.peers.size() > 1) {
    so.peers = opts_.peers;
    so.node = opts_.node;
    so.ec_k = opts_.ec_k;
    so.ec_m = opts_.ec_m;
    so.ec_io_timeout_ms =
        static_cast<int>(EnvIntInRange("STRATA_SNAPSHOTD_PEER_TIMEOUT_S", 1, 3600) * 1000);
  }
  return so;
}

Status TrainSnapshotter::ConnectAndRegister() {
  const checkpoint::SnapshotdOptions so = DaemonOptions();
  const std::string socket = checkpoint::SnapshotdSocketPath(so);
  client_.reset();  // unmaps the old slots first (a replaced snapshotd hands out new ones)
  checkpoint::SnapshotClient::Options co;
  co.rpc_timeout_s = static_cast<double>(EnvIntInRange("STRATA_SNAPSHOTD_RPC_TIMEOUT_S", 1, 3600));
  // A hung snapshotd still accepts connections and holds the socket's lock, so no new one could
  // start: find it out first (it never answers a ping) and replace it.
  if (StatusOr<std::unique_ptr<checkpoint::SnapshotClient>> probe =
          checkpoint::SnapshotClient::Connect(socket, co);
      probe.ok()) {
    StatusOr<int> pong = (*probe)->Ping();
    if (!pong.ok() && pong.status().code() == StatusCode::kDeadlineExceeded) {
      client_ = std::move(*probe);
      STRATA_RETURN_IF_ERROR(KillHung(pong.status()));
      ++reconnects_;
    }
  }
  STRATA_RETURN_IF_ERROR(checkpoint::EnsureSnapshotd(so, opts_.strata_binary));
  STRATA_ASSIGN_OR_RETURN(client_, checkpoint::SnapshotClient::Connect(socket, co));
  return client_->Register(rank_, world_, bytes_);
}

Status TrainSnapshotter::Reconnect() {
  Status st;
  for (int attempt = 0; attempt < 3; ++attempt) {
    st = ConnectAndRegister();
    if (st.code() == StatusCode::kDeadlineExceeded && client_ != nullptr) {
      // Accepted but never answered: hung. Another local rank may be replacing it already.
      STRATA_RETURN_IF_ERROR(KillHung(st));
      ++reconnects_;
    } else if (st.code() == StatusCode::kUnavailable && attempt > 0) {
      // The snapshotd we talked to died under us (another rank killed the hung one): again.
    } else {
      return st;
    }
  }
  return st;
}

Status TrainSnapshotter::KillHung(const Status& why) {
  const int pid = client_ ? client_->server_pid() : -1;
  if (pid <= 0) return why;
  // Only a snapshotd: the pid came from the socket, but check before sending SIGKILL.
  std::ifstream cmd(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
  const std::string argv((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
  client_.reset();
  // Gone already (another local rank replaced it): nothing to kill.
  if (argv.empty()) return Status::OK();
  if (argv.find("snapshotd") == std::string::npos) return why;
  STRATA_LOG(WARN, CKPT,
             "rank {}: snapshotd of run '{}' (pid {}) does not answer ({}); killing it and "
             "starting a new one, which recovers the committed versions from shared memory",
             rank_, opts_.run, pid, why.ToString());
  std::fprintf(stderr,
               "strata train: rank %d: snapshotd (pid %d) does not answer; killed it and started "
               "a new one\n",
               rank_, pid);
  if (::kill(pid, SIGKILL) != 0 && errno != ESRCH) {
    return ErrnoStatus(fmt::format("kill {}", pid), errno);
  }
  return WaitGone(pid, fmt::format("hung snapshotd (pid {})", pid), "SIGKILL");
}

Status TrainSnapshotter::DiscardNodeMemory() {
  STRATA_RETURN_IF_ERROR(Fence());
  STRATA_ASSIGN_OR_RETURN(int pid, client_->Ping());
  STRATA_RETURN_IF_ERROR(client_->Finish());
  client_.reset();
  return WaitGone(pid, fmt::format("snapshotd of run '{}' (pid {})", opts_.run, pid), "Finish");
}

Status TrainSnapshotter::Snapshot(int64_t step) {
  const uint64_t t0 = NowNs();
  Status st;
  // Training never stops for its snapshotd: one that died (killed, OOM) or hung (accepts, never
  // answers) in the middle of this snapshot is replaced, and the snapshot taken again from the
  // start; the new one recovers the committed versions from the shared memory left behind.
  for (int attempt = 0; attempt < 3; ++attempt) {
    st = SnapshotOnce(step);
    if (attempt > 0 && st.code() == StatusCode::kFailedPrecondition &&
        st.message().find("is already committed") != std::string::npos) {
      // The old snapshotd committed this version before it stopped answering; the new one
      // recovered it. Nothing to redo.
      st = Status::OK();
    }
    const bool hung = st.code() == StatusCode::kDeadlineExceeded;
    const bool gone = st.code() == StatusCode::kUnavailable &&
                      st.ToString().find("busy") == std::string::npos;
    if (!hung && !gone) break;
    if (hung) {
      STRATA_RETURN_IF_ERROR(KillHung(st));
    } else {
      STRATA_LOG(WARN, CKPT, "rank {}: snapshotd of run '{}' is gone ({}); restarting it", rank_,
                 opts_.run, st.ToString());
    }
    STRATA_RETURN_IF_ERROR(Reconnect());
    ++reconnects_;
  }
  STRATA_RETURN_IF_ERROR(st);
  copy_ns_ += NowNs() - t0;
  ++snapshots_;
  return Status::OK();
}

Status TrainSnapshotter::SnapshotOnce(int64_t step) {
  STRATA_ASSIGN_OR_RETURN(uint8_t* dst, client_->BeginVersion(step));
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
  // Checksummed as they are copied (one pass over memory instead of two).
  const uint32_t crc_w =
      checkpoint::CopyAndChecksum(dst + off_w, store_->weights() + store_->slice_begin(), slice);
  const uint32_t crc_m = checkpoint::CopyAndChecksum(dst + off_m, store_->moment1(), slice);
  const uint32_t crc_v = checkpoint::CopyAndChecksum(dst + off_v, store_->moment2(), slice);
  return client_->Publish(step, {{"state", 0, sizeof(st), std::nullopt},
                                 {"weights", off_w, slice, crc_w},
                                 {"adam_m", off_m, slice, crc_m},
                                 {"adam_v", off_v, slice, crc_v}});
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

StatusOr<ResumeInfo> TrainSnapshotter::Probe(int64_t max_disk_version) {
  ResumeInfo info;
  STRATA_ASSIGN_OR_RETURN(probed_, client_->Latest(max_disk_version));
  const checkpoint::LatestInfo& latest = probed_;
  info.note = latest.note;
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
  info.step = latest.version;
  info.parity_protected = latest.parity_protected;
  if (latest.from_disk) {
    info.from = ResumeSource::kDisk;
    info.source = "disk (" + latest.disk_dir + ")";
  } else if (latest.rebuilt) {
    info.from = ResumeSource::kRebuilt;
    info.rebuilt_from_nodes = latest.rebuilt_from_nodes;
    info.source = fmt::format("rebuilt by erasure decoding from {} surviving nodes",
                              latest.rebuilt_from_nodes);
  } else {
    info.from = ResumeSource::kMemory;
    info.source = "snapshotd memory";
  }
  return info;
}

Status TrainSnapshotter::Load(bool all_weights) {
  repair_note_.clear();
  Status st = LoadOnce(all_weights);
  if (st.code() != StatusCode::kCorruption || !probed_.parity_protected || probed_.from_disk) {
    return st;
  }
  StatusOr<std::string> repaired = client_->Repair(probed_.version);
  if (!repaired.ok()) {
    return Status::Corruption(fmt::format("{}; repairing it from the other nodes' parity failed: "
                                          "{}", st.message(), repaired.status().message()));
  }
  repair_note_ = fmt::format("rank {}: {}; {}", rank_, st.message(), *repaired);
  return LoadOnce(all_weights);
}

Status TrainSnapshotter::LoadOnce(bool all_weights) {
  const size_t slice = store_->slice_size() * sizeof(float);
  STRATA_RETURN_IF_ERROR(
      client_->ReadLatest(probed_, {{"weights", store_->weights() + store_->slice_begin(), slice},
                                    {"adam_m", store_->moment1(), slice},
                                    {"adam_v", store_->moment2(), slice}}));
  if (!all_weights) return Status::OK();
  // Each checked against its own checksum, like this rank's.
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    STRATA_RETURN_IF_ERROR(client_->ReadLatest(
        probed_, {{"weights", store_->weights() + store_->layout().slice_begin(r), slice}}, r));
  }
  return Status::OK();
}

Status TrainSnapshotter::Finish() {
  STRATA_RETURN_IF_ERROR(Fence());
  return client_->Finish();
}

StatusOr<JobResume> AgreeOnResume(TrainSnapshotter& snap, comm::Communicator& comm,
                                  bool have_disk) {
  const comm::Topology& topo = comm.topology();
  std::vector<ResumeReport> reports(static_cast<size_t>(comm.size()));
  ResumeInfo mine;
  std::string disk_reason;
  bool discarded = false;
  int64_t max_disk = 0;
  for (int attempt = 0;; ++attempt) {
    STRATA_ASSIGN_OR_RETURN(mine, snap.Probe(max_disk));
    ResumeReport report{};
    report.step = mine.step;
    report.from = static_cast<int32_t>(mine.from);
    report.rebuilt_from_nodes = mine.rebuilt_from_nodes;
    std::snprintf(report.note, sizeof(report.note), "%s", mine.note.c_str());
    STRATA_RETURN_IF_ERROR(comm.Allgather(&report, reports.data(), sizeof(report)));
    bool same = true, any_disk = false, any_memory = false;
    for (const ResumeReport& o : reports) {
      same = same && o.step == reports[0].step;
      any_disk = any_disk || From(o) == ResumeSource::kDisk;
      any_memory = any_memory || From(o) == ResumeSource::kMemory || From(o) == ResumeSource::kRebuilt;
    }
    if (same) break;
    // Nodes group-commit a version independently: for the moment a message is in flight two
    // snapshotds may report different newest versions. Give that a few seconds to settle.
    if (!any_disk && attempt < 20) {
      ::usleep(250000);
      continue;
    }
    // Some node's memory is gone beyond what erasure coding rebuilds (more than m nodes of its
    // group lost): the others' newer versions in memory can never be completed for it. Every
    // node drops its memory and the job resumes from a disk version all nodes have.
    if (!discarded && have_disk) {
      const std::vector<int> lost = NodesWhere(reports, topo, [](const ResumeReport& o) {
        return From(o) == ResumeSource::kDisk || From(o) == ResumeSource::kNone;
      });
      std::string why;
      for (size_t r = 0; r < reports.size() && why.empty(); ++r) {
        if (From(reports[r]) == ResumeSource::kDisk || From(reports[r]) == ResumeSource::kNone) {
          why = reports[r].note;
        }
      }
      disk_reason = fmt::format("{} lost {} snapshot memory{}", NodeList(lost),
                                lost.size() == 1 ? "its" : "their",
                                why.empty() ? "" : " and it could not be rebuilt (" + why + ")");
      if (any_memory) disk_reason += "; the other nodes' newer versions in memory were dropped";
      if (topo.local_rank == 0) STRATA_RETURN_IF_ERROR(snap.DiscardNodeMemory());
      STRATA_RETURN_IF_ERROR(comm.Barrier());
      STRATA_RETURN_IF_ERROR(snap.Reconnect());
      STRATA_RETURN_IF_ERROR(comm.Barrier());
      discarded = true;
      continue;
    }
    // All from disk, but the nodes' newest complete versions differ (one was still writing when
    // the job died): take the newest one every node has.
    int64_t lowest = reports[0].step;
    for (const ResumeReport& o : reports) lowest = std::min(lowest, o.step);
    if (max_disk == 0 && lowest > 0 && !any_memory) {
      max_disk = lowest;
      continue;
    }
    std::vector<std::string> seen;
    const char* kinds[] = {"nothing", "memory", "rebuilt", "disk"};
    for (size_t r = 0; r < reports.size(); ++r) {
      seen.push_back(fmt::format("rank {}: step {} from {}", r, reports[r].step,
                                 kinds[reports[r].from & 3]));
    }
    return Status::DataLoss(fmt::format(
        "the ranks cannot agree on a snapshot to resume from ({}){}", fmt::join(seen, "; "),
        have_disk ? "" : "; --snapshot-dir with --persist-every gives them a common disk version"));
  }

  JobResume job;
  job.step = mine.step;
  job.source = mine.source;
  if (job.step == 0) return job;
  // Where each node's state came from (a node's lowest rank speaks for it).
  auto nodes_from = [&](ResumeSource from) {
    return NodesWhere(reports, topo, [from](const ResumeReport& o) { return From(o) == from; });
  };
  const std::vector<int> memory = nodes_from(ResumeSource::kMemory);
  const std::vector<int> rebuilt = nodes_from(ResumeSource::kRebuilt);
  const std::vector<int> disk = nodes_from(ResumeSource::kDisk);
  std::vector<std::string> parts;
  if (!rebuilt.empty()) {
    int from_nodes = 0;
    for (const ResumeReport& o : reports) {
      if (From(o) != ResumeSource::kRebuilt) continue;
      from_nodes = o.rebuilt_from_nodes;
      if (std::find(job.remarks.begin(), job.remarks.end(), o.note) == job.remarks.end()) {
        job.remarks.push_back(o.note);
      }
    }
    parts.push_back(fmt::format("{} rebuilt by erasure decoding from {} surviving nodes",
                                NodeList(rebuilt), from_nodes));
  }
  if (!memory.empty()) {
    parts.push_back(memory.size() == static_cast<size_t>(topo.num_nodes)
                        ? (topo.num_nodes == 1
                               ? std::string("snapshotd memory")
                               : fmt::format("snapshotd memory on all {} nodes", topo.num_nodes))
                        : NodeList(memory) + " from snapshotd memory");
  }
  if (!disk.empty()) {
    parts.push_back(disk.size() == static_cast<size_t>(topo.num_nodes) ? mine.source
                                                                       : NodeList(disk) + " from disk");
    // Nodes may come back from disk at the same step the others hold in memory (the version was
    // persisted too): then nothing was discarded, but say why those nodes used the disk.
    if (disk_reason.empty() && disk.size() < static_cast<size_t>(topo.num_nodes)) {
      std::string why;
      for (const ResumeReport& o : reports) {
        if (From(o) == ResumeSource::kDisk && why.empty()) why = o.note;
      }
      disk_reason = fmt::format("{} lost {} snapshot memory{}", NodeList(disk),
                                disk.size() == 1 ? "its" : "their",
                                why.empty() ? "" : " and it could not be rebuilt (" + why + ")");
    }
    std::string why = disk_reason;
    if (why.empty()) why = reports[0].note[0] != '\0' ? reports[0].note : "no node had it in memory";
    job.remarks.push_back("resumed from disk because " + why);
  }
  job.source = fmt::format("{}", fmt::join(parts, ", "));
  return job;
}

}  // namespace strata::launcher
