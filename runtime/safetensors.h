// Reading and writing the safetensors format: an 8-byte little-endian header length N, N bytes of
// JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {...}}), then
// the raw little-endian tensor bytes ("the data section"). Files are mmapped read-only, so opening
// a multi-gigabyte checkpoint costs a header parse, not a copy.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/dtype.h"
#include "base/status.h"

namespace strata::runtime {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // from the start of the file's data section
  uint64_t bytes = 0;

  int64_t numel() const;
};

// "[4096, 11008]".
std::string ShapeString(const std::vector<int64_t>& shape);

// safetensors dtype names ("F32", "BF16", ...) for the dtypes strata has; unknown names fail with
// InvalidArgument.
const char* SafetensorsDTypeName(DType dtype);
StatusOr<DType> ParseSafetensorsDType(std::string_view name);

// One .safetensors file, mmapped read-only.
//
// Open validates everything a reader relies on, so later code can index the mapping blindly:
// the header length lies within the file (else DataLoss: the file is truncated); the header is a
// JSON object (else Corruption); every tensor has a known dtype (else InvalidArgument naming the
// tensor and the dtype), a shape of non-negative dims, data_offsets [begin, end) inside the data
// section (else DataLoss), end - begin == product(shape) * dtype size (else Corruption), and no
// two tensors overlap (else Corruption naming both). "__metadata__" is kept as string pairs.
// Every error message names the file and, where there is one, the tensor.
class SafetensorsFile {
 public:
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // In header order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  // Pointer into the mapping; valid while this object lives. Only as aligned as the file makes it.
  const uint8_t* data(const TensorInfo& info) const;
  // Absolute file offset of the data section (for pread-based streaming).
  uint64_t data_section_offset() const { return data_offset_; }
  uint64_t file_size() const { return file_size_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;
  Status Parse();

  std::string path_;
  const uint8_t* map_ = nullptr;
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes a safetensors file: tensors in the given order, packed back to back, the header padded
// with spaces to a multiple of 8 bytes so every tensor starts 8-byte aligned when the data is.
// `TensorInfo::offset` is ignored (the writer assigns offsets); `bytes` must equal numel * dtype
// size. Written to a temporary next to `path`, fsynced, then renamed over it, so a reader never
// sees half a file.
Status WriteSafetensors(const std::string& path,
                        const std::vector<std::pair<TensorInfo, const void*>>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace strata::runtime
