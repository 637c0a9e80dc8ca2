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
#include <thread>

#include <fmt/format.h>

#include "checkpoint/snapshot_client.h"
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
};

StatusOr<std::unique_ptr<checkpoint::SnapshotClient>> ConnectTo(const ChaosArgs& a) {
  checkpoint::SnapshotdOptions so;
  so.run = a.run;
  so.socket_path = a.socket;
  return checkpoint::SnapshotClient::Connect(checkpoint::SnapshotdSocketPath(so));
}

Status KillSnapshotd(const ChaosArgs& a) {
  STRATA_ASSIGN_OR_RETURN(auto client, ConnectTo(a));
  STRATA_ASSIGN_OR_RETURN(int pid, client->Ping());
  if (::kill(pid, SIGKILL) != 0) return ErrnoStatus(fmt::format("kill {}", pid), errno);
  // Gone once signal 0 fails (it is not our child, so there is nothing to reap).
  for (int i = 0; i < 500 && ::kill(pid, 0) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::printf("strata chaos: killed snapshotd of run '%s' (pid %d) with SIGKILL\n", a.run.c_str(),
              pid);
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

}  // namespace

void AddChaosCommand(CLI::App& root, std::vector<Command>& commands) {
  CLI::App* chaos = root.add_subcommand(
      "chaos",
      "Fault injection for rehearsing recovery of a training run. To kill a rank at step S use "
      "`strata train --fail-at-step S --fail-rank R`; then relaunch with `--resume auto`.");
  chaos->require_subcommand(1);
  auto a = std::make_shared<ChaosArgs>();
  CLI::App* k = chaos->add_subcommand(
      "kill-snapshotd",
      "SIGKILL this node's snapshotd of a run. The trainer starts a new one at its next "
      "snapshot, which recovers the committed versions from the shared memory left behind.");
  k->add_option("--run", a->run, "run name (strata train --run)")->required();
  k->add_option("--socket", a->socket, "snapshotd socket (default from the run name)");
  commands.push_back({k, [a] {
                        Status st = KillSnapshotd(*a);
                        if (!st.ok()) std::fprintf(stderr, "strata chaos: %s\n", st.ToString().c_str());
                        return st.ok() ? 0 : 1;
                      }});
  CLI::App* c = chaos->add_subcommand(
      "corrupt",
      "Flip one byte of a rank's section in the newest committed snapshot in shared memory. "
      "Its CRC-32C no longer matches: a resume must detect it and not load it.");
  c->add_option("--run", a->run, "run name (strata train --run)")->required();
  c->add_option("--socket", a->socket, "snapshotd socket (default from the run name)");
  c->add_option("--rank", a->rank, "whose snapshot")->capture_default_str();
  c->add_option("--section", a->section, "state, weights, adam_m or adam_v")->capture_default_str();
  c->add_option("--byte", a->byte, "offset inside the section")->capture_default_str();
  commands.push_back({c, [a] {
                        Status st = CorruptSnapshot(*a);
                        if (!st.ok()) std::fprintf(stderr, "strata chaos: %s\n", st.ToString().c_str());
                        return st.ok() ? 0 : 1;
                      }});
}

}  // namespace strata::launcher
