// `strata info`: where this rank runs (from the launcher's variables and from MPI) and every
// STRATA_* override with its current value.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "base/env.h"
#include "comm/transport/mpi/mpi_transport.h"
#include "kernels/reduce.h"
#include "launcher/commands.h"
#include "launcher/discovery.h"
#include "runtime/device.h"
#include "strata/config.h"

namespace strata::launcher {

void AddInfoCommand(CLI::App& root, std::vector<Command>& commands) {
  struct Args {
    bool env = false;
    bool json = false;
    bool no_mpi = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* app = root.add_subcommand(
      "info", "Print this rank's placement (rank, size, local rank, node) as seen by the "
              "launcher variables (Open MPI, PMIx, Slurm) and by MPI, the build configuration, "
              "and with --env every STRATA_* override.");
  app->add_flag("--env", args->env, "List every STRATA_* environment override, its default, "
                                    "current value and meaning");
  app->add_flag("--json", args->json, "Print one JSON object per rank instead of text");
  app->add_flag("--no-mpi", args->no_mpi, "Do not initialize MPI; report launcher variables only");
  commands.push_back({app, [args]() -> int {
    if (args->env) {
      for (const EnvVar& v : AllEnvVars()) {
        const std::string cur = EnvString(v.name);
        std::printf("%-24s default=%-8s current=%-8s %s\n", v.name,
                    *v.default_value ? v.default_value : "\"\"", cur.empty() ? "\"\"" : cur.c_str(),
                    v.help);
      }
      return 0;
    }
    const Placement env = DiscoverFromEnv();
    nlohmann::json j = {
        {"launcher", env.source}, {"hostname", env.hostname},
        {"env_rank", env.rank},   {"env_size", env.size},
        {"env_local_rank", env.local_rank}, {"job", env.job},
        {"version", STRATA_VERSION}, {"cuda", STRATA_HAVE_CUDA != 0},
        {"ucx", STRATA_HAVE_UCX != 0}, {"reduce_isa", kernels::ReduceIsa()}};
    // Whether `strata train --device cuda` would find a GPU, and if not, why.
    std::string gpu;
    {
      StatusOr<std::unique_ptr<runtime::Device>> d = runtime::MakeCudaDevice(0);
      gpu = d.ok() ? (*d)->name() : "none (" + d.status().message() + ")";
    }
    j["cuda_device"] = gpu;
    if (!args->no_mpi) {
      Status st = comm::mpi::EnsureInitialized(nullptr, nullptr);
      if (!st.ok()) {
        std::fprintf(stderr, "strata info: %s\n", st.ToString().c_str());
        return 1;
      }
      StatusOr<comm::Topology> topo = comm::mpi::DiscoverTopology(MPI_COMM_WORLD);
      if (!topo.ok()) {
        std::fprintf(stderr, "strata info: %s\n", topo.status().ToString().c_str());
        return 1;
      }
      j["rank"] = topo->rank;
      j["size"] = topo->size;
      j["local_rank"] = topo->local_rank;
      j["local_size"] = topo->local_size;
      j["node"] = topo->node;
      j["num_nodes"] = topo->num_nodes;
      if (env.source != "none" && (env.rank != topo->rank || env.size != topo->size)) {
        std::fprintf(stderr,
                     "strata info: warning: launcher variables (%s) say rank %d of %d but MPI "
                     "says %d of %d; trusting MPI\n",
                     env.source.c_str(), env.rank, env.size, topo->rank, topo->size);
      }
    }
    if (args->json) {
      std::printf("%s\n", j.dump().c_str());
    } else if (args->no_mpi) {
      std::printf("[%s] launcher=%s rank=%d size=%d local_rank=%d job=%s reduce_isa=%s "
                  "cuda_device=%s\n",
                  env.hostname.c_str(), env.source.c_str(), env.rank, env.size, env.local_rank,
                  env.job.c_str(), kernels::ReduceIsa(), gpu.c_str());
    } else {
      std::printf("[%s] rank %d of %d, local rank %d of %d, node %d of %d (launcher: %s) "
                  "reduce_isa=%s cuda=%d cuda_device=%s\n",
                  env.hostname.c_str(), j["rank"].get<int>(), j["size"].get<int>(),
                  j["local_rank"].get<int>(), j["local_size"].get<int>(), j["node"].get<int>(),
                  j["num_nodes"].get<int>(), env.source.c_str(), kernels::ReduceIsa(),
                  STRATA_HAVE_CUDA, gpu.c_str());
    }
    return 0;
  }});
}

}  // namespace strata::launcher
