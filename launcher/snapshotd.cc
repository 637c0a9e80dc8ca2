// `strata snapshotd --run NAME`: serves the node's snapshot shared memory until a rank sends
// Finish, no client has been connected for --idle-timeout seconds, or SIGTERM/SIGINT.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/snapshot_wire.h"
#include "checkpoint/snapshotd.h"
#include "launcher/snapshotd_command.h"

namespace strata::launcher {
namespace {

checkpoint::Snapshotd* g_server = nullptr;  // for the signal handler only

void OnSignal(int) {
  if (g_server != nullptr) g_server->Stop();  // async-signal-safe: an atomic store + write(2)
}

}  // namespace

void AddSnapshotdCommand(CLI::App& root, std::vector<Command>& commands) {
  struct Args {
    checkpoint::SnapshotdOptions options;
    std::vector<std::string> peers;
    std::string ec;
    double peer_timeout_s = 30;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* app = root.add_subcommand(
      "snapshotd",
      "Run the node-local snapshot manager of a training job. Training ranks on this node copy "
      "their weights, AdamW moments and extra state into shared memory that this process owns, "
      "so a crashed or killed trainer restarts from the newest committed snapshot version "
      "(bitwise identical) in seconds. A version commits once every local rank has published "
      "it; the previous committed version is kept until then. Optionally every N-th committed "
      "version is also written to disk, and a snapshotd started with empty memory serves the "
      "newest complete disk version. Exits, removing its shared memory and socket, when rank 0 "
      "sends Finish at the end of the job, after --idle-timeout seconds without clients, or on "
      "SIGTERM/SIGINT. `strata train` normally starts it for you; a second snapshotd for the "
      "same socket exits at once (status 0) and leaves the running one in charge.");
  app->add_option("--run", args->options.run,
                  "Job name: names the socket, the /dev/shm objects (strata-snap-<run>-r<rank>-"
                  "s<slot>) and the folder under --persist-dir")
      ->required();
  app->add_option("--socket", args->options.socket_path,
                  "Unix socket to serve (default /tmp/strata-snapshotd-<run>.sock, the run name "
                  "sanitized)");
  app->add_option("--persist-dir", args->options.persist_dir,
                  "Write committed versions to <dir>/<run>/v<version>/ (per-rank files + "
                  "manifest, written to a temp folder, fsynced and renamed); default: no disk "
                  "copies");
  app->add_option("--persist-every", args->options.persist_every,
                  "Persist every N-th committed version (0: never; needs --persist-dir)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--persist-keep", args->options.persist_keep,
                  "Complete versions kept on disk, older ones removed (0: keep all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--idle-timeout", args->options.idle_timeout_s,
                  "Exit after this many seconds with no client connected (<= 0: never)")
      ->capture_default_str();
  app->add_option("--expected-local-ranks", args->options.expected_local_ranks,
                  "Ranks on this node; a version commits once that many published it (0: every "
                  "rank registered so far)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--peers", args->peers,
                  "Erasure coding across nodes: host:port of every node's snapshotd, in node "
                  "order, comma-separated (every node gets the same list). Nodes form groups of "
                  "k + m consecutive nodes; each keeps its own snapshot in place and holds parity "
                  "worth m/k of it; any m lost nodes of a group are rebuilt from the others. "
                  "Omitted or one entry: node-local snapshots only");
  app->add_option("--node", args->options.node, "This node's index in --peers")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--ec", args->ec,
                  "k,m: data and parity nodes per erasure-coding group (default from the node "
                  "count: 2 -> 1,1; 3 -> 2,1; 4..8 -> n-2,2; more: groups of 4..8 with m=2)");
  app->add_option("--listen", args->options.listen,
                  "TCP host:port to serve peers on (default: this node's --peers entry)");
  app->add_option("--shm-tag", args->options.shm_tag,
                  "Added to the shared-memory names (<run>.<tag>) so several nodes' snapshotds "
                  "can share one machine (tests, single-host trials)");
  app->add_option("--peer-timeout", args->peer_timeout_s,
                  "Seconds one exchange with another node's snapshotd may take, and how long an "
                  "unreachable one is retried; past it that version cannot commit across the "
                  "group, and snapshots go on on this node only (the last group-committed version "
                  "keeps its parity) until the group answers again")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--ec-threads", args->options.ec_threads, "Erasure-coding threads")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_flag("--json", args->json, "Print a one-line JSON summary on exit");
  commands.push_back({app, [args]() -> int {
    args->options.ec_io_timeout_ms = static_cast<int>(args->peer_timeout_s * 1000);
    for (const std::string& p : args->peers) {
      size_t start = 0;
      while (start <= p.size()) {
        const size_t comma = std::min(p.find(',', start), p.size());
        if (comma > start) args->options.peers.push_back(p.substr(start, comma - start));
        start = comma + 1;
      }
    }
    if (!args->ec.empty()) {
      int k = 0, m = 0;
      char extra = 0;
      if (std::sscanf(args->ec.c_str(), "%d,%d%c", &k, &m, &extra) != 2) {
        std::fprintf(stderr, "strata snapshotd: --ec wants k,m (e.g. 2,1), got '%s'\n",
                     args->ec.c_str());
        return 2;
      }
      args->options.ec_k = k;
      args->options.ec_m = m;
    }
    // EnsureSnapshotd's "decided" pipe (see SnapshotdOptions::ready_fd).
    if (const char* fd = std::getenv("STRATA_SNAPSHOTD_READY_FD"); fd != nullptr) {
      args->options.ready_fd = std::atoi(fd);
      ::unsetenv("STRATA_SNAPSHOTD_READY_FD");
    }
    auto server = checkpoint::Snapshotd::Create(args->options);
    if (!server.ok()) {
      std::fprintf(stderr, "strata snapshotd: %s\n", server.status().ToString().c_str());
      return 2;
    }
    g_server = server->get();
    struct sigaction sa {};
    sa.sa_handler = OnSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);
    const Status st = (*server)->Run();
    g_server = nullptr;
    const bool lost_race = st.code() == StatusCode::kAlreadyExists;
    if (args->json) {
      nlohmann::json j = {{"run", args->options.run},
                          {"socket", checkpoint::SnapshotdSocketPath(args->options)},
                          {"status", lost_race ? "already_running" : st.ok() ? "ok" : "error"},
                          {"message", st.message()}};
      std::printf("%s\n", j.dump().c_str());
    }
    if (lost_race) {
      std::fprintf(stderr, "strata %s\n", st.message().c_str());
      return 0;
    }
    if (!st.ok()) {
      std::fprintf(stderr, "strata snapshotd: %s\n", st.ToString().c_str());
      return 1;
    }
    return 0;
  }});
}

}  // namespace strata::launcher
