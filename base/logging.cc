#include "base/logging.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <memory>
#include <mutex>

#include <spdlog/logger.h>
#include <spdlog/sinks/stdout_sinks.h>

#include "base/env.h"

namespace strata {
namespace {

constexpr LogLevel kAllLevels[] = {LogLevel::kTrace, LogLevel::kDebug, LogLevel::kInfo,
                                   LogLevel::kWarn,  LogLevel::kError, LogLevel::kOff};
constexpr Subsys kAllSubsystems[] = {
    Subsys::kBase, Subsys::kKernels, Subsys::kComm,  Subsys::kMem,    Subsys::kCkpt,
    Subsys::kKv,   Subsys::kTrain,   Subsys::kInfer, Subsys::kLaunch, Subsys::kBench};

constexpr uint32_t MaskOfAll() {
  uint32_t mask = 0;
  for (Subsys s : kAllSubsystems) mask |= static_cast<uint32_t>(s);
  return mask;
}
static_assert(MaskOfAll() == kAllSubsys, "kAllSubsys must cover exactly the Subsys values");

// g_level doubles as the "settings loaded" flag: kUnloaded until the environment has been read.
constexpr int kUnloaded = -1;
std::atomic<int> g_level{kUnloaded};
std::atomic<uint32_t> g_mask{kAllSubsys};
std::atomic<int> g_rank{-1};
std::once_flag g_load_once;

void EnsureLoaded() {
  if (g_level.load(std::memory_order_acquire) == kUnloaded) [[unlikely]] {
    std::call_once(g_load_once, [] {
      // LoadLogSettingsFromEnv may already have run, called directly.
      if (g_level.load(std::memory_order_acquire) == kUnloaded) LoadLogSettingsFromEnv();
    });
  }
}

spdlog::logger& Logger() {
  // Never destroyed, so threads still logging during static destruction stay safe. The level is
  // left at trace because filtering happens in LogEnabled, against the atomics.
  static spdlog::logger* logger = [] {
    auto* l = new spdlog::logger("strata", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    l->set_pattern("%L%m%d %H:%M:%S.%f %t %v");
    l->set_level(spdlog::level::trace);
    return l;
  }();
  return *logger;
}

spdlog::level::level_enum ToSpdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return spdlog::level::trace;
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarn: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
    case LogLevel::kOff: return spdlog::level::off;
  }
  return spdlog::level::err;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) ==
           std::tolower(static_cast<unsigned char>(y));
  });
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Used while loading settings, so it bypasses the level and mask being loaded.
void SettingsWarning(const std::string& msg) {
  Logger().log(spdlog::level::warn, spdlog::string_view_t(fmt::format("BASE logging.cc] {}", msg)));
}

template <class T>
T LoadOrDefault(const char* var, StatusOr<T> (*parse)(std::string_view)) {
  StatusOr<T> parsed = parse(EnvString(var));
  if (parsed.ok()) return *parsed;
  const char* fallback = FindEnvVar(var)->default_value;
  SettingsWarning(fmt::format("ignoring {}: {}; using the default '{}'", var,
                              parsed.status().message(), fallback));
  StatusOr<T> default_parsed = parse(fallback);
  STRATA_CHECK_MSG(default_parsed.ok(), "default of {} does not parse: {}", var,
                   default_parsed.status());
  return *default_parsed;
}

}  // namespace

const char* SubsysName(Subsys subsys) {
  switch (subsys) {
    case Subsys::kBase: return "BASE";
    case Subsys::kKernels: return "KERNELS";
    case Subsys::kComm: return "COMM";
    case Subsys::kMem: return "MEM";
    case Subsys::kCkpt: return "CKPT";
    case Subsys::kKv: return "KV";
    case Subsys::kTrain: return "TRAIN";
    case Subsys::kInfer: return "INFER";
    case Subsys::kLaunch: return "LAUNCH";
    case Subsys::kBench: return "BENCH";
  }
  return "?";
}

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return "trace";
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
    case LogLevel::kOff: return "off";
  }
  return "?";
}

StatusOr<LogLevel> ParseLogLevel(std::string_view text) {
  std::string_view t = Trim(text);
  for (LogLevel level : kAllLevels) {
    if (EqualsIgnoreCase(t, LogLevelName(level))) return level;
  }
  return Status::InvalidArgument(
      fmt::format("unknown log level '{}' (valid: trace, debug, info, warn, error, off)", text));
}

StatusOr<uint32_t> ParseLogMask(std::string_view text) {
  uint32_t mask = 0;
  std::string_view rest = text;
  bool any = false;
  while (true) {
    size_t comma = rest.find(',');
    std::string_view item = Trim(rest.substr(0, comma));
    if (!item.empty()) {
      any = true;
      uint32_t bit = 0;
      if (EqualsIgnoreCase(item, "all")) bit = kAllSubsys;
      for (Subsys s : kAllSubsystems) {
        if (EqualsIgnoreCase(item, SubsysName(s))) bit = static_cast<uint32_t>(s);
      }
      if (bit == 0) {
        return Status::InvalidArgument(fmt::format(
            "unknown subsystem '{}' in '{}' (valid: all, base, kernels, comm, mem, ckpt, kv, "
            "train, infer, launch, bench)",
            item, text));
      }
      mask |= bit;
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  if (!any) return Status::InvalidArgument(fmt::format("no subsystem named in '{}'", text));
  return mask;
}

void LoadLogSettingsFromEnv() {
  LogLevel level = LoadOrDefault<LogLevel>("STRATA_LOG_LEVEL", ParseLogLevel);
  uint32_t mask = LoadOrDefault<uint32_t>("STRATA_LOG_SUBSYS", ParseLogMask);
  g_mask.store(mask, std::memory_order_relaxed);
  // Last, with release: a reader that sees the level also sees the mask.
  g_level.store(static_cast<int>(level), std::memory_order_release);
}

bool LogEnabled(LogLevel level, Subsys subsys) {
  EnsureLoaded();
  return level != LogLevel::kOff &&
         static_cast<int>(level) >= g_level.load(std::memory_order_relaxed) &&
         (g_mask.load(std::memory_order_relaxed) & static_cast<uint32_t>(subsys)) != 0;
}

void SetLogLevel(LogLevel level) {
  EnsureLoaded();
  g_level.store(static_cast<int>(level), std::memory_order_release);
}

void SetLogMask(uint32_t mask) {
  EnsureLoaded();
  g_mask.store(mask, std::memory_order_relaxed);
}

void SetLogRank(int rank) { g_rank.store(rank, std::memory_order_relaxed); }

LogLevel GetLogLevel() {
  EnsureLoaded();
  return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed));
}

uint32_t GetLogMask() {
  EnsureLoaded();
  return g_mask.load(std::memory_order_relaxed);
}

void LogMessage(LogLevel level, Subsys subsys, const char* file, int line, std::string msg) {
  if (!LogEnabled(level, subsys)) return;
  // The base name is enough to find the line and keeps messages short.
  std::string_view path(file);
  size_t slash = path.find_last_of('/');
  std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
  int rank = g_rank.load(std::memory_order_relaxed);
  std::string line_text =
      rank >= 0 ? fmt::format("[r{}] {} {}:{}] {}", rank, SubsysName(subsys), base, line, msg)
                : fmt::format("{} {}:{}] {}", SubsysName(subsys), base, line, msg);
  Logger().log(ToSpdlog(level), spdlog::string_view_t(line_text));
}

}  // namespace strata
