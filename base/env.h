// The one registry of STRATA_* environment overrides. Every variable is declared, with its default
// and help text, in the table in env.cc; nothing else in the project calls getenv for STRATA_*
// names, so `AllEnvVars()` is the complete list users can set (and what `--help` can print).
//
// The getters STRATA_CHECK that `name` is registered: asking for an unregistered name is a typo
// in the code, not a user error. A variable that is unset or set to the empty string reads as its
// default. Malformed values come back as InvalidArgument so the caller can say which knob is wrong.
//
// getenv is not synchronized with setenv: read variables at start-up or from one thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "base/status.h"

namespace strata {

struct EnvVar {
  const char* name;
  const char* default_value;
  const char* help;
};

// The registry table, sorted by name.
std::span<const EnvVar> AllEnvVars();

// The registry entry for `name`, or nullptr if it is not registered.
const EnvVar* FindEnvVar(std::string_view name);

std::string EnvString(std::string_view name);
// Decimal, optional sign, surrounding blanks ignored.
// InvalidArgument "STRATA_X='abc' is not an integer".
StatusOr<int64_t> EnvInt(std::string_view name);
// For tuning knobs read once, where a typo should not stop a run: the value of `name` when it is
// an integer in [lo, hi]; otherwise a warning saying why, and the registered default.
int64_t EnvIntInRange(std::string_view name, int64_t lo, int64_t hi);
StatusOr<double> EnvDouble(std::string_view name);
// 1/0, true/false, yes/no, on/off, case-insensitive.
StatusOr<bool> EnvBool(std::string_view name);
// True when the variable is set to a non-empty value (so the default is not in effect).
bool EnvIsSet(std::string_view name);

}  // namespace strata
