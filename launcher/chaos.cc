// `strata chaos`: fault injection against a running (or crashed) training run, to rehearse
// recovery. Killing a rank at a chosen step is `strata train --fail-at-step S --fail-rank R`.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "checkpoint/snapshot_client.h"
#include "checkpoint/snapshot_wire.h"
#include "checkpoint/snapshotd.h"
#include "launcher/commands.h"

namespace strata::launcher {
namespace {

struct ChaosArgs {
  std::string run;
  std::string socket;
  int rank = 0;
  std::string section = "weights";
  uint64_t byte = 0;
  std::string shm_tag;
};

StatusOr<std::unique_ptr<checkpoint::SnapshotClient>> ConnectTo(
    const ChaosArgs& a, checkpoint::SnapshotClient::Options options = {}) {
  checkpoint::SnapshotdOptions so;
  so.run = a.run;
  so.socket_path = a.socket;
  // strata train's node tag on nodes that share a machine (network namespaces).
  if (so.socket_path.empty()) so.socket_path = checkpoint::NodeSocketPath(a.run, a.shm_tag);
  return checkpoint::SnapshotClient::Connect(checkpoint::SnapshotdSocketPath(so), options);
}

Status KillSnapshotd(const ChaosArgs& a) {
  checkpoint::SnapshotClient::Options quick;
  quick.rpc_timeout_s = 5;
  STRATA_ASSIGN_OR_RETURN(auto client, ConnectTo(a, quick));
  // A hung (stopped) snapshotd does not answer the ping: its pid then comes from the socket.
  StatusOr<int> pong = client->Ping();
  const int pid = pong.ok() ? *pong : client->server_pid();
  if (pid <= 0) return pong.status();
  if (::kill(pid, SIGKILL) != 0) return ErrnoStatus(fmt::format("kill {}", pid), errno);
  // Gone once signal 0 fails (it is not our child, so there is nothing to reap).
  for (int i = 0; i < 500 && ::kill(pid, 0) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::printf("strata chaos: killed snapshotd of run '%s' (pid %d) with SIGKILL\n", a.run.c_str(),
              pid);
  return Status::OK();
}

// SIGSTOP: the snapshotd keeps its socket and accepts connections but answers nothing, as a hung
// process would. strata train replaces it once a request goes unanswered for
// STRATA_SNAPSHOTD_RPC_TIMEOUT_S.
Status HangSnapshotd(const ChaosArgs& a) {
  STRATA_ASSIGN_OR_RETURN(auto client, ConnectTo(a));
  STRATA_ASSIGN_OR_RETURN(int pid, client->Ping());
  if (::kill(pid, SIGSTOP) != 0) return ErrnoStatus(fmt::format("kill -STOP {}", pid), errno);
  std::printf("strata chaos: stopped snapshotd of run '%s' (pid %d) with SIGSTOP\n",
              a.run.c_str(), pid);
  return Status::OK();
}

Status CorruptSnapshot(const ChaosArgs& a) {
  STRATA_ASSIGN_OR_RETURN(auto client, ConnectTo(a));
  STRATA_ASSIGN_OR_RETURN(checkpoint::LatestInfo latest, client->Latest());
  if (!latest.found || latest.from_disk) {
    return Status::NotFound("run '" + a.run + "' has no committed snapshot in memory");
  }
  for (const proto::RankSnapshot& r : latest.manifest.ranks()) {
    if (r.rank() != a.rank) continue;
    for (const proto::SnapshotSection& s : r.sections()) {
      if (s.name() != a.section) continue;
      if (a.byte >= s.bytes()) {
        return Status::InvalidArgument(
            fmt::format("section {} has {} bytes; --byte {} is outside", s.name(), s.bytes(),
                        a.byte));
      }
      const int fd = ::shm_open(r.shm_name().c_str(), O_RDWR, 0);
      if (fd < 0) return ErrnoStatus("shm_open " + r.shm_name(), errno);
      struct stat st{};
      ::fstat(fd, &st);
      void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE,
                       MAP_SHARED, fd, 0);
      ::close(fd);
      if (p == MAP_FAILED) return ErrnoStatus("mmap " + r.shm_name(), errno);
      uint8_t* b = static_cast<uint8_t*>(p) + s.offset() + a.byte;
      *b ^= 0x5a;
      ::munmap(p, static_cast<size_t>(st.st_size));
      std::printf("strata chaos: flipped bits of byte %llu of rank %d's '%s' in version %lld "
                  "(%s)\n",
                  static_cast<unsigned long long>(a.byte), a.rank, a.section.c_str(),
                  static_cast<long long>(latest.version), r.shm_name().c_str());
      return Status::OK();
    }
    return Status::NotFound(fmt::format("rank {} has no section '{}'", a.rank, a.section));
  }
  return Status::NotFound(fmt::format("the newest snapshot of run '{}' has no rank {} on this "
                                      "node", a.run, a.rank));
}

// A process's argv, from /proc (empty when it is gone or not ours to read).
std::vector<std::string> ProcArgs(const std::string& pid) {
  std::ifstream f("/proc/" + pid + "/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(f)), {});
  std::vector<std::string> args;
  size_t start = 0;
  while (start < all.size()) {
    const size_t end = std::min(all.find('\0', start), all.size());
    args.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  return args;
}

std::string FlagValue(const std::vector<std::string>& args, const std::string& flag) {
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == flag) return args[i + 1];
  }
  for (const std::string& a : args) {
    if (a.rfind(flag + "=", 0) == 0) return a.substr(flag.size() + 1);
  }
  return "";
}

// A whole node goes down: every process of the run on it (trainer ranks and snapshotd) dies at
// once and its memory is gone. "On it" is this network namespace: on a real machine that is
// every process; with scripts/netns-cluster.sh it is one emulated node (run this under
// `ip netns exec`). The snapshotd's shared memory (its slots and erasure-coding parity) is
// removed, as a reboot would.
Status KillNode(const ChaosArgs& a) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path my_net = fs::read_symlink("/proc/self/ns/net", ec);
  if (ec) return Status::IOError("readlink /proc/self/ns/net: " + ec.message());
  const std::string self = std::to_string(::getpid());
  std::vector<std::pair<int, std::string>> victims;  // pid, what
  std::vector<std::string> tags, sockets;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string pid = e.path().filename().string();
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos || pid == self) {
      continue;
    }
    std::error_code e2;
    if (fs::read_symlink(e.path() / "ns" / "net", e2) != my_net || e2) continue;
    const std::vector<std::string> args = ProcArgs(pid);
    if (args.size() < 2 || fs::path(args[0]).filename().string().rfind("strata", 0) != 0) continue;
    if ((args[1] != "train" && args[1] != "snapshotd") || FlagValue(args, "--run") != a.run) {
      continue;
    }
    if (args[1] == "snapshotd") {
      tags.push_back(FlagValue(args, "--shm-tag"));
      sockets.push_back(FlagValue(args, "--socket"));
    }
    victims.push_back({std::stoi(pid), args[1]});
  }
  // All at once, so no survivor on this node reacts to another's death.
  for (const auto& [pid, what] : victims) ::kill(pid, SIGKILL);
  for (const auto& [pid, what] : victims) {
    for (int i = 0; i < 500; ++i) {
      std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
      std::string line;
      if (!std::getline(stat, line)) break;
      const size_t paren = line.rfind(')');
      if (paren != std::string::npos && paren + 2 < line.size() &&
          (line[paren + 2] == 'Z' || line[paren + 2] == 'X')) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  if (!a.shm_tag.empty()) tags.push_back(a.shm_tag);
  if (tags.empty()) tags.push_back("");  // a node-local run: shm names carry the run alone
  int removed = 0;
  for (const std::string& tag : tags) {
    const std::string shm_run = checkpoint::SanitizeRunName(tag.empty() ? a.run : a.run + "." + tag);
    for (const auto& e : fs::directory_iterator("/dev/shm", ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("strata-snap-" + shm_run + "-r", 0) == 0 ||
          name.rfind("strata-ec-" + shm_run + "-n", 0) == 0) {
        std::error_code e3;
        if (fs::remove(e.path(), e3)) ++removed;
      }
    }
  }
  for (const std::string& sock : sockets) {
    if (!sock.empty()) fs::remove(sock, ec);
  }
  std::string what;
  for (const auto& [pid, w] : victims) what += fmt::format("{}{} {}", what.empty() ? "" : ", ", w, pid);
  std::printf("strata chaos: node down for run '%s': killed %zu process(es) (%s) with SIGKILL, "
              "removed %d shared-memory object(s)\n",
              a.run.c_str(), victims.size(), what.empty() ? "none running" : what.c_str(), removed);
  return Status::OK();
}

// A subcommand's body: run `fn`, print its error, exit 0 or 1.
std::function<int()> Reported(Status (*fn)(const ChaosArgs&), std::shared_ptr<ChaosArgs> a) {
  return [fn, a] {
    const Status st = fn(*a);
    if (!st.ok()) std::fprintf(stderr, "strata chaos: %s\n", st.ToString().c_str());
    return st.ok() ? 0 : 1;
  };
}

// The options of a subcommand aimed at one node's snapshotd of a run.
void AddSnapshotdTarget(CLI::App* app, ChaosArgs& a) {
  app->add_option("--run", a.run, "run name (strata train --run)")->required();
  app->add_option("--socket", a.socket, "snapshotd socket (default from the run name)");
  app->add_option("--shm-tag", a.shm_tag,
                  "the node tag strata train gives the snapshotd when nodes share one machine "
                  "(n<node index>, network namespaces); picks its socket");
}

}  // namespace

void AddChaosCommand(CLI::App& root, std::vector<Command>& commands) {
  CLI::App* chaos = root.add_subcommand(
      "chaos",
      "Fault injection for rehearsing recovery of a training run. To kill a rank at step S use "
      "`strata train --fail-at-step S --fail-rank R`, to take a whole node down `kill-node`; "
      "then relaunch with `--resume auto`.");
  chaos->require_subcommand(1);
  auto a = std::make_shared<ChaosArgs>();
  CLI::App* k = chaos->add_subcommand(
      "kill-snapshotd",
      "SIGKILL this node's snapshotd of a run. The trainer starts a new one at its next "
      "snapshot, which recovers the committed versions from the shared memory left behind.");
  AddSnapshotdTarget(k, *a);
  commands.push_back({k, Reported(KillSnapshotd, a)});
  CLI::App* h = chaos->add_subcommand(
      "hang-snapshotd",
      "SIGSTOP this node's snapshotd of a run: it keeps its socket but answers nothing, like a "
      "hung process. The trainer kills and replaces it once a request goes unanswered for "
      "STRATA_SNAPSHOTD_RPC_TIMEOUT_S seconds (default 30); the new one recovers the committed "
      "versions from shared memory.");
  AddSnapshotdTarget(h, *a);
  commands.push_back({h, Reported(HangSnapshotd, a)});
  CLI::App* n = chaos->add_subcommand(
      "kill-node",
      "Take this node down for a run: SIGKILL every strata process of the run here (its "
      "training ranks and its snapshotd, matched by --run) at once and remove the snapshotd's "
      "shared memory, as a crash and reboot would. 'Here' is this network namespace, so with "
      "scripts/netns-cluster.sh run it as `ip netns exec strata-h2 strata chaos kill-node "
      "--run R`. The job fails; a relaunch with --resume auto rebuilds the node's snapshot from "
      "the other nodes' data and parity (strata train --ec), or falls back to disk when more "
      "nodes of a group are gone than it has parity for.");
  n->add_option("--run", a->run, "run name (strata train --run; the ranks must have it)")
      ->required();
  n->add_option("--shm-tag", a->shm_tag,
                "also remove shared memory of this tag when no snapshotd is running "
                "(strata train uses n<node index> when nodes of a job share one machine)");
  commands.push_back({n, Reported(KillNode, a)});
  CLI::App* c = chaos->add_subcommand(
      "corrupt",
      "Flip one byte of a rank's section in the newest committed snapshot in shared memory. "
      "Its CRC-32C no longer matches: a resume detects it. With snapshots erasure-coded across "
      "nodes the node's snapshotd then rebuilds the bytes from the other nodes' parity and the "
      "resume goes on; without, the resume refuses to load it.");
  AddSnapshotdTarget(c, *a);
  c->add_option("--rank", a->rank, "whose snapshot")->capture_default_str();
  c->add_option("--section", a->section, "state, weights, adam_m or adam_v")->capture_default_str();
  c->add_option("--byte", a->byte, "offset inside the section")->capture_default_str();
  commands.push_back({c, Reported(CorruptSnapshot, a)});
}

}  // namespace strata::launcher
