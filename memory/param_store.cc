#include "memory/param_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/format.h>

#include "base/check.h"

namespace strata::memory {
namespace {

constexpr size_t kAlignFloats = 16;  // 64 bytes

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

}  // namespace

Status ParamLayout::Add(std::string name, std::vector<int64_t> shape, bool decay) {
  STRATA_CHECK_MSG(ranks_ == 0, "ParamLayout::Add after Finalize");
  if (index_.count(name)) return Status::InvalidArgument("duplicate parameter " + name);
  size_t numel = 1;
  for (int64_t d : shape) {
    if (d <= 0) {
      return Status::InvalidArgument(fmt::format("parameter {} has a dimension {}", name, d));
    }
    numel *= static_cast<size_t>(d);
  }
  ParamEntry e;
  e.name = std::move(name);
  e.shape = std::move(shape);
  e.offset = total_;
  e.numel = numel;
  e.decay = decay;
  total_ = RoundUp(total_ + numel, kAlignFloats);
  params_ += numel;
  index_.emplace(e.name, entries_.size());
  entries_.push_back(std::move(e));
  return Status::OK();
}

void ParamLayout::Finalize(int ranks) {
  STRATA_CHECK(ranks >= 1);
  STRATA_CHECK_MSG(ranks_ == 0, "ParamLayout::Finalize twice");
  ranks_ = ranks;
  total_ = RoundUp(std::max<size_t>(total_, 1), kAlignFloats * static_cast<size_t>(ranks));
  slice_ = total_ / static_cast<size_t>(ranks);
}

const ParamEntry* ParamLayout::Find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &entries_[it->second];
}

StatusOr<std::unique_ptr<ParamStore>> ParamStore::Create(ParamLayout layout,
                                                         const ParamStoreOptions& options) {
  if (layout.ranks() == 0) return Status::InvalidArgument("ParamStore: layout not finalized");
  if (options.rank < 0 || options.rank >= layout.ranks()) {
    return Status::InvalidArgument(
        fmt::format("ParamStore: rank {} outside [0, {})", options.rank, layout.ranks()));
  }
  std::unique_ptr<ParamStore> s(new ParamStore());
  s->rank_ = options.rank;
  const size_t floats = 2 * layout.total() + 2 * layout.slice_size();
  s->bytes_ = floats * sizeof(float);
  int fd = -1;
  if (!options.shm_name.empty()) {
    s->shm_name_ = "/" + options.shm_name;
    fd = shm_open(s->shm_name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      if (errno == EEXIST) {
        return Status::AlreadyExists("shared memory " + s->shm_name_ +
                                     " exists (another trainer of this job on this node?)");
      }
      return ErrnoStatus("shm_open " + s->shm_name_, errno);
    }
    s->unlink_ = !options.keep_shm;
    if (ftruncate(fd, static_cast<off_t>(s->bytes_)) != 0) {
      int err = errno;
      close(fd);
      shm_unlink(s->shm_name_.c_str());
      return ErrnoStatus(fmt::format("sizing shared memory {} to {} bytes", s->shm_name_,
                                     s->bytes_), err);
    }
  }
  void* p = mmap(nullptr, s->bytes_, PROT_READ | PROT_WRITE,
                 fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS), fd, 0);
  int err = errno;
  if (fd >= 0) close(fd);
  if (p == MAP_FAILED) {
    if (!s->shm_name_.empty()) shm_unlink(s->shm_name_.c_str());
    return Status::ResourceExhausted(
        fmt::format("cannot map the parameter store: {:.1f} MiB needed ({})",
                    static_cast<double>(s->bytes_) / (1 << 20), std::strerror(err)));
  }
  // Huge pages cut TLB misses when the optimizer streams gigabytes; a hint, so errors are moot.
  madvise(p, s->bytes_, MADV_HUGEPAGE);
  // Fault the whole arena in now, at start-up: the memory is needed anyway, and otherwise its
  // first touch (page allocation, zeroing, and with huge pages possibly compaction: ~1.5 s per
  // GiB on a machine whose RAM is full of page cache) lands inside the first optimizer step or
  // inside a snapshot restore. Best effort: kernels before 5.14 fault on first use instead.
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  (void)madvise(p, s->bytes_, MADV_POPULATE_WRITE);
  s->arena_ = p;
  float* f = static_cast<float*>(p);
  s->weights_ = f;
  s->grads_ = f + layout.total();
  s->m_ = f + 2 * layout.total();
  s->v_ = s->m_ + layout.slice_size();
  s->layout_ = std::move(layout);
  return s;
}

ParamStore::~ParamStore() {
  if (arena_ != nullptr) munmap(arena_, bytes_);
  if (unlink_) shm_unlink(shm_name_.c_str());
}

float* ParamStore::weight(std::string_view name) {
  const ParamEntry* e = layout_.Find(name);
  STRATA_CHECK_MSG(e != nullptr, "no parameter {}", name);
  return weight(*e);
}

float* ParamStore::grad(std::string_view name) {
  const ParamEntry* e = layout_.Find(name);
  STRATA_CHECK_MSG(e != nullptr, "no parameter {}", name);
  return grad(*e);
}

}  // namespace strata::memory
