// Where this process sits in a launch: rank, size, local rank and node, read from the variables
// Open MPI, PMIx and Slurm export. MPI_Init, when running, is the source of truth; the
// variables let strata report placement before MPI starts and explain mismatches.
#pragma once

#include <string>

namespace strata::launcher {

struct Placement {
  int rank = 0;
  int size = 1;
  int local_rank = 0;
  int local_size = 1;
  int node = 0;
  std::string hostname;
  std::string source;  // "openmpi", "pmix", "slurm" or "none"
  std::string job;     // Slurm job name or Open MPI job id, if any
};

// From the environment only (no MPI call).
Placement DiscoverFromEnv();

}  // namespace strata::launcher
