// strata shard files: one per tensor-parallel rank, written by `strata shard`, streamed by
// `strata infer`. Layout (see proto/shard.proto): a 4 KiB header page, resident tensors, one
// 4 KiB-aligned block per half layer in compute order, then the Protobuf manifest.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "proto/shard.pb.h"

namespace strata::runtime {

class HfModel;

// 2: q8_0 matrices are stored row by row as values then scales (kernels/quant.h); version 1 had
// ggml's interleaved blocks. A version-1 folder is refused with a request to re-shard.
inline constexpr uint32_t kShardFormatVersion = 2;
inline constexpr uint64_t kShardAlign = 4096;
// Blocks start on 2 MiB boundaries (the padding is a hole in the file, no disk): a reader that
// maps the file 2 MiB-aligned can then map each block with transparent huge pages and drop it
// again in whole huge pages (memory/weight_window.h). Readers accept any 4 KiB-aligned block.
inline constexpr uint64_t kShardBlockAlign = 2ull << 20;

// The folder `strata shard` writes: rank-<r>.shard for every rank, plus config.json,
// tokenizer.model (when the model has one) and plan.txt (the split, for people).
std::string ShardPath(const std::string& dir, int rank);

struct ShardWriteOptions {
  // Matrices are stored as "f32", "bf16" or "q8_0"; norms always stay f32.
  std::string weight_dtype = "f32";
  // Called after each tensor written, with (tensors done, tensors total).
  std::function<void(int64_t, int64_t)> progress;
};

// Writes the shard folder for `slices.size()` ranks. Output goes to a temporary sibling folder
// that is renamed to `out_dir` only when every file is complete and fsynced; on any error the
// temporary folder is removed, so no partial shard folder is ever left. `out_dir` must not exist.
Status WriteShardFolder(const HfModel& model, const std::vector<proto::RankSlice>& slices,
                        const std::vector<double>& ratios, const std::string& out_dir,
                        const ShardWriteOptions& options);

// A shard file opened for reading: header and manifest validated (magic, version, bounds,
// manifest checksum; every tensor and block inside the file).
class ShardFile {
 public:
  static StatusOr<std::unique_ptr<ShardFile>> Open(const std::string& path);
  const proto::ShardManifest& manifest() const { return manifest_; }
  const std::string& path() const { return path_; }
  uint64_t file_size() const { return file_size_; }
  // Reads a tensor's bytes (pread) and checks its CRC-32C.
  StatusOr<std::vector<uint8_t>> ReadTensor(const proto::TensorEntry& entry) const;
  // Checks every tensor's CRC-32C (reads the whole file).
  Status VerifyChecksums() const;

 private:
  std::string path_;
  uint64_t file_size_ = 0;
  proto::ShardManifest manifest_;
};

}  // namespace strata::runtime
