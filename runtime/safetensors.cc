#include "runtime/safetensors.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "runtime/file_util.h"

namespace strata::runtime {
namespace {

using Json = nlohmann::ordered_json;

// A header this large is not a tensor index; refusing it keeps a corrupt length from making us
// allocate gigabytes. The reference implementation uses the same 100 MB cap.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeNameEntry {
  const char* name;
  DType dtype;
};
constexpr DTypeNameEntry kDTypeNames[] = {
    {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16},
    {"I8", DType::kI8},   {"I32", DType::kI32}, {"I64", DType::kI64},
};

std::string JsonTypeName(const Json& j) { return j.type_name(); }

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

const char* SafetensorsDTypeName(DType dtype) {
  for (const auto& e : kDTypeNames) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

StatusOr<DType> ParseSafetensorsDType(std::string_view name) {
  for (const auto& e : kDTypeNames) {
    if (name == e.name) return e.dtype;
  }
  return Status::InvalidArgument(
      fmt::format("unsupported dtype '{}' (supported: F32, F16, BF16, I8, I32, I64)", name));
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(const_cast<uint8_t*>(map_), file_size_);
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(fmt::format("safetensors: open {}", path), errno);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus(fmt::format("safetensors: stat {}", path), err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument(fmt::format("safetensors: {} is not a regular file", path));
  }
  file->file_size_ = static_cast<uint64_t>(st.st_size);
  if (file->file_size_ < 8) {
    ::close(fd);
    return Status::DataLoss(
        fmt::format("safetensors: {} is truncated: {} bytes, shorter than the 8-byte header length",
                    path, file->file_size_));
  }
  void* map = mmap(nullptr, file->file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED) return ErrnoStatus(fmt::format("safetensors: mmap {}", path), err);
  file->map_ = static_cast<const uint8_t*>(map);
  STRATA_RETURN_IF_ERROR(file->Parse().WithContext(fmt::format("safetensors file {}", path)));
  return file;
}

Status SafetensorsFile::Parse() {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_[i];
  if (header_len > kMaxHeaderBytes) {
    return Status::Corruption(
        fmt::format("header length {} is larger than the {} byte limit (not a safetensors file?)",
                    header_len, kMaxHeaderBytes));
  }
  if (header_len > file_size_ - 8) {
    return Status::DataLoss(
        fmt::format("truncated: header length {} runs past the end of the {}-byte file", header_len,
                    file_size_));
  }
  data_offset_ = 8 + header_len;
  const uint64_t data_size = file_size_ - data_offset_;
  const char* header = reinterpret_cast<const char*>(map_ + 8);

  Json root;
  try {
    root = Json::parse(header, header + header_len);
  } catch (const Json::exception& e) {
    return Status::Corruption(fmt::format("header is not valid JSON: {}", e.what()));
  }
  if (!root.is_object()) {
    return Status::Corruption(
        fmt::format("header is a JSON {}, expected an object", JsonTypeName(root)));
  }

  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const Json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return Status::Corruption("\"__metadata__\" is not a JSON object");
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return Status::Corruption(
              fmt::format("\"__metadata__\" value for '{}' is not a string", m.key()));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) {
      return Status::Corruption(fmt::format("tensor '{}': entry is not a JSON object", name));
    }
    TensorInfo info;
    info.name = name;
    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return Status::Corruption(fmt::format("tensor '{}': missing string field \"dtype\"", name));
    }
    auto dtype = ParseSafetensorsDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return dtype.status().WithContext(fmt::format("tensor '{}'", name));
    info.dtype = *dtype;

    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return Status::Corruption(fmt::format("tensor '{}': missing array field \"shape\"", name));
    }
    // numel <= data_size keeps the products below from overflowing: stop as soon as it exceeds.
    uint64_t numel = 1;
    bool too_big = false;
    for (const Json& d : *shape_it) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return Status::Corruption(
            fmt::format("tensor '{}': shape {} has an entry that is not a non-negative integer",
                        name, shape_it->dump()));
      }
      int64_t dim = d.get<int64_t>();
      info.shape.push_back(dim);
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(dim)) {
        too_big = true;
      } else {
        numel *= static_cast<uint64_t>(dim);
      }
    }

    auto off_it = entry.find("data_offsets");
    if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
        !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned()) {
      return Status::Corruption(fmt::format(
          "tensor '{}': \"data_offsets\" must be [begin, end] with non-negative integers", name));
    }
    uint64_t begin = (*off_it)[0].get<uint64_t>();
    uint64_t end = (*off_it)[1].get<uint64_t>();
    if (begin > end) {
      return Status::Corruption(
          fmt::format("tensor '{}': data_offsets [{}, {}) has begin after end", name, begin, end));
    }
    if (end > data_size) {
      return Status::DataLoss(fmt::format(
          "truncated: tensor '{}' data_offsets [{}, {}) run past the {}-byte data section", name,
          begin, end, data_size));
    }
    const uint64_t elem = DTypeSize(info.dtype);
    if (too_big || numel > data_size / elem || numel * elem != end - begin) {
      return Status::Corruption(fmt::format(
          "tensor '{}': shape {} of {} needs {} bytes but data_offsets [{}, {}) hold {}", name,
          ShapeString(info.shape), SafetensorsDTypeName(info.dtype),
          too_big ? std::string("more than 2^64") : std::to_string(numel * elem), begin, end,
          end - begin));
    }
    info.offset = begin;
    info.bytes = end - begin;
    index_[info.name] = tensors_.size();
    tensors_.push_back(std::move(info));
  }

  // Overlap check: sort by offset, each tensor must end at or before the next begins. Empty
  // tensors occupy nothing and cannot overlap.
  std::vector<const TensorInfo*> order;
  for (const auto& t : tensors_) {
    if (t.bytes > 0) order.push_back(&t);
  }
  std::sort(order.begin(), order.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < order.size(); ++i) {
    const TensorInfo* prev = order[i - 1];
    const TensorInfo* cur = order[i];
    if (cur->offset < prev->offset + prev->bytes) {
      return Status::Corruption(fmt::format("tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                                            prev->name, prev->offset, prev->offset + prev->bytes,
                                            cur->name, cur->offset, cur->offset + cur->bytes));
    }
  }
  return Status::OK();
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* SafetensorsFile::data(const TensorInfo& info) const {
  return map_ + data_offset_ + info.offset;
}

Status WriteSafetensors(const std::string& path,
                        const std::vector<std::pair<TensorInfo, const void*>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [info, data] : tensors) {
    if (info.name == "__metadata__" || header.contains(info.name)) {
      return Status::InvalidArgument(fmt::format(
          "WriteSafetensors {}: duplicate or reserved tensor name '{}'", path, info.name));
    }
    for (int64_t d : info.shape) {
      if (d < 0) {
        return Status::InvalidArgument(fmt::format("WriteSafetensors {}: tensor '{}' shape {}",
                                                   path, info.name, ShapeString(info.shape)));
      }
    }
    uint64_t want = static_cast<uint64_t>(info.numel()) * DTypeSize(info.dtype);
    if (info.bytes != want || (want > 0 && data == nullptr)) {
      return Status::InvalidArgument(fmt::format(
          "WriteSafetensors {}: tensor '{}' shape {} {} needs {} bytes, given {}", path, info.name,
          ShapeString(info.shape), SafetensorsDTypeName(info.dtype), want, info.bytes));
    }
    header[info.name] = {{"dtype", SafetensorsDTypeName(info.dtype)},
                         {"shape", info.shape},
                         {"data_offsets", {offset, offset + want}}};
    offset += want;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);

  std::vector<std::pair<const void*, size_t>> pieces;
  pieces.emplace_back(prefix.data(), prefix.size());
  pieces.emplace_back(text.data(), text.size());
  for (const auto& [info, data] : tensors) pieces.emplace_back(data, info.bytes);
  return WriteFileAtomically(path, pieces);
}

}  // namespace strata::runtime
