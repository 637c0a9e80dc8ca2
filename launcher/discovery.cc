#include "launcher/discovery.h"

#include <cstdlib>
#include <string>

#include "comm/topology.h"

namespace strata::launcher {
namespace {

// These are launcher outputs, not strata overrides, so they are read here and not through the
// STRATA_* registry in base/env.h.
bool GetInt(const char* name, int* out) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return false;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0') return false;
  *out = static_cast<int>(x);
  return true;
}

std::string GetStr(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

Placement DiscoverFromEnv() {
  Placement p;
  p.hostname = comm::LocalHostname();
  if (GetInt("OMPI_COMM_WORLD_RANK", &p.rank)) {
    p.source = "openmpi";
    GetInt("OMPI_COMM_WORLD_SIZE", &p.size);
    GetInt("OMPI_COMM_WORLD_LOCAL_RANK", &p.local_rank);
    GetInt("OMPI_COMM_WORLD_LOCAL_SIZE", &p.local_size);
    GetInt("OMPI_COMM_WORLD_NODE_RANK", &p.node);  // Open MPI's node rank is per node; refined by MPI
    p.job = GetStr("OMPI_MCA_orte_ess_jobid");
  } else if (GetInt("PMIX_RANK", &p.rank)) {
    p.source = "pmix";
    // PMIx exports the rank; size and locality come from Slurm when srun --mpi=pmix launched us.
    GetInt("SLURM_NTASKS", &p.size);
    GetInt("SLURM_LOCALID", &p.local_rank);
    GetInt("SLURM_NODEID", &p.node);
  } else if (GetInt("SLURM_PROCID", &p.rank)) {
    p.source = "slurm";
    GetInt("SLURM_NTASKS", &p.size);
    GetInt("SLURM_LOCALID", &p.local_rank);
    GetInt("SLURM_NODEID", &p.node);
  } else {
    p.source = "none";
  }
  if (p.source != "openmpi") {
    // SLURM_TASKS_PER_NODE looks like "2(x3),1": the count for this node is not simple to get,
    // so local_size stays 1 unless MPI tells us better.
    int tasks_on_node = 0;
    if (GetInt("SLURM_NTASKS_PER_NODE", &tasks_on_node)) p.local_size = tasks_on_node;
  }
  if (p.job.empty()) p.job = GetStr("SLURM_JOB_NAME");
  return p;
}

}  // namespace strata::launcher
