// The host parameter store of RAM-centric training: host memory, not the compute device, is where
// parameters live. One contiguous, 64-byte-aligned arena holds, in the same layout,
//
//   weights  [total]   fp32 master weights (every rank holds all of them)
//   grads    [total]   fp32 gradients of the current step
//   m, v     [slice]   AdamW moments, only for the slice of the layout this rank owns
//
// A ParamLayout maps names to (offset, shape); offsets are multiples of 16 floats (64 bytes) and
// the total is padded to a multiple of 16 * ranks floats, so every data-parallel rank owns an
// equal, aligned, contiguous slice [begin, end) of the flat arena (the unit a reduce-scatter and
// an all-gather move). A rank therefore keeps 8 + 8 / ranks bytes per parameter.
//
// The arena is anonymous memory or, with `shm_name`, a POSIX shared-memory object, so a separate
// process (the snapshot manager) can map the same pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace strata::memory {

struct ParamEntry {
  std::string name;
  std::vector<int64_t> shape;
  size_t offset = 0;  // in floats from the start of a region
  size_t numel = 0;
  bool decay = true;  // AdamW weight decay applies (matrices yes, norm gains no)
};

class ParamLayout {
 public:
  // Appends a tensor; InvalidArgument on a duplicate name or a non-positive dimension.
  Status Add(std::string name, std::vector<int64_t> shape, bool decay = true);
  // Pads the total to a multiple of 16 * ranks floats. Call once, after the last Add.
  void Finalize(int ranks);

  const std::vector<ParamEntry>& entries() const { return entries_; }
  const ParamEntry* Find(std::string_view name) const;
  size_t total() const { return total_; }        // floats, padded
  size_t num_params() const { return params_; }  // floats that are real parameters
  int ranks() const { return ranks_; }
  // The slice of [0, total()) that `rank` owns: equal sizes, multiples of 16 floats.
  size_t slice_begin(int rank) const { return slice_ * static_cast<size_t>(rank); }
  size_t slice_size() const { return slice_; }

 private:
  std::vector<ParamEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
  size_t total_ = 0;
  size_t params_ = 0;
  size_t slice_ = 0;
  int ranks_ = 0;
};

struct ParamStoreOptions {
  int rank = 0;  // which slice's moments this store holds
  // Non-empty: the arena is the POSIX shared-memory object "/<shm_name>" (created exclusively,
  // unlinked when the store is destroyed unless keep_shm). Empty: anonymous memory.
  std::string shm_name;
  bool keep_shm = false;
};

class ParamStore {
 public:
  // The layout must be finalized. Memory is zeroed (fresh pages). ResourceExhausted when the
  // arena cannot be mapped, naming the bytes it needed; AlreadyExists when the shm name is taken.
  static StatusOr<std::unique_ptr<ParamStore>> Create(ParamLayout layout,
                                                      const ParamStoreOptions& options = {});
  ~ParamStore();
  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;

  const ParamLayout& layout() const { return layout_; }
  float* weights() { return weights_; }
  float* grads() { return grads_; }
  float* moment1() { return m_; }  // [slice_size()], for floats slice_begin() + i
  float* moment2() { return v_; }
  const float* weights() const { return weights_; }
  const float* grads() const { return grads_; }

  float* weight(const ParamEntry& e) { return weights_ + e.offset; }
  float* grad(const ParamEntry& e) { return grads_ + e.offset; }
  // CHECK-fails on an unknown name (a programming error: names come from the layout).
  float* weight(std::string_view name);
  float* grad(std::string_view name);

  size_t slice_begin() const { return layout_.slice_begin(rank_); }
  size_t slice_size() const { return layout_.slice_size(); }
  int rank() const { return rank_; }
  size_t arena_bytes() const { return bytes_; }
  // Bytes of each region, for the memory report.
  size_t weights_bytes() const { return layout_.total() * sizeof(float); }
  size_t moments_bytes() const { return 2 * layout_.slice_size() * sizeof(float); }
  const std::string& shm_name() const { return shm_name_; }

 private:
  ParamStore() = default;
  ParamLayout layout_;
  int rank_ = 0;
  void* arena_ = nullptr;
  size_t bytes_ = 0;
  std::string shm_name_;
  bool unlink_ = false;
  float* weights_ = nullptr;
  float* grads_ = nullptr;
  float* m_ = nullptr;
  float* v_ = nullptr;
};

}  // namespace strata::memory
