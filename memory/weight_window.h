// Sliding-window weight scheduler for tensor-parallel inference on memory-poor machines.
//
// A rank's shard file holds its weights as "blocks" (half a layer: attention or FFN), each at a
// 4 KiB-aligned offset. Compute walks blocks 0..B-1 for every token and wraps to 0 for the next
// one. A WeightWindow keeps at most W of them in memory and has a loader thread bring in the
// next ones while the current block computes and its partial sums are allreduced:
//
//   auto win = WeightWindow::Open(path, blocks, {.mode = WindowMode::kAuto, .window = 2});
//   for (token...) for (int i = 0; i < B; ++i) {
//     STRATA_ASSIGN_OR_RETURN(const uint8_t* w, (*win)->Acquire(i));  // waits only if not in yet
//     ... compute with w, allreduce ...
//     (*win)->Release(i);  // lets the loader reuse the slot for block i+W (mod B)
//   }
//
// Norms and other small tensors are not blocks: the caller keeps them resident itself.
//
// Modes:
//  - kResident (also what window == 0 selects): the whole file is mmapped once, nothing is ever
//    released. Fastest when memory is plentiful.
//  - kCopy: W preallocated 4 KiB-aligned slots; the loader preads blocks into them (optionally
//    with O_DIRECT, so the page cache does not grow with the model either).
//  - kMap: zero-copy. The file is mmapped; the loader prefaults (MADV_WILLNEED +
//    MADV_POPULATE_READ) up to W blocks ahead and Release drops the block's pages from the
//    mapping (MADV_DONTNEED). When the file already sits in the page cache this avoids copying
//    every block every token, which would double memory traffic.
//  - kAuto: kMap if most of the blocks' pages are in the page cache (mincore), else kCopy.
//
// Thread model: one compute thread calls Acquire/Release (in block order); the loader thread is
// private. stats(), mode() and resident_bytes() may be called from any thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"

namespace strata::memory {

// One block of a shard file: absolute file offset (a multiple of kBlockAlignment) and length.
struct BlockExtent {
  uint64_t offset;
  uint64_t bytes;
};

// Offsets of blocks and sizes of slots are multiples of this (the shard-file format aligns
// blocks to 4 KiB, which is also what O_DIRECT needs on common devices).
inline constexpr uint64_t kBlockAlignment = 4096;
// Mappings are placed at this alignment (the x86-64 PMD size) so blocks that start on it can be
// mapped with transparent huge pages.
inline constexpr uint64_t kHugeAlignment = 2ull << 20;

enum class WindowMode {
  kResident,  // window 0: the whole file mmapped, nothing ever released
  kCopy,      // W aligned slots filled by pread ahead of compute (O_DIRECT optional)
  kMap,       // zero-copy: mmap; prefault up to W blocks ahead; drop pages on Release
  kAuto,      // kMap if the file is (mostly) in page cache, else kCopy
};

// "resident", "copy", "map", "auto".
const char* WindowModeName(WindowMode mode);
// Inverse of WindowModeName (case-insensitive), for --window-mode flags.
StatusOr<WindowMode> ParseWindowMode(std::string_view text);

struct WindowOptions {
  // Which strategy; kAuto decides at Open from the page-cache state of the file.
  WindowMode mode = WindowMode::kAuto;
  // W: slots (kCopy) or blocks prefaulted ahead (kMap). 0 selects kResident whatever `mode` says.
  int window = 2;
  // kCopy only: read with O_DIRECT, bypassing the page cache so memory stays bounded on small
  // machines. If the filesystem refuses O_DIRECT, Open logs a warning naming the file and falls
  // back to buffered reads (stats().direct_io tells which one ran). With kAuto it forces kCopy.
  bool direct_io = false;
  // kCopy only: mlock the slots so they are never swapped out. A failure (RLIMIT_MEMLOCK) is
  // logged and ignored.
  bool lock_slots = false;
  // kResident only: MAP_POPULATE, reading the whole file at Open instead of on first touch.
  bool populate = false;
  // kAuto picks kMap when at least this fraction of the blocks' pages is in the page cache.
  double auto_cached_fraction = 0.9;
  // kMap with W >= 4: prefault and drop two blocks per madvise call when the largest block has
  // at least this many bytes. Measured on a 2-core Zen 5 VM (BENCHMARKS.md section 16): 1 x 2
  // f32 (138 MB blocks) decoded 3% faster in 6 of 6 pairs of runs; 1 x 2 q8_0 (37 MB blocks)
  // 2% slower in 8 of 10, so smaller blocks keep one call per block.
  uint64_t pair_min_block_bytes = 100ull << 20;
};

struct WindowStats {
  int64_t wait_ns = 0;        // total time Acquire blocked waiting for the loader
  int64_t bytes_read = 0;     // sum of the sizes of the blocks loaded (read or prefaulted)
  int64_t blocks_loaded = 0;  // blocks the loader brought in (with B <= W: B, once)
  WindowMode mode = WindowMode::kCopy;  // the mode actually running (never kAuto)
  int max_in_flight = 0;                // most blocks ever loaded-but-not-released at once (<= W)
  bool direct_io = false;               // kCopy reads really use O_DIRECT
  // kMap with the file in page cache: blocks Acquire found not yet prefaulted and handed out
  // anyway (compute faults them in from the page cache itself) instead of waiting for a loader
  // that a busy machine has not scheduled.
  int64_t blocks_self_loaded = 0;
  // kMap with W >= 4: blocks the loader prefaulted together with the next one, as one range
  // (and whose pages it drops with the next one's, in one MADV_DONTNEED). Per-call costs (mmap
  // lock, page-table walk set-up, a TLB shootdown per DONTNEED) then come once per pair.
  int64_t blocks_paired = 0;
};

// kMap: for each block, the byte range [begin, end) of the file whose pages Release drops from
// the mapping: the pages that lie within the block and touch no other block, so releasing one
// block never takes pages from another (page sizes above 4 KiB can put two blocks on one page).
// begin == end when there is no such page. Exposed for tests.
std::vector<std::pair<uint64_t, uint64_t>> MapDropRanges(const std::vector<BlockExtent>& blocks,
                                                         uint64_t page_size);
// kMap with W >= 4: for each k < B - 1, the range Release drops when blocks k and k + 1 go
// together: MapDropRanges' rule applied to the two as one extent. Empty (begin == end == 0)
// when they cannot go together: k + 1 does not follow k in the file, or another block lies
// between them. Exposed for tests.
std::vector<std::pair<uint64_t, uint64_t>> MapPairDropRanges(
    const std::vector<BlockExtent>& blocks, uint64_t page_size);

// Fraction of `samples` pages, spread evenly over the blocks' pages, found in the page cache, by
// RWF_NOWAIT reads of one byte (which only the page cache can serve). kAuto uses it when it may not
// write the file, because mincore then no longer reports the page cache (Linux >= 5.0).
StatusOr<double> SampleCachedFraction(int fd, const std::vector<BlockExtent>& blocks, int samples);

class WeightWindow {
 public:
  // `blocks` in compute order. Slot size = largest block rounded up to 4 KiB. Validates the
  // extents (aligned offsets, non-empty) and checks them against the file size: a block past the
  // end of the file is DataLoss naming the block and the file.
  static StatusOr<std::unique_ptr<WeightWindow>> Open(const std::string& path,
                                                      std::vector<BlockExtent> blocks,
                                                      const WindowOptions& opts);
  // Stops and joins the loader (it finishes at most the chunk it is reading). Pointers returned
  // by Acquire die with the window.
  ~WeightWindow();

  WeightWindow(const WeightWindow&) = delete;
  WeightWindow& operator=(const WeightWindow&) = delete;

  // Blocks until block i is in memory and returns its bytes (valid until Release(i)). Calls must
  // follow compute order: i is the next expected index (0..B-1, then 0 again for the next token),
  // anything else is FailedPrecondition, as is acquiring while already holding W blocks (which
  // could never be satisfied). A load error (I/O error, file truncated since Open) is returned
  // here for the block it hit and every later one; blocks loaded before it stay valid.
  StatusOr<const uint8_t*> Acquire(int i);
  // Done with block i (must be held; releases may come in any order). Its slot can be refilled
  // with block i+W (mod B). With B <= W nothing is ever evicted.
  void Release(int i);

  WindowStats stats() const;
  WindowMode mode() const { return mode_; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  // Memory the window itself holds, for RSS accounting: the slots (kCopy), the prefaulted blocks
  // not yet released (kMap), the mapped blocks (kResident).
  uint64_t resident_bytes() const;
  // The most the window can hold at once: W slots of the largest block (every block when
  // resident or when they all fit). What a memory budget must leave room for.
  uint64_t budget_bytes() const;
  // kResident: the share of the mapping's resident pages that the page tables map 2 MiB at a
  // time (FilePmdMapped / Rss in /proc/self/smaps, read now: call it after compute has touched
  // the weights). Decode reads faster the closer it is to 1; it is low when the page cache holds
  // the file in small folios (see runtime/shard_file.cc Finish). -1 in other modes or unknown.
  double huge_mapped_fraction() const;

 private:
  struct Held {
    uint64_t seq;
    bool released;
  };

  WeightWindow() = default;
  Status Init(const std::string& path, std::vector<BlockExtent> blocks, const WindowOptions& opts);
  void LoaderMain();
  Status LoadSeq(uint64_t seq);
  Status ReadBlock(int block, uint8_t* dst);
  Status FaultInBlock(int block);
  // kMap: prefaults blocks [block, block + count) (count 1, or 2 for a pair) as one range.
  Status FaultInBlocks(int block, int count);
  // Pairing is on and `block` may go with block + 1 (pair_ and pair_drop_ranges_ are fixed at
  // Init, so any thread may ask).
  bool Pairable(uint64_t block) const;
  // How many blocks the loader should load now, from loaded_ on (0: wait); caller holds mu_.
  int LoadCountLocked() const;
  // kMap: drops the pages of released blocks, a pair at a time where it can.
  void DropBlocks(std::vector<int>& drops);
  Status CheckStillInFile(int block) const;
  // Fraction of the blocks' pages in the page cache (kAuto).
  StatusOr<double> CachedFraction() const;
  // Smallest sequence number not yet released; caller holds mu_.
  uint64_t FrontierLocked() const;
  bool CanLoadLocked(uint64_t seq) const;

  std::string path_;
  std::vector<BlockExtent> blocks_;
  std::vector<std::pair<uint64_t, uint64_t>> drop_ranges_;  // kMap: [begin, end) to DONTNEED
  std::vector<int> pending_drops_;  // kMap: released blocks the loader has yet to drop (mu_)
  // kMap, W >= 4: load and drop blocks two at a time (see WindowStats::blocks_paired).
  bool pair_ = false;
  std::vector<std::pair<uint64_t, uint64_t>> pair_drop_ranges_;  // MapPairDropRanges
  WindowMode mode_ = WindowMode::kCopy;
  int window_ = 0;        // effective W = min(opts.window, B)
  bool all_fit_ = false;  // B <= W: load each block once, keep it
  int fd_ = -1;
  int direct_fd_ = -1;  // O_DIRECT descriptor, -1 when not used
  uint64_t file_size_ = 0;
  uint64_t slot_bytes_ = 0;
  std::vector<AlignedBuffer> slots_;
  bool slots_locked_ = false;
  uint8_t* map_ = nullptr;  // kMap/kResident: the whole file
  uint64_t map_bytes_ = 0;
  bool huge_hint_ = false;  // the kernel accepted MADV_HUGEPAGE on map_
  bool map_cached_ = false; // kMap and the blocks were in page cache at Open

  mutable std::mutex mu_;
  std::condition_variable loader_cv_;    // loader waits for a free slot or stop
  std::condition_variable consumer_cv_;  // Acquire waits for its block or an error
  bool stop_ = false;
  uint64_t loaded_ = 0;       // sequences [0, loaded_) are (or were) loaded
  uint64_t acquire_seq_ = 0;  // next sequence Acquire expects
  std::deque<Held> held_;     // acquired, in acquire order; released ones popped from the front
  Status error_;              // sticky loader error ...
  uint64_t error_seq_ = UINT64_MAX;  // ... for this sequence and every later one
  uint64_t in_flight_bytes_ = 0;
  WindowStats stats_;
  std::thread loader_;
};

}  // namespace strata::memory
