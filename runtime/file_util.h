// Small file helpers shared by the runtime's readers and writers.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"

namespace strata::runtime {

// Whole file into a string. NotFound when it does not exist.
StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes the concatenation of `pieces` to `path` through a temporary in the same folder: write,
// fsync, rename, fsync the folder — a crash leaves either the old file or the new one.
Status WriteFileAtomically(const std::string& path,
                           const std::vector<std::pair<const void*, size_t>>& pieces);

// fsync a file or a folder by path (a folder: so a rename in it is durable).
Status FsyncPath(const std::string& path);
// Writes `data` to `path` atomically (WriteFileAtomically with one piece).
inline Status WriteFileAtomic(const std::string& path, const std::string& data) {
  return WriteFileAtomically(path, {{data.data(), data.size()}});
}

}  // namespace strata::runtime
