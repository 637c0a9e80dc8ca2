// Leveled logging with subsystem masks, in the spirit of NCCL's NCCL_DEBUG/NCCL_DEBUG_SUBSYS.
//
//   STRATA_LOG(INFO, COMM, "connected to {} peers", n);
//
// Levels: TRACE DEBUG INFO WARN ERROR. Subsystems: BASE KERNELS COMM MEM CKPT KV TRAIN INFER LAUNCH
// BENCH. The arguments are formatted only when the level and subsystem are enabled, so a disabled
// log line costs two relaxed atomic loads.
//
// The initial level and mask come from STRATA_LOG_LEVEL (trace|debug|info|warn|error|off, default
// warn) and STRATA_LOG_SUBSYS (comma list of subsystem names, case-insensitive, or "all"; default
// all), read on first use. A malformed value prints one warning and falls back to the default:
// a typo in a logging knob should never stop a job.
//
// Output goes to stderr through one spdlog logger, one line per message:
//   I1122 02:57:00.123456 4242 [r3] COMM tcp.cc:88] connected to 7 peers
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "base/status.h"

namespace strata {

enum class LogLevel { kTrace, kDebug, kInfo, kWarn, kError, kOff };

enum class Subsys : uint32_t {
  kBase = 1,
  kKernels = 2,
  kComm = 4,
  kMem = 8,
  kCkpt = 16,
  kKv = 32,
  kTrain = 64,
  kInfer = 128,
  kLaunch = 256,
  kBench = 512,
};

// Every subsystem bit.
inline constexpr uint32_t kAllSubsys = 1023;

// "BASE", "KERNELS", "COMM", "MEM", "CKPT", "KV", "TRAIN", "INFER", "LAUNCH", "BENCH".
const char* SubsysName(Subsys subsys);
// "trace", "debug", "info", "warn", "error", "off".
const char* LogLevelName(LogLevel level);

// Parses a STRATA_LOG_LEVEL value (case-insensitive); the error lists the valid names.
StatusOr<LogLevel> ParseLogLevel(std::string_view text);
// Parses a STRATA_LOG_SUBSYS value into a mask: "all" or a comma list of subsystem names.
StatusOr<uint32_t> ParseLogMask(std::string_view text);

// True when a message at `level` for `subsys` would be printed. Reads cached atomics; the first
// call anywhere reads the environment.
bool LogEnabled(LogLevel level, Subsys subsys);

// These override the environment. A rank < 0 removes the "[rN]" prefix.
void SetLogLevel(LogLevel level);
void SetLogMask(uint32_t mask);
void SetLogRank(int rank);
LogLevel GetLogLevel();
uint32_t GetLogMask();

// (Re)reads STRATA_LOG_LEVEL and STRATA_LOG_SUBSYS, replacing any Set* call made before. Happens
// by itself on first use; exposed for tests and for code that changes the environment on purpose.
void LoadLogSettingsFromEnv();

// Prints `msg` if LogEnabled(level, subsys). Prefer STRATA_LOG, which skips the formatting too.
void LogMessage(LogLevel level, Subsys subsys, const char* file, int line, std::string msg);

namespace log_internal {
inline constexpr LogLevel kLevelTRACE = LogLevel::kTrace;
inline constexpr LogLevel kLevelDEBUG = LogLevel::kDebug;
inline constexpr LogLevel kLevelINFO = LogLevel::kInfo;
inline constexpr LogLevel kLevelWARN = LogLevel::kWarn;
inline constexpr LogLevel kLevelERROR = LogLevel::kError;
inline constexpr Subsys kSubsysBASE = Subsys::kBase;
inline constexpr Subsys kSubsysKERNELS = Subsys::kKernels;
inline constexpr Subsys kSubsysCOMM = Subsys::kComm;
inline constexpr Subsys kSubsysMEM = Subsys::kMem;
inline constexpr Subsys kSubsysCKPT = Subsys::kCkpt;
inline constexpr Subsys kSubsysKV = Subsys::kKv;
inline constexpr Subsys kSubsysTRAIN = Subsys::kTrain;
inline constexpr Subsys kSubsysINFER = Subsys::kInfer;
inline constexpr Subsys kSubsysLAUNCH = Subsys::kLaunch;
inline constexpr Subsys kSubsysBENCH = Subsys::kBench;
}  // namespace log_internal

}  // namespace strata

template <>
struct fmt::formatter<strata::LogLevel> : fmt::formatter<std::string_view> {
  auto format(strata::LogLevel level, fmt::format_context& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(strata::LogLevelName(level), ctx);
  }
};

#define STRATA_LOG(level, subsys, ...)                                                  \
  do {                                                                                  \
    if (::strata::LogEnabled(::strata::log_internal::kLevel##level,                     \
                             ::strata::log_internal::kSubsys##subsys)) {                \
      ::strata::LogMessage(::strata::log_internal::kLevel##level,                       \
                           ::strata::log_internal::kSubsys##subsys, __FILE__, __LINE__, \
                           ::fmt::format(__VA_ARGS__));                                 \
    }                                                                                   \
  } while (0)
