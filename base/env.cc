#include "base/env.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <iterator>
#include <optional>
#include <system_error>

#include "base/logging.h"

namespace strata {
namespace {

// Keep sorted by name (checked below); the lookup is a binary search.
constexpr EnvVar kEnvVars[] = {
    {"STRATA_ALLREDUCE_TABLE", "",
     "Path to a `strata bench allreduce --json` result that algorithm=auto uses to pick an "
     "allreduce algorithm per message size; empty = the built-in table."},
    {"STRATA_COMM_SPIN_MS", "50",
     "How long the mpi transport polls a pending operation without pause; a longer wait polls "
     "with sleeps of up to 250 us between, so ranks blocked on a slow peer (a node rebuilding its "
     "snapshot, a straggler) leave the CPUs to it. 0 = sleep from the start."},
    {"STRATA_COMM_TIMEOUT_MS", "30000",
     "Milliseconds a collective or point-to-point operation may take; one that cannot complete "
     "in this time returns DEADLINE_EXCEEDED."},
    {"STRATA_CUDA_PLUGIN", "",
     "Path of the CUDA device plugin (libstrata_cuda.so) that --device cuda loads; empty = the "
     "one this build made."},
    {"STRATA_LINK_DELAY_US", "0",
     "EMULATED one-way delay in microseconds that the tcp transport adds to every message; "
     "results measured with it are reported as emulated."},
    {"STRATA_LOG_LEVEL", "warn", "Lowest log level printed: trace, debug, info, warn, error, off."},
    {"STRATA_LOG_SUBSYS", "all",
     "Comma-separated subsystems to log (base, kernels, comm, mem, ckpt, kv, train, infer, "
     "launch, bench; case-insensitive) or all."},
    {"STRATA_NUM_THREADS", "0",
     "Threads in the default CPU thread pool, the calling thread included; 0 = the CPUs this "
     "process may run on (its affinity mask; strata infer/train: the rank's share of them)."},
    {"STRATA_POOL_SPIN_US", "100",
     "How long an idle thread-pool worker (and a caller waiting for its workers) polls before "
     "it blocks; waking a blocked thread costs tens of microseconds per parallel step. "
     "0 = always block."},
    {"STRATA_SEGMENT_BYTES", "262144",
     "Collectives cut messages into segments of this many bytes."},
    {"STRATA_SNAPSHOTD_PEER_TIMEOUT_S", "30",
     "Seconds a snapshotd started by strata train gives one exchange with another node's "
     "snapshotd (and retries an unreachable one) before that version counts as unable to commit "
     "across the group; training then goes on with snapshots on each node only until the group "
     "answers again."},
    {"STRATA_SNAPSHOTD_RPC_TIMEOUT_S", "30",
     "Seconds strata train waits for its snapshotd to answer one request; past it the snapshotd "
     "counts as hung and is killed and replaced (it recovers its versions from shared memory)."},
    {"STRATA_STAR_HUB", "0", "Default hub rank of the star allreduce."},
    {"STRATA_TCP_IFNAME", "auto",
     "Interface whose IPv4 address the tcp transport listens on; auto = loopback when all ranks "
     "share a node, else the first non-loopback interface that is up."},
    {"STRATA_TCP_SPIN_US", "50",
     "How long the tcp transport polls without sleeping (yielding the core) before it blocks in "
     "ppoll; waking from a blocking poll costs tens of microseconds per hop. 0 = always block."},
};

constexpr bool SortedAndUnique() {
  for (size_t i = 1; i < std::size(kEnvVars); ++i) {
    if (!(std::string_view(kEnvVars[i - 1].name) < std::string_view(kEnvVars[i].name))) {
      return false;
    }
  }
  return true;
}
static_assert(SortedAndUnique(), "kEnvVars must be sorted by name without duplicates");

const EnvVar& Registered(std::string_view name) {
  const EnvVar* var = FindEnvVar(name);
  STRATA_CHECK_MSG(var != nullptr, "environment variable {} is not registered in base/env.cc",
                   name);
  return *var;
}

// The user's value, or nullptr when unset or empty.
const char* UserValue(const EnvVar& var) {
  const char* value = std::getenv(var.name);
  return (value != nullptr && value[0] != '\0') ? value : nullptr;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Parses the user's value, or the default when there is none. A default that does not parse is a
// bug in the table, so it is checked rather than reported.
template <class T, class Parse>
StatusOr<T> ParseEnv(std::string_view name, const char* what, Parse parse) {
  const EnvVar& var = Registered(name);
  const char* user = UserValue(var);
  if (user == nullptr) {
    std::optional<T> parsed = parse(Trim(var.default_value));
    STRATA_CHECK_MSG(parsed.has_value(), "default of {} ('{}') is not {}", var.name,
                     var.default_value, what);
    return *parsed;
  }
  std::optional<T> parsed = parse(Trim(user));
  if (!parsed.has_value()) {
    return Status::InvalidArgument(fmt::format("{}='{}' is not {}", var.name, user, what));
  }
  return *parsed;
}

template <class T>
std::optional<T> FromChars(std::string_view s) {
  // from_chars rejects a leading '+', which people do write.
  if (s.size() > 1 && s.front() == '+' && s[1] != '-') s.remove_prefix(1);
  T value{};
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return value;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) ==
           std::tolower(static_cast<unsigned char>(y));
  });
}

std::optional<bool> ParseBool(std::string_view s) {
  for (std::string_view t : {"1", "true", "yes", "on"}) {
    if (EqualsIgnoreCase(s, t)) return true;
  }
  for (std::string_view f : {"0", "false", "no", "off"}) {
    if (EqualsIgnoreCase(s, f)) return false;
  }
  return std::nullopt;
}

}  // namespace

std::span<const EnvVar> AllEnvVars() { return kEnvVars; }

const EnvVar* FindEnvVar(std::string_view name) {
  auto it = std::lower_bound(
      std::begin(kEnvVars), std::end(kEnvVars), name,
      [](const EnvVar& v, std::string_view n) { return std::string_view(v.name) < n; });
  if (it == std::end(kEnvVars) || std::string_view(it->name) != name) return nullptr;
  return &*it;
}

std::string EnvString(std::string_view name) {
  const EnvVar& var = Registered(name);
  const char* user = UserValue(var);
  return user != nullptr ? user : var.default_value;
}

StatusOr<int64_t> EnvInt(std::string_view name) {
  return ParseEnv<int64_t>(name, "an integer", FromChars<int64_t>);
}

int64_t EnvIntInRange(std::string_view name, int64_t lo, int64_t hi) {
  const EnvVar& var = Registered(name);
  const std::optional<int64_t> fallback = FromChars<int64_t>(Trim(var.default_value));
  STRATA_CHECK_MSG(fallback.has_value() && *fallback >= lo && *fallback <= hi,
                   "default of {} ('{}') is not an integer in [{}, {}]", var.name,
                   var.default_value, lo, hi);
  StatusOr<int64_t> v = EnvInt(name);
  if (v.ok() && *v >= lo && *v <= hi) return *v;
  STRATA_LOG(WARN, BASE, "ignoring {}: {}; using {}", var.name,
             v.ok() ? fmt::format("{} is out of range [{}, {}]", *v, lo, hi)
                    : v.status().message(),
             *fallback);
  return *fallback;
}

StatusOr<double> EnvDouble(std::string_view name) {
  return ParseEnv<double>(name, "a number", FromChars<double>);
}

StatusOr<bool> EnvBool(std::string_view name) {
  return ParseEnv<bool>(name, "a boolean (1/0/true/false/yes/no/on/off)", ParseBool);
}

bool EnvIsSet(std::string_view name) { return UserValue(Registered(name)) != nullptr; }

}  // namespace strata
