// The CPU as a training device (runtime/device.h): the kernels of kernels/train.h over the pool.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <string>

#include <fmt/format.h>

#include "base/env.h"
#include "kernels/cpu/sgemm.h"
#include "kernels/ops.h"
#include "kernels/train.h"
#include "runtime/device.h"
#include "strata/config.h"

namespace strata::runtime {
namespace {

// Row- and element-wise ops over the pool: each element is computed exactly as on one thread
// (no sums across the split), so the split changes nothing in the result.
void ForRows(ThreadPool* pool, int64_t rows, const std::function<void(int64_t, int64_t)>& fn) {
  if (pool == nullptr || pool->size() == 1 || rows < 64) {
    fn(0, rows);
    return;
  }
  pool->ParallelFor(static_cast<size_t>(rows), [&](size_t b, size_t e) {
    fn(static_cast<int64_t>(b), static_cast<int64_t>(e));
  }, 16);
}

StatusOr<void*> AlignedAlloc(size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) {
    return Status::ResourceExhausted(fmt::format("out of host memory allocating {} bytes", bytes));
  }
  return p;
}

class CpuDevice final : public Device {
 public:
  CpuDevice(ThreadPool* pool, bool discrete) : pool_(pool), discrete_(discrete) {}

  std::string name() const override { return discrete_ ? "cpu (discrete)" : "cpu"; }
  bool host_memory() const override { return !discrete_; }
  Status Bf16Support() const override { return kernels::cpu::GemmBF16Support(); }

  StatusOr<void*> Allocate(size_t bytes) override { return AlignedAlloc(bytes); }
  void Release(void* p) override { std::free(p); }
  size_t FreeMemory() const override { return 0; }  // host RAM, discrete or not
  StatusOr<void*> AllocateHost(size_t bytes) override { return AlignedAlloc(bytes); }
  void ReleaseHost(void* p) override { std::free(p); }
  void Upload(void* dst, const void* src, size_t bytes) override {
    if (dst != src) std::memcpy(dst, src, bytes);
  }
  void CopyIn(void* dst, const void* src, size_t bytes) override {
    if (dst != src) std::memcpy(dst, src, bytes);
  }
  void CopyOut(void* dst, const void* src, size_t bytes) override {
    if (dst != src) std::memcpy(dst, src, bytes);
  }
  void Download(void* dst, const void* src, size_t bytes) override {
    if (dst != src) std::memcpy(dst, src, bytes);
  }
  void Zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  std::unique_ptr<DeviceFence> RecordFence() override { return nullptr; }
  Status Check() override { return Status::OK(); }

  void MatmulForward(float* y, const float* x, const float* W, int64_t M, int64_t N,
                     int64_t K) override {
    kernels::MatmulForward(y, x, W, M, N, K, pool_);
  }
  void MatmulBackward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                      int64_t M, int64_t N, int64_t K, bool accumulate_dx) override {
    kernels::MatmulBackward(dx, dW, dy, x, W, M, N, K, pool_, accumulate_dx);
  }
  void MatmulForwardBF16(float* y, const uint16_t* x, const uint16_t* W, int64_t M, int64_t N,
                         int64_t K) override {
    kernels::MatmulForwardBF16(y, x, W, M, N, K, pool_);
  }
  void MatmulBackwardBF16(float* dx, float* dW, const uint16_t* dy, const uint16_t* x,
                          const uint16_t* W, int64_t M, int64_t N, int64_t K,
                          bool accumulate_dx) override {
    kernels::MatmulBackwardBF16(dx, dW, dy, x, W, M, N, K, pool_, accumulate_dx);
  }
  void ConvertToBF16(uint16_t* dst, const float* src, size_t n) override {
    kernels::ConvertToBF16(dst, src, n, pool_);
  }

  void RmsNorm(float* out, const float* x, const float* w, int64_t rows, int64_t dim,
               float eps) override {
    ForRows(pool_, rows, [&](int64_t b, int64_t e) {
      kernels::RmsNorm(out + b * dim, x + b * dim, w, e - b, dim, eps);
    });
  }
  void RmsNormBackward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                       int64_t rows, int64_t dim, float eps, bool accumulate_dx) override {
    // One call: dw sums over every row in a fixed order.
    kernels::RmsNormBackward(dx, dw, dy, x, w, rows, dim, eps, accumulate_dx);
  }
  void Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int32_t* positions,
            float theta, bool backward) override {
    ForRows(pool_, n, [&](int64_t b, int64_t e) {
      if (backward) {
        kernels::RopeBackward(x + b * heads * head_dim, e - b, heads, head_dim, positions + b,
                              theta);
      } else {
        kernels::Rope(x + b * heads * head_dim, e - b, heads, head_dim, positions + b, theta);
      }
    });
  }
  void SwiGLU(float* out, const float* gate, const float* up, int64_t rows,
              int64_t dim) override {
    ForRows(pool_, rows, [&](int64_t b, int64_t e) {
      kernels::SwiGLU(out + b * dim, gate + b * dim, up + b * dim, (e - b) * dim);
    });
  }
  void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                      const float* up, int64_t rows, int64_t dim) override {
    ForRows(pool_, rows, [&](int64_t b, int64_t e) {
      kernels::SwiGLUBackward(dgate + b * dim, dup + b * dim, dout + b * dim, gate + b * dim,
                              up + b * dim, (e - b) * dim);
    });
  }
  void Add(float* y, const float* x, int64_t rows, int64_t dim) override {
    ForRows(pool_, rows, [&](int64_t b, int64_t e) {
      for (int64_t i = b * dim; i < e * dim; ++i) y[i] += x[i];
    });
  }
  void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                        int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D) override {
    kernels::AttentionTrainForward(out, lse, q, k, v, B, T, H, KV, D, pool_);
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                         const float* k, const float* v, const float* out, const float* lse,
                         int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D) override {
    kernels::AttentionTrainBackward(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, KV, D, pool_);
  }
  double CrossEntropyLmHead(float* dx, float* dW, const float* x, const float* W,
                            const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                            int64_t chunk_tokens, float grad_scale) override {
    return kernels::CrossEntropyLmHead(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens,
                                       grad_scale, pool_);
  }
  double CrossEntropyLmHeadBF16(float* dx, float* dW, const uint16_t* x, const uint16_t* W,
                                const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                                int64_t chunk_tokens, float grad_scale) override {
    return kernels::CrossEntropyLmHeadBF16(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens,
                                           grad_scale, pool_);
  }

 private:
  ThreadPool* pool_;
  bool discrete_;
};

}  // namespace

StatusOr<DeviceBuffer> DeviceBuffer::Make(Device* device, size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  STRATA_ASSIGN_OR_RETURN(b.data_, device->Allocate(bytes));
  b.device_ = device;
  b.size_ = bytes;
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) device_->Release(data_);
    device_ = o.device_;
    data_ = o.data_;
    size_ = o.size_;
    o.device_ = nullptr;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) device_->Release(data_);
}

std::unique_ptr<Device> MakeCpuDevice(ThreadPool* pool, bool discrete) {
  return std::make_unique<CpuDevice>(pool, discrete);
}

#if STRATA_HAVE_CUDA
StatusOr<std::unique_ptr<Device>> MakeCudaDevice(int ordinal) {
  // The CUDA device lives in a plugin (runtime/CMakeLists.txt says why): $STRATA_CUDA_PLUGIN,
  // else the one this build made. Loaded once, never unloaded (devices point into it).
  using Open = int (*)(int, Device**, int*, char*, size_t);
  static Open open = nullptr;
  static std::string load_error;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string env = EnvString("STRATA_CUDA_PLUGIN");
    const std::string path = env.empty() ? STRATA_CUDA_PLUGIN : env;
    void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* e = ::dlerror();
      load_error = fmt::format("the CUDA plugin {} does not load: {}", path, e ? e : "?");
      return;
    }
    open = reinterpret_cast<Open>(::dlsym(h, "strata_cuda_device_open"));
    if (open == nullptr) load_error = fmt::format("{} is not a strata CUDA plugin", path);
  });
  if (open == nullptr) return Status::FailedPrecondition(load_error);
  Device* d = nullptr;
  int code = 0;
  char message[512] = {};
  if (open(ordinal, &d, &code, message, sizeof(message)) != 0) {
    return Status(static_cast<StatusCode>(code), message);
  }
  return std::unique_ptr<Device>(d);
}
#else
StatusOr<std::unique_ptr<Device>> MakeCudaDevice(int /*ordinal*/) {
  return Status::FailedPrecondition(
      "this strata was built without CUDA (configure with the CUDA toolkit installed, or "
      "-DSTRATA_WITH_CUDA=ON)");
}
#endif

StatusOr<std::unique_ptr<Device>> MakeDevice(std::string_view spec, ThreadPool* pool) {
  if (spec == "cpu") return MakeCpuDevice(pool);
  if (spec == "cuda") return MakeCudaDevice(0);
  if (spec.substr(0, 5) == "cuda:") {
    const std::string num(spec.substr(5));
    char* end = nullptr;
    const long ordinal = std::strtol(num.c_str(), &end, 10);
    if (!num.empty() && *end == '\0' && ordinal >= 0 && ordinal < 1024) {
      return MakeCudaDevice(static_cast<int>(ordinal));
    }
  }
  return Status::InvalidArgument(
      fmt::format("device must be cpu, cuda or cuda:N, not '{}'", spec));
}

}  // namespace strata::runtime
