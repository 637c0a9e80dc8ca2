#include "base/aligned_buffer.h"

#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "base/check.h"

namespace strata {

AlignedBuffer::AlignedBuffer(size_t bytes, size_t alignment) : alignment_(alignment) {
  STRATA_CHECK_MSG(alignment > 0 && (alignment & (alignment - 1)) == 0,
                   "alignment {} is not a power of two", alignment);
  Resize(bytes);
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      alignment_(other.alignment_) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    alignment_ = other.alignment_;
  }
  return *this;
}

void AlignedBuffer::Resize(size_t bytes) {
  if (bytes <= capacity_) {
    size_ = bytes;
    return;
  }
  STRATA_CHECK_LE(bytes, std::numeric_limits<size_t>::max() - 2 * alignment_);
  size_t rounded = (bytes + alignment_ - 1) & ~(alignment_ - 1);
  // aligned_alloc rejects alignments below sizeof(void*) on some platforms; a larger alignment
  // is always acceptable, and the rounded size stays a multiple of it.
  size_t align = alignment_ < sizeof(void*) ? sizeof(void*) : alignment_;
  rounded = (rounded + align - 1) & ~(align - 1);
  data_.reset();  // contents are not preserved, so free first and keep the peak low
  capacity_ = 0;
  size_ = 0;
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(p);
  capacity_ = rounded;
  size_ = bytes;
}

void AlignedBuffer::Zero() {
  if (size_ > 0) std::memset(data_.get(), 0, size_);
}

}  // namespace strata
