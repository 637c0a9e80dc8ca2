// Ranks as processes (after gloo's multiproc_test): fork one child per rank, connect them with
// the tcp transport through a file rendezvous, run a body, and let the parent kill or stop a
// rank from outside. Each child reports one small record back through a pipe.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace strata::testing {

struct ChildReport {
  int exit_code = -1;       // from waitpid; -1 if killed by a signal
  int term_signal = 0;
  int status_code = 0;      // StatusCode of the failure the body reported, 0 = OK
  int64_t event_ns = 0;     // NowNs() when the body saw its failure (or finished)
  std::string message;      // the failure text, or a note from the body
};

struct ChildResult {
  Status status;
  int64_t event_ns = 0;
};

using RankBody = std::function<ChildResult(comm::Communicator& comm)>;

class ProcessGroup {
 public:
  // Forks `n` ranks. Each connects (tcp, loopback, file rendezvous in a fresh temp folder) and
  // runs `body`. `tcp` and `config` set link delay and timeouts.
  ProcessGroup(int n, comm::tcp::TcpOptions tcp, comm::CommConfig config, RankBody body);
  ~ProcessGroup();

  pid_t pid(int rank) const { return pids_[rank]; }
  void Signal(int rank, int sig) const;
  // Waits for every child (killing any still alive after `timeout_s`) and collects reports.
  std::vector<ChildReport> Wait(int timeout_s = 120);

 private:
  std::string dir_;
  std::vector<pid_t> pids_;
  std::vector<int> pipes_;
};

}  // namespace strata::testing
