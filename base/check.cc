#include "base/check.h"

#include <cstdio>
#include <cstdlib>

namespace strata::internal {

void CheckFailed(const char* file, int line, const char* expr, std::string_view detail) {
  // One fmt::print call so the line is not interleaved with other threads' output, and a flush
  // because abort() does not flush stdio buffers.
  fmt::print(stderr, "{}:{}: Check failed: {}{}\n", file, line, expr, detail);
  std::fflush(stderr);
  std::abort();
}

}  // namespace strata::internal
