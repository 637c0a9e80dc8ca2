// strata: one binary, one subcommand per job. Run `strata --help` or `strata <command> --help`.
#include <mpi.h>

#include <cstdio>
#include <vector>

#include <CLI/CLI.hpp>

#include "comm/transport/mpi/mpi_transport.h"
#include "launcher/commands.h"
#include "launcher/snapshotd_command.h"
#include "strata/config.h"

int main(int argc, char** argv) {
  CLI::App app{
      "strata: tensor-parallel inference and RAM-centric training of Llama-family models on "
      "clusters of modest machines.\n"
      "Launch multi-rank commands with mpirun or srun, e.g.\n"
      "  mpirun -np 4 strata bench allreduce --transport tcp\n"
      "Environment overrides (STRATA_*) are listed by `strata info --env`."};
  app.set_version_flag("--version", std::string("strata ") + STRATA_VERSION);
  app.require_subcommand(1);
  std::vector<strata::launcher::Command> commands;
  strata::launcher::AddInfoCommand(app, commands);
  strata::launcher::AddShardCommand(app, commands);
  strata::launcher::AddInferCommand(app, commands);
  strata::launcher::AddTrainCommand(app, commands);
  strata::launcher::AddSnapshotdCommand(app, commands);
  strata::launcher::AddChaosCommand(app, commands);
  strata::launcher::AddBenchCommands(app, commands);

  CLI11_PARSE(app, argc, argv);
  int rc = 2;
  for (const auto& c : commands) {
    if (c.app->parsed()) {
      rc = c.run();
      break;
    }
  }
  if (strata::comm::mpi::IsInitialized()) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  return rc;
}
