// `strata snapshotd`: the node-local snapshot manager (checkpoint/snapshotd.h) as a subcommand.
// Normally started for you by the trainer (checkpoint::EnsureSnapshotd); run it by hand to keep
// snapshots of a job across trainer restarts from the start, or to inspect its options.
#pragma once

#include <vector>

#include <CLI/CLI.hpp>

#include "launcher/commands.h"

namespace strata::launcher {

void AddSnapshotdCommand(CLI::App& root, std::vector<Command>& commands);

}  // namespace strata::launcher
