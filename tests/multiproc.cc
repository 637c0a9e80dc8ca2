#include "tests/multiproc.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include "base/clock.h"
#include "comm/rendezvous/rendezvous.h"

namespace strata::testing {
namespace {

struct Wire {
  int32_t status_code;
  int64_t event_ns;
  char message[512];
};

void WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w <= 0) return;
    c += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

ProcessGroup::ProcessGroup(int n, comm::tcp::TcpOptions tcp, comm::CommConfig config,
                           RankBody body) {
  char tmpl[] = "/tmp/strata-pg-XXXXXX";
  dir_ = ::mkdtemp(tmpl);
  for (int r = 0; r < n; ++r) {
    int fds[2];
    if (::pipe(fds) != 0) std::abort();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      Wire w{};
      auto rv = comm::MakeFileRendezvous(dir_, r, n);
      StatusOr<std::unique_ptr<comm::Communicator>> c = comm::CreateTcp(*rv, tcp, config);
      ChildResult res;
      if (!c.ok()) {
        res.status = c.status();
        res.event_ns = NowNs();
      } else {
        res = body(**c);
        c->reset();  // orderly close, as a real program ending main() would do
      }
      w.status_code = static_cast<int32_t>(res.status.code());
      w.event_ns = res.event_ns;
      std::snprintf(w.message, sizeof(w.message), "%s", res.status.ToString().c_str());
      WriteAll(fds[1], &w, sizeof(w));
      ::close(fds[1]);
      ::_exit(res.status.ok() ? 0 : 1);
    }
    ::close(fds[1]);
    pids_.push_back(pid);
    pipes_.push_back(fds[0]);
  }
}

ProcessGroup::~ProcessGroup() {
  for (pid_t p : pids_) {
    if (p > 0) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
  }
  for (int fd : pipes_) ::close(fd);
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

void ProcessGroup::Signal(int rank, int sig) const { ::kill(pids_[rank], sig); }

std::vector<ChildReport> ProcessGroup::Wait(int timeout_s) {
  std::vector<ChildReport> out(pids_.size());
  const Deadline deadline = Deadline::After(std::chrono::seconds(timeout_s));
  for (size_t r = 0; r < pids_.size(); ++r) {
    int status = 0;
    while (true) {
      const pid_t got = ::waitpid(pids_[r], &status, WNOHANG);
      if (got == pids_[r]) break;
      if (deadline.expired()) {
        ::kill(pids_[r], SIGKILL);
        ::waitpid(pids_[r], &status, 0);
        out[r].message = "killed by the test: did not finish in time";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pids_[r] = -1;
    if (WIFEXITED(status)) out[r].exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) out[r].term_signal = WTERMSIG(status);
    Wire w{};
    size_t got = 0;
    while (got < sizeof(w)) {
      const ssize_t n = ::read(pipes_[r], reinterpret_cast<char*>(&w) + got, sizeof(w) - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    if (got == sizeof(w)) {
      out[r].status_code = w.status_code;
      out[r].event_ns = w.event_ns;
      if (out[r].message.empty()) out[r].message = w.message;
    }
  }
  return out;
}

}  // namespace strata::testing
