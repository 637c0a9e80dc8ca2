// How many CPUs this process may run on, and the threads a rank should use.
#pragma once

#include <string>

namespace strata {

// CPUs in this process's affinity mask (what a launcher's binding leaves it); the online CPU
// count when the mask cannot be read.
int UsableCpuCount();
// CPUs online on this machine.
int OnlineCpuCount();

// Threads for one of `local_ranks` ranks on this node: the node's CPUs split evenly, but never
// more than the rank may run on. When the binding leaves the rank fewer CPUs than its share
// (Open MPI binds each rank to one core when it starts two or fewer), *note says so and how to
// lift it; otherwise *note is empty.
int DefaultRankThreads(int local_ranks, std::string* note);

}  // namespace strata
