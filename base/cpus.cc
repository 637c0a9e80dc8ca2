#include "base/cpus.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

namespace strata {

int OnlineCpuCount() {
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

int UsableCpuCount() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return OnlineCpuCount();
  const int n = CPU_COUNT(&set);
  return n > 0 ? n : OnlineCpuCount();
}

int DefaultRankThreads(int local_ranks, std::string* note) {
  const int online = OnlineCpuCount(), usable = UsableCpuCount();
  const int share = std::max(1, online / std::max(1, local_ranks));
  note->clear();
  if (usable < share) {
    *note = fmt::format(
        "this rank may run on {} of the node's {} CPUs (its launcher bound it; Open MPI binds "
        "each rank to one core when it starts two or fewer), so it uses {} thread(s) instead of "
        "{}: pass --bind-to none to mpirun (srun: --cpu-bind=none) to give it more",
        usable, online, usable, share);
  }
  return std::min(share, usable);
}

}  // namespace strata
