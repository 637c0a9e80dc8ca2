// A move-only, aligned, uninitialized byte buffer for tensors and staging areas. Memory comes
// from std::aligned_alloc and goes back through a unique_ptr deleter, so a buffer never leaks or
// double-frees however it is moved around.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>

namespace strata {

class AlignedBuffer {
 public:
  // Empty: size() == 0, data() == nullptr.
  AlignedBuffer() = default;
  // `alignment` must be a power of two. The allocation is rounded up to a multiple of it (as
  // aligned_alloc requires); size() still reports `bytes`. Zero bytes allocates nothing. Throws
  // std::bad_alloc when memory runs out, like operator new.
  explicit AlignedBuffer(size_t bytes, size_t alignment = 64);

  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  size_t size() const { return size_; }
  // Bytes actually allocated (>= size()).
  size_t capacity() const { return capacity_; }
  size_t alignment() const { return alignment_; }

  template <class T>
  T* as() {
    return static_cast<T*>(data());
  }
  template <class T>
  const T* as() const {
    return static_cast<const T*>(data());
  }

  // Sets size() to `bytes`, reallocating only when that exceeds capacity(), so a buffer reused
  // for messages of varying size settles at its largest. Contents are not preserved.
  void Resize(size_t bytes);

  // Sets size() bytes to zero.
  void Zero();

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };

  std::unique_ptr<void, Free> data_;
  size_t size_ = 0;
  size_t capacity_ = 0;
  size_t alignment_ = 64;
};

}  // namespace strata
