// Subcommands of the `strata` binary. Each Add* registers its CLI11 subcommand and the function
// main() runs when that subcommand was chosen.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace strata::launcher {

struct Command {
  CLI::App* app;
  std::function<int()> run;  // process exit code
};

void AddInfoCommand(CLI::App& root, std::vector<Command>& commands);
void AddBenchCommands(CLI::App& root, std::vector<Command>& commands);
void AddShardCommand(CLI::App& root, std::vector<Command>& commands);
void AddInferCommand(CLI::App& root, std::vector<Command>& commands);
void AddTrainCommand(CLI::App& root, std::vector<Command>& commands);
void AddChaosCommand(CLI::App& root, std::vector<Command>& commands);

// Writes `data` to `path` as temp + fsync + rename, so a crash never leaves half a file.
bool WriteFileAtomically(const std::string& path, const std::string& data, std::string* error);

// This process's peak resident set (VmHWM) in bytes; -1 when /proc does not say.
int64_t PeakRssBytes();

}  // namespace strata::launcher
