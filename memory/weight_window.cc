#include "memory/weight_window.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>

#include "base/check.h"
#include "base/clock.h"
#include "base/logging.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and we touch pages
#endif

namespace strata::memory {
namespace {

// Large blocks are read in pieces so that a destructor waits for at most one piece.
constexpr uint64_t kReadChunk = 8ull << 20;

uint64_t RoundUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
uint64_t RoundDown(uint64_t x, uint64_t a) { return x / a * a; }

uint64_t PageSize() {
  static const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return page;
}

// Maps the whole file read-only at a kHugeAlignment-aligned address and asks for transparent
// huge pages. With file offsets and addresses congruent modulo 2 MiB, a kernel that keeps the
// file in PMD-sized page-cache folios (ext4 / xfs / tmpfs large folios, Linux 6.x, THP enabled
// or madvise) maps each 2 MiB with one entry instead of 512: prefaulting a 1.1 GiB shard then
// costs ~0.7 ms instead of ~12 ms, and decode takes fewer TLB misses. Elsewhere MADV_HUGEPAGE is
// refused or ignored and the mapping works with 4 KiB pages as before.
StatusOr<uint8_t*> MapFileHuge(int fd, uint64_t bytes, int flags, const std::string& path,
                               bool* huge) {
  const uint64_t reserve = bytes + kHugeAlignment;
  void* r = ::mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return ErrnoStatus("mmap (address reservation) for " + path, errno);
  auto* base = static_cast<uint8_t*>(r);
  uint8_t* aligned = reinterpret_cast<uint8_t*>(RoundUp(reinterpret_cast<uint64_t>(base),
                                                        kHugeAlignment));
  void* p = ::mmap(aligned, bytes, PROT_READ, flags | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::munmap(base, reserve);
    return ErrnoStatus("mmap " + path, err);
  }
  // Give back the parts of the reservation around the file mapping.
  if (aligned > base) ::munmap(base, static_cast<size_t>(aligned - base));
  const uint64_t tail_begin = RoundUp(reinterpret_cast<uint64_t>(aligned) + bytes, PageSize());
  const uint64_t tail_end = reinterpret_cast<uint64_t>(base) + reserve;
  if (tail_end > tail_begin) ::munmap(reinterpret_cast<void*>(tail_begin), tail_end - tail_begin);
  // A hint: EINVAL without THP is fine.
  *huge = ::madvise(aligned, bytes, MADV_HUGEPAGE) == 0;
  return aligned;
}

// pread until `len` bytes or EOF, retrying EINTR and partial reads. Returns bytes read.
StatusOr<uint64_t> PreadFull(int fd, uint8_t* dst, uint64_t len, uint64_t off) {
  uint64_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd, dst + got, len - got, static_cast<off_t>(off + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("pread", errno);
    }
    if (n == 0) break;  // EOF
    got += static_cast<uint64_t>(n);
  }
  return got;
}

// FilePmdMapped / Rss summed over the /proc/self/smaps entries inside [begin, begin + bytes);
// -1 when the file cannot be read or the range has no resident pages.
double PmdMappedFraction(const void* begin, uint64_t bytes) {
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (f == nullptr) return -1;
  const auto lo = reinterpret_cast<uintptr_t>(begin);
  const uintptr_t hi = (lo + bytes + 4095) & ~uintptr_t{4095};  // a VMA ends on a page
  bool inside = false;
  uint64_t rss_kb = 0, pmd_kb = 0;
  char line[512];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    unsigned long a = 0, b = 0, kb = 0;
    char dash = 0;
    if (std::sscanf(line, "%lx%c%lx ", &a, &dash, &b) == 3 && dash == '-') {
      inside = a >= lo && b <= hi;  // a VMA header line
    } else if (inside && std::sscanf(line, "Rss: %lu kB", &kb) == 1) {
      rss_kb += kb;
    } else if (inside && std::sscanf(line, "FilePmdMapped: %lu kB", &kb) == 1) {
      pmd_kb += kb;
    }
  }
  std::fclose(f);
  return rss_kb == 0 ? -1 : static_cast<double>(pmd_kb) / static_cast<double>(rss_kb);
}

}  // namespace

const char* WindowModeName(WindowMode mode) {
  switch (mode) {
    case WindowMode::kResident:
      return "resident";
    case WindowMode::kCopy:
      return "copy";
    case WindowMode::kMap:
      return "map";
    case WindowMode::kAuto:
      return "auto";
  }
  return "?";
}

StatusOr<WindowMode> ParseWindowMode(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (WindowMode m :
       {WindowMode::kResident, WindowMode::kCopy, WindowMode::kMap, WindowMode::kAuto}) {
    if (lower == WindowModeName(m)) return m;
  }
  return Status::InvalidArgument(
      fmt::format("unknown window mode '{}' (expected resident, copy, map or auto)", text));
}

std::vector<std::pair<uint64_t, uint64_t>> MapDropRanges(const std::vector<BlockExtent>& blocks,
                                                         uint64_t page_size) {
  const size_t B = blocks.size();
  std::vector<uint64_t> starts;
  for (const BlockExtent& b : blocks) starts.push_back(b.offset);
  std::sort(starts.begin(), starts.end());
  std::vector<std::pair<uint64_t, uint64_t>> ranges(B);
  for (size_t i = 0; i < B; ++i) {
    const BlockExtent& b = blocks[i];
    // Whole pages from the block's first page boundary ...
    uint64_t begin = RoundUp(b.offset, page_size);
    uint64_t end = RoundUp(b.offset + b.bytes, page_size);
    // ... up to the page holding the start of the next block (in file order) ...
    auto it = std::upper_bound(starts.begin(), starts.end(), b.offset);
    if (it != starts.end()) {
      // Blocks written 2 MiB-aligned (strata shard does) are followed by padding up to the next
      // one: dropping it too keeps the drop a whole number of huge pages, so the kernel zaps the
      // block's PMD mappings instead of splitting the last one.
      const uint64_t padded = std::min(RoundUp(b.offset + b.bytes, kHugeAlignment), *it);
      end = std::max(end, RoundDown(padded, page_size));
      end = std::min(end, RoundDown(*it, page_size));
    }
    // ... and past the end of any block that starts at or before this one and reaches into it.
    for (size_t j = 0; j < B; ++j) {
      const BlockExtent& o = blocks[j];
      if (j != i && o.offset <= b.offset && o.offset + o.bytes > b.offset) {
        begin = std::max(begin, RoundUp(o.offset + o.bytes, page_size));
      }
    }
    ranges[i] = {begin, std::max(begin, end)};
  }
  return ranges;
}

std::vector<std::pair<uint64_t, uint64_t>> MapPairDropRanges(
    const std::vector<BlockExtent>& blocks, uint64_t page_size) {
  const size_t B = blocks.size();
  std::vector<std::pair<uint64_t, uint64_t>> ranges(B > 0 ? B - 1 : 0, {0, 0});
  for (size_t k = 0; k + 1 < B; ++k) {
    const BlockExtent& a = blocks[k];
    const BlockExtent& b = blocks[k + 1];
    if (a.offset + a.bytes > b.offset) continue;  // not in file order
    const BlockExtent both{a.offset, b.offset + b.bytes - a.offset};
    bool alone = true;
    for (size_t j = 0; j < B && alone; ++j) {
      const BlockExtent& o = blocks[j];
      if (j != k && j != k + 1 && o.offset < both.offset + both.bytes &&
          o.offset + o.bytes > both.offset) {
        alone = false;  // another block sits between (or over) them
      }
    }
    if (!alone) continue;
    std::vector<BlockExtent> merged(blocks.begin(), blocks.end());
    merged[k] = both;
    merged.erase(merged.begin() + static_cast<std::ptrdiff_t>(k) + 1);
    ranges[k] = MapDropRanges(merged, page_size)[k];
  }
  return ranges;
}

StatusOr<double> SampleCachedFraction(int fd, const std::vector<BlockExtent>& blocks, int samples) {
  const uint64_t page = PageSize();
  uint64_t total_pages = 0;
  for (const BlockExtent& b : blocks) total_pages += RoundUp(b.bytes, page) / page;
  const uint64_t n_samples =
      std::min<uint64_t>(static_cast<uint64_t>(std::max(samples, 1)), total_pages);
  unsigned char byte;
  uint64_t cached = 0;
  for (uint64_t k = 0; k < n_samples; ++k) {
    uint64_t want = k * total_pages / n_samples;  // the want-th block page, in compute order
    for (const BlockExtent& b : blocks) {
      uint64_t n = RoundUp(b.bytes, page) / page;
      if (want < n) {
        // A RWF_NOWAIT read is served only from the page cache (EAGAIN otherwise).
        struct iovec iov = {&byte, 1};
        ssize_t r = ::preadv2(fd, &iov, 1, static_cast<off_t>(b.offset + want * page), RWF_NOWAIT);
        if (r > 0) ++cached;
        if (r < 0 && errno != EAGAIN && errno != EOPNOTSUPP) {
          return ErrnoStatus("preadv2(RWF_NOWAIT)", errno);
        }
        break;
      }
      want -= n;
    }
  }
  return n_samples ? static_cast<double>(cached) / static_cast<double>(n_samples) : 0.0;
}

StatusOr<std::unique_ptr<WeightWindow>> WeightWindow::Open(const std::string& path,
                                                           std::vector<BlockExtent> blocks,
                                                           const WindowOptions& opts) {
  std::unique_ptr<WeightWindow> w(new WeightWindow());
  STRATA_RETURN_IF_ERROR(w->Init(path, std::move(blocks), opts));
  return w;
}

Status WeightWindow::Init(const std::string& path, std::vector<BlockExtent> blocks,
                          const WindowOptions& opts) {
  path_ = path;
  blocks_ = std::move(blocks);
  if (blocks_.empty()) return Status::InvalidArgument("weight window: no blocks for " + path);
  if (opts.window < 0) {
    return Status::InvalidArgument(fmt::format("weight window: window {} < 0", opts.window));
  }
  const uint64_t B = blocks_.size();
  for (uint64_t i = 0; i < B; ++i) {
    const BlockExtent& b = blocks_[i];
    if (b.offset % kBlockAlignment != 0) {
      return Status::InvalidArgument(
          fmt::format("block {} of '{}': offset {} is not a multiple of {}", i, path, b.offset,
                      kBlockAlignment));
    }
    if (b.bytes == 0) {
      return Status::InvalidArgument(fmt::format("block {} of '{}' is empty", i, path));
    }
  }

  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) return ErrnoStatus("open " + path, errno);
  struct stat st;
  if (::fstat(fd_, &st) != 0) return ErrnoStatus("fstat " + path, errno);
  file_size_ = static_cast<uint64_t>(st.st_size);
  for (uint64_t i = 0; i < B; ++i) {
    const BlockExtent& b = blocks_[i];
    if (b.offset > file_size_ || b.bytes > file_size_ - b.offset) {
      return Status::DataLoss(fmt::format(
          "block {} of '{}' spans [{}, {}) but the file has only {} bytes (truncated shard file?)",
          i, path, b.offset, b.offset + b.bytes, file_size_));
    }
    slot_bytes_ = std::max(slot_bytes_, RoundUp(b.bytes, kBlockAlignment));
  }

  // Decide the mode.
  mode_ = opts.window == 0 ? WindowMode::kResident : opts.mode;
  // Map now for kMap/kResident, and for kAuto so that mincore can look at the page cache.
  if (mode_ == WindowMode::kResident || mode_ == WindowMode::kMap || mode_ == WindowMode::kAuto) {
    STRATA_ASSIGN_OR_RETURN(map_, MapFileHuge(fd_, file_size_, MAP_SHARED, path, &huge_hint_));
    map_bytes_ = file_size_;
    // Prefault after the huge-page hint (MAP_POPULATE would read before it, into 4 KiB folios),
    // so first-touch faults stay out of the first token. Best effort: without POPULATE_READ
    // (Linux < 5.14) pages fault in on first use.
    if (mode_ == WindowMode::kResident && opts.populate && file_size_ > 0) {
      (void)::madvise(map_, file_size_, MADV_POPULATE_READ);
    }
  }
  if (mode_ == WindowMode::kAuto) {
    if (opts.direct_io) {
      mode_ = WindowMode::kCopy;
    } else {
      STRATA_ASSIGN_OR_RETURN(double frac, CachedFraction());
      map_cached_ = frac >= opts.auto_cached_fraction;
      mode_ = map_cached_ ? WindowMode::kMap : WindowMode::kCopy;
      STRATA_LOG(INFO, MEM, "weight window '{}': {:.1f}% of block pages cached -> mode {}", path,
                 100.0 * frac, WindowModeName(mode_));
    }
    if (mode_ == WindowMode::kCopy) {
      ::munmap(map_, map_bytes_);
      map_ = nullptr;
      map_bytes_ = 0;
    }
  }
  stats_.mode = mode_;
  if (mode_ == WindowMode::kMap && opts.mode == WindowMode::kMap) {
    // Asked for map outright (kAuto has looked already).
    STRATA_ASSIGN_OR_RETURN(double frac, CachedFraction());
    map_cached_ = frac >= opts.auto_cached_fraction;
  }

  if (mode_ == WindowMode::kResident) {
    window_ = static_cast<int>(B);
    all_fit_ = true;
    loaded_ = B;
    stats_.blocks_loaded = static_cast<int64_t>(B);
    for (const BlockExtent& b : blocks_) {
      stats_.bytes_read += static_cast<int64_t>(b.bytes);
      in_flight_bytes_ += b.bytes;
    }
    stats_.max_in_flight = static_cast<int>(B);
    return Status::OK();  // no loader
  }

  if (opts.window < 1) return Status::InvalidArgument("weight window: window must be >= 1");
  window_ = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(opts.window), B));
  all_fit_ = B <= static_cast<uint64_t>(opts.window);

  if (mode_ == WindowMode::kCopy) {
    if (opts.direct_io) {
      direct_fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
      if (direct_fd_ < 0) {
        int err = errno;
        if (err != EINVAL) return ErrnoStatus("open(O_DIRECT) " + path, err);
        STRATA_LOG(WARN, MEM,
                   "weight window: the filesystem of '{}' refuses O_DIRECT; falling back to "
                   "buffered reads (blocks will also occupy the page cache)",
                   path);
      }
    }
    stats_.direct_io = direct_fd_ >= 0;
    slots_.reserve(static_cast<size_t>(window_));
    for (int s = 0; s < window_; ++s) slots_.emplace_back(slot_bytes_, kBlockAlignment);
    if (opts.lock_slots) {
      slots_locked_ = true;
      for (AlignedBuffer& s : slots_) {
        if (::mlock(s.data(), s.capacity()) != 0) {
          STRATA_LOG(WARN, MEM, "weight window: mlock of a {}-byte slot failed: {} (continuing)",
                     s.capacity(), std::strerror(errno));
          slots_locked_ = false;
          break;
        }
      }
    }
  } else {
    drop_ranges_ = MapDropRanges(blocks_, PageSize());
    // With W >= 4 the loader can wait for two free places and still stay >= 2 blocks ahead of
    // compute; with fewer it could only pair by falling behind.
    pair_ = !all_fit_ && window_ >= 4 && slot_bytes_ >= opts.pair_min_block_bytes;
    if (pair_) pair_drop_ranges_ = MapPairDropRanges(blocks_, PageSize());
  }
  loader_ = std::thread([this] { LoaderMain(); });
  return Status::OK();
}

WeightWindow::~WeightWindow() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  loader_cv_.notify_all();
  consumer_cv_.notify_all();
  if (loader_.joinable()) loader_.join();
  if (slots_locked_) {
    for (AlignedBuffer& s : slots_) ::munlock(s.data(), s.capacity());
  }
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (fd_ >= 0) ::close(fd_);
}

uint64_t WeightWindow::FrontierLocked() const {
  return held_.empty() ? acquire_seq_ : held_.front().seq;
}

bool WeightWindow::CanLoadLocked(uint64_t seq) const {
  if (all_fit_) return seq < blocks_.size();
  return seq < FrontierLocked() + static_cast<uint64_t>(window_);
}

bool WeightWindow::Pairable(uint64_t block) const {
  return pair_ && block + 1 < blocks_.size() && pair_drop_ranges_[block].second > 0;
}

int WeightWindow::LoadCountLocked() const {
  const uint64_t seq = loaded_;
  if (!CanLoadLocked(seq)) return 0;
  if (!pair_) return 1;
  if (!Pairable(seq % blocks_.size())) return 1;
  if (CanLoadLocked(seq + 1)) return 2;
  // Only one place is free. Wait for the next release (compute still has >= 2 blocks loaded
  // ahead of it) unless compute is about to need this one.
  return seq <= acquire_seq_ + 1 ? 1 : 0;
}

void WeightWindow::DropBlocks(std::vector<int>& drops) {
  std::sort(drops.begin(), drops.end());
  for (size_t d = 0; d < drops.size(); ++d) {
    const auto k = static_cast<size_t>(drops[d]);
    std::pair<uint64_t, uint64_t> range = drop_ranges_[k];
    if (d + 1 < drops.size() && static_cast<size_t>(drops[d + 1]) == k + 1 && Pairable(k)) {
      range = pair_drop_ranges_[k];
      ++d;
    }
    if (range.second > range.first) {
      ::madvise(map_ + range.first, range.second - range.first, MADV_DONTNEED);
    }
  }
  drops.clear();
}

void WeightWindow::LoaderMain() {
  std::vector<int> drops;
  for (;;) {
    uint64_t seq;
    int count;
    {
      std::unique_lock<std::mutex> lk(mu_);
      loader_cv_.wait(lk, [&] {
        // Unpaired, a release is dropped at once; paired, with the next load, so two
        // releases go in one call (at most W blocks stay mapped either way: drops come first).
        return stop_ || LoadCountLocked() > 0 || (!pair_ && !pending_drops_.empty());
      });
      if (stop_) return;
      drops.swap(pending_drops_);
      seq = loaded_;
      count = LoadCountLocked();
    }
    DropBlocks(drops);
    if (count == 0) continue;
    // Map mode only touches the mapping; a copy-mode slot for `seq` belongs to a released (or
    // never used) sequence. Either way the lock is dropped: Acquire does not look at the block
    // until loaded_ moves past it.
    Status s = count == 2 ? FaultInBlocks(static_cast<int>(seq % blocks_.size()), 2) : LoadSeq(seq);
    int loaded = s.ok() ? count : 0;
    if (count == 2 && !s.ok() && s.code() != StatusCode::kAborted) {
      // Find out which of the two failed.
      s = LoadSeq(seq);
      if (s.ok()) {
        loaded = 1;
        s = LoadSeq(seq + 1);
        if (s.ok()) loaded = 2;
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (count == 2) stats_.blocks_paired += loaded;
      for (int n = 0; n < loaded; ++n) {
        const uint64_t q = seq + static_cast<uint64_t>(n);
        // Acquire took this block over while we prefaulted it (and counted it): nothing to
        // record.
        if (loaded_ > q) continue;
        const BlockExtent& b = blocks_[q % blocks_.size()];
        loaded_ = q + 1;
        stats_.blocks_loaded++;
        stats_.bytes_read += static_cast<int64_t>(b.bytes);
        in_flight_bytes_ += b.bytes;
        uint64_t in_flight = all_fit_ ? loaded_ : loaded_ - FrontierLocked();
        stats_.max_in_flight = std::max(stats_.max_in_flight, static_cast<int>(in_flight));
      }
      const uint64_t failed = seq + static_cast<uint64_t>(loaded);
      if (!s.ok()) {
        if (stop_ && s.code() == StatusCode::kAborted) return;
        if (loaded_ > failed) {
          // Acquire took the failed block over: the failure is Acquire's to find (it checks
          // the file before handing out).
          s = Status::OK();
        } else {
          error_ = s;
          error_seq_ = failed;
        }
      }
    }
    consumer_cv_.notify_all();
    if (!s.ok()) return;  // sticky: nothing after a failed block is loaded
  }
}

Status WeightWindow::LoadSeq(uint64_t seq) {
  int block = static_cast<int>(seq % blocks_.size());
  if (mode_ == WindowMode::kCopy) {
    return ReadBlock(block, slots_[seq % static_cast<uint64_t>(window_)].as<uint8_t>());
  }
  return FaultInBlock(block);
}

Status WeightWindow::ReadBlock(int block, uint8_t* dst) {
  const BlockExtent& b = blocks_[block];
  auto short_read = [&](uint64_t have) {
    return Status::DataLoss(fmt::format(
        "block {} of '{}': file ends {} bytes into the block at offset {} (expected {} bytes; "
        "was the file truncated after Open?)",
        block, path_, have, b.offset, b.bytes));
  };
  uint64_t done = 0;
  while (done < b.bytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return Status::Aborted("weight window closing");
    }
    uint64_t want = std::min(kReadChunk, b.bytes - done);
    uint64_t got = 0;
    if (direct_fd_ >= 0) {  // only this thread changes direct_fd_ once the loader runs
      // O_DIRECT wants aligned offset, address and length: the offset and slot are aligned and
      // chunks are multiples of 4 KiB; the length is rounded up (the slot has room) and the
      // kernel stops at EOF.
      auto r = PreadFull(direct_fd_, dst + done, RoundUp(want, kBlockAlignment), b.offset + done);
      if (!r.ok() && r.status().code() == StatusCode::kInvalidArgument) {
        STRATA_LOG(WARN, MEM,
                   "weight window: O_DIRECT read of '{}' refused ({}); using buffered "
                   "reads from now on",
                   path_, r.status().ToString());
        std::lock_guard<std::mutex> lk(mu_);
        ::close(direct_fd_);
        direct_fd_ = -1;
        stats_.direct_io = false;
        continue;
      }
      if (!r.ok()) return r.status().WithContext(fmt::format("block {} of '{}'", block, path_));
      got = std::min(*r, want);
      if (got < want && got % kBlockAlignment != 0) {
        // An unaligned short read: finish the piece with a buffered read.
        auto rest = PreadFull(fd_, dst + done + got, want - got, b.offset + done + got);
        if (!rest.ok()) {
          return rest.status().WithContext(fmt::format("block {} of '{}'", block, path_));
        }
        got += *rest;
      }
    } else {
      auto r = PreadFull(fd_, dst + done, want, b.offset + done);
      if (!r.ok()) return r.status().WithContext(fmt::format("block {} of '{}'", block, path_));
      got = *r;
    }
    // PreadFull stops short only at EOF: the file lost part of this block.
    if (got < want) return short_read(done + got);
    done += got;
  }
  return Status::OK();
}

StatusOr<double> WeightWindow::CachedFraction() const {
  const uint64_t page = PageSize();
  if (::access(path_.c_str(), W_OK) == 0) {
    // mincore tells the page-cache state of every page (one byte per page: 64 KiB of vector per
    // 256 MiB of file).
    std::vector<unsigned char> vec(RoundUp(file_size_, page) / page);
    if (::mincore(map_, map_bytes_, vec.data()) != 0) return ErrnoStatus("mincore " + path_, errno);
    uint64_t total = 0, cached = 0;
    for (const BlockExtent& b : blocks_) {
      for (uint64_t pg = b.offset / page; pg < RoundUp(b.offset + b.bytes, page) / page; ++pg) {
        ++total;
        cached += vec[pg] & 1;
      }
    }
    return total ? static_cast<double>(cached) / static_cast<double>(total) : 0.0;
  }
  // Since Linux 5.0 mincore reports the page cache only for files the caller may write, so for a
  // read-only shard owned by someone else it would always say "cold": sample instead.
  return SampleCachedFraction(fd_, blocks_, 64);
}

Status WeightWindow::CheckStillInFile(int block) const {
  const BlockExtent& b = blocks_[block];
  struct stat st;
  if (::fstat(fd_, &st) != 0) return ErrnoStatus("fstat " + path_, errno);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (b.offset + b.bytes > size) {
    // Touching mapped pages past EOF would raise SIGBUS; report it instead.
    return Status::DataLoss(fmt::format(
        "block {} of '{}' spans [{}, {}) but the file now has only {} bytes (truncated after "
        "Open?)",
        block, path_, b.offset, b.offset + b.bytes, size));
  }
  return Status::OK();
}

Status WeightWindow::FaultInBlock(int block) { return FaultInBlocks(block, 1); }

Status WeightWindow::FaultInBlocks(int block, int count) {
  const BlockExtent& b = blocks_[block];
  const BlockExtent& last = blocks_[block + count - 1];
  for (int k = block; k < block + count; ++k) STRATA_RETURN_IF_ERROR(CheckStillInFile(k));
  const uint64_t page = PageSize();
  uint64_t begin = RoundDown(b.offset, page);
  uint64_t end = std::min(RoundUp(last.offset + last.bytes, page), RoundUp(map_bytes_, page));
  // Without huge pages: start the reads for the whole block at once, then wait for them page
  // table entry by page table entry, so compute finds the block mapped and never takes a fault.
  // With the huge-page hint, skip WILLNEED: its readahead fills the page cache with 4 KiB
  // folios (which can then never be mapped 2 MiB at a time) and walks every cached page even
  // when nothing is to be read; POPULATE_READ's faults read 2 MiB folios themselves.
  if (!huge_hint_) ::madvise(map_ + begin, end - begin, MADV_WILLNEED);
  for (uint64_t at = begin; at < end;) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return Status::Aborted("weight window closing");
    }
    uint64_t len = std::min(kReadChunk, end - at);
    if (::madvise(map_ + at, len, MADV_POPULATE_READ) != 0) {
      int err = errno;
      if (err == EINTR || err == EAGAIN) continue;
      if (err == EINVAL) {
        // Kernel older than 5.14: touch one byte per page ourselves, after making sure the file
        // still covers the block (a touch past EOF is SIGBUS).
        for (int k = block; k < block + count; ++k) STRATA_RETURN_IF_ERROR(CheckStillInFile(k));
        volatile uint8_t sink = 0;
        for (uint64_t p = at; p < at + len; p += page) sink = sink + map_[p];
        (void)sink;
      } else if (err == EFAULT) {
        return Status::DataLoss(fmt::format(
            "block {} of '{}': pages at offset {} cannot be read (file truncated after Open?)",
            block, path_, at));
      } else {
        return ErrnoStatus(fmt::format("madvise(POPULATE_READ) block {} of '{}'", block, path_),
                           err);
      }
    }
    at += len;
  }
  return Status::OK();
}

StatusOr<const uint8_t*> WeightWindow::Acquire(int i) {
  const uint64_t B = blocks_.size();
  uint64_t seq;
  {
    std::unique_lock<std::mutex> lk(mu_);
    uint64_t expected = acquire_seq_ % B;
    if (i < 0 || static_cast<uint64_t>(i) != expected) {
      return Status::FailedPrecondition(fmt::format(
          "weight window '{}': Acquire({}) out of order, expected block {}", path_, i, expected));
    }
    seq = acquire_seq_;
    if (!all_fit_ && seq >= FrontierLocked() + static_cast<uint64_t>(window_)) {
      return Status::FailedPrecondition(fmt::format(
          "weight window '{}': Acquire({}) while holding all {} blocks of the window; release "
          "one first",
          path_, i, window_));
    }
    // With B <= W the loader loads block i as sequence i, once.
    const uint64_t target = all_fit_ ? static_cast<uint64_t>(i) : seq;
    auto ready = [&] { return loaded_ > target || error_seq_ <= target || stop_; };
    if (!ready() && mode_ == WindowMode::kMap && map_cached_ && !all_fit_) {
      // Blocks arrive in order, so the loader is exactly at `seq`, perhaps still prefaulting
      // it. Nothing has to come from disk: hand the block out now and let compute fault it in
      // from the page cache (with fault-around), and move the loader on to the next one.
      // Waiting instead would stall compute behind a loader thread that a machine with every
      // core busy has not scheduled yet.
      const BlockExtent& b = blocks_[static_cast<size_t>(i)];
      loaded_ = seq + 1;
      stats_.blocks_self_loaded++;
      stats_.blocks_loaded++;
      stats_.bytes_read += static_cast<int64_t>(b.bytes);
      in_flight_bytes_ += b.bytes;
      const uint64_t in_flight = loaded_ - FrontierLocked();
      stats_.max_in_flight = std::max(stats_.max_in_flight, static_cast<int>(in_flight));
      loader_cv_.notify_all();
    }
    if (!ready()) {
      int64_t t0 = NowNs();
      consumer_cv_.wait(lk, ready);
      stats_.wait_ns += NowNs() - t0;
    }
    if (loaded_ <= target) {
      if (error_seq_ <= target) return error_;
      return Status::Aborted("weight window closing");
    }
  }
  const BlockExtent& b = blocks_[static_cast<size_t>(i)];
  const uint8_t* ptr;
  if (mode_ == WindowMode::kCopy) {
    ptr = slots_[(all_fit_ ? static_cast<uint64_t>(i) : seq) % static_cast<uint64_t>(window_)]
              .as<uint8_t>();
  } else {
    // The loader checked the file before prefaulting, but the file may have shrunk since.
    STRATA_RETURN_IF_ERROR(CheckStillInFile(i));
    ptr = map_ + b.offset;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    held_.push_back({seq, false});
    acquire_seq_++;
  }
  // A paired loader waiting with one place free loads it alone once compute gets close.
  if (pair_) loader_cv_.notify_all();
  return ptr;
}

void WeightWindow::Release(int i) {
  const uint64_t B = blocks_.size();
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = std::find_if(held_.begin(), held_.end(), [&](const Held& h) {
      return !h.released && h.seq % B == static_cast<uint64_t>(i);
    });
    STRATA_CHECK_MSG(it != held_.end(), "weight window '{}': Release({}) of a block not held",
                     path_, i);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = std::find_if(held_.begin(), held_.end(), [&](const Held& h) {
      return !h.released && h.seq % B == static_cast<uint64_t>(i);
    });
    it->released = true;
    // The loader drops the pages from our mapping (the page cache keeps them) before it
    // prefaults anything else, so at most W blocks stay mapped, and the zap (~5 ms per GiB) is
    // off the compute thread.
    if (mode_ == WindowMode::kMap && !all_fit_) pending_drops_.push_back(i);
    while (!held_.empty() && held_.front().released) held_.pop_front();
    if (!all_fit_) in_flight_bytes_ -= blocks_[static_cast<size_t>(i)].bytes;
  }
  loader_cv_.notify_all();
}

WindowStats WeightWindow::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

double WeightWindow::huge_mapped_fraction() const {
  if (mode_ != WindowMode::kResident || map_ == nullptr) return -1;
  return PmdMappedFraction(map_, file_size_);
}

uint64_t WeightWindow::budget_bytes() const {
  if (mode_ == WindowMode::kResident || all_fit_) {
    uint64_t total = 0;
    for (const BlockExtent& b : blocks_) total += RoundUp(b.bytes, kBlockAlignment);
    return total;
  }
  return slot_bytes_ * static_cast<uint64_t>(window_);
}

uint64_t WeightWindow::resident_bytes() const {
  if (mode_ == WindowMode::kCopy) return slot_bytes_ * static_cast<uint64_t>(window_);
  std::lock_guard<std::mutex> lk(mu_);
  return in_flight_bytes_;
}

}  // namespace strata::memory
