// A CUDA GPU as a training device (runtime/device.h), built when the toolkit is found.
// - Products: cuBLAS (cublasGemmEx; f32 with CUBLAS_COMPUTE_32F, i.e. no TF32, so f32 runs are
//   f32; bf16 operands with f32 accumulation). Row-major products map onto column-major cuBLAS
//   as C^T = op(B)^T op(A)^T.
// - Everything else: kernels/cuda/train_kernels.h.
// - Three non-blocking streams: compute (every op, in call order), transfer (Upload, from the
//   executor's stager thread) and download (Download, from its gradient drainer), so staging the
//   next layer and bringing the last one's gradients back overlap this layer's kernels.
// - Errors of asynchronous work are kept (the first one) and returned by Check().
#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include "kernels/cuda/train_kernels.h"
#include "runtime/device.h"

namespace strata::runtime {
namespace {

namespace ck = kernels::cuda;

class CudaFence final : public DeviceFence {
 public:
  explicit CudaFence(cudaEvent_t e) : event_(e) {}
  ~CudaFence() override { cudaEventDestroy(event_); }
  void Wait() override { cudaEventSynchronize(event_); }

 private:
  cudaEvent_t event_;
};

class CudaDevice final : public Device {
 public:
  static StatusOr<std::unique_ptr<Device>> Open(int ordinal) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      return Status::Unavailable(
          fmt::format("no usable CUDA device: {} ({})", cudaGetErrorString(e),
                      cudaGetErrorName(e)));
    }
    if (ordinal >= count) {
      return Status::Unavailable(
          fmt::format("CUDA device {} asked for, but this machine has {}", ordinal, count));
    }
    std::unique_ptr<CudaDevice> d(new CudaDevice());
    d->ordinal_ = ordinal;
    cudaDeviceProp prop{};
    if ((e = cudaSetDevice(ordinal)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, ordinal)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&d->compute_, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&d->transfer_, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&d->download_, cudaStreamNonBlocking)) != cudaSuccess) {
      return Status::Unavailable(
          fmt::format("opening CUDA device {}: {}", ordinal, cudaGetErrorString(e)));
    }
    if (cublasCreate(&d->blas_) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(d->blas_, d->compute_) != CUBLAS_STATUS_SUCCESS) {
      return Status::Unavailable(fmt::format("cuBLAS failed to start on CUDA device {}", ordinal));
    }
    d->major_ = prop.major;
    d->minor_ = prop.minor;
    d->name_ = fmt::format("cuda:{} ({}, sm_{}{})", ordinal, prop.name, prop.major, prop.minor);
    return std::unique_ptr<Device>(std::move(d));
  }

  ~CudaDevice() override {
    cudaSetDevice(ordinal_);
    if (compute_ != nullptr) cudaStreamSynchronize(compute_);
    for (Scratch* s : {&rstd_, &delta_, &logits_, &dlogits16_, &row_loss_}) {
      if (s->p != nullptr) cudaFree(s->p);
    }
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (transfer_ != nullptr) cudaStreamDestroy(transfer_);
    if (download_ != nullptr) cudaStreamDestroy(download_);
    if (compute_ != nullptr) cudaStreamDestroy(compute_);
  }

  std::string name() const override { return name_; }
  bool host_memory() const override { return false; }
  Status Bf16Support() const override {
    if (major_ >= 8) return Status::OK();
    return Status::FailedPrecondition(fmt::format(
        "{} cannot multiply bf16 in cuBLAS (needs compute capability 8.0 or newer)", name_));
  }

  StatusOr<void*> Allocate(size_t bytes) override {
    Use();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      return Status::ResourceExhausted(fmt::format("allocating {} bytes on {}: {}", bytes, name_,
                                                   cudaGetErrorString(e)));
    }
    return p;
  }
  void Release(void* p) override {
    Use();
    cudaFree(p);
  }
  size_t FreeMemory() const override {
    Use();
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
    return free;
  }
  StatusOr<void*> AllocateHost(size_t bytes) override {
    Use();
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      return Status::ResourceExhausted(fmt::format(
          "allocating {} bytes of page-locked host memory: {}", bytes, cudaGetErrorString(e)));
    }
    return p;
  }
  void ReleaseHost(void* p) override { cudaFreeHost(p); }

  void Upload(void* dst, const void* src, size_t bytes) override {
    Use();
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, transfer_), "upload");
    Note(cudaStreamSynchronize(transfer_), "upload");
  }
  void Download(void* dst, const void* src, size_t bytes) override {
    Use();
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, download_), "download");
    Note(cudaStreamSynchronize(download_), "download");
  }
  void CopyIn(void* dst, const void* src, size_t bytes) override {
    Use();
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, compute_), "copy in");
    // The caller may reuse src on return.
    Note(cudaStreamSynchronize(compute_), "copy in");
  }
  void CopyOut(void* dst, const void* src, size_t bytes) override {
    Use();
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, compute_), "copy out");
    Note(cudaStreamSynchronize(compute_), "copy out");
  }
  void Zero(void* p, size_t bytes) override {
    Use();
    Note(cudaMemsetAsync(p, 0, bytes, compute_), "memset");
  }
  std::unique_ptr<DeviceFence> RecordFence() override {
    Use();
    cudaEvent_t e = nullptr;
    if (!Note(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event") ||
        !Note(cudaEventRecord(e, compute_), "event")) {
      // Without a fence the stager must not run ahead: wait here instead.
      if (e != nullptr) cudaEventDestroy(e);
      Note(cudaStreamSynchronize(compute_), "synchronize");
      return nullptr;
    }
    return std::make_unique<CudaFence>(e);
  }
  Status Check() override {
    Use();
    Note(cudaStreamSynchronize(compute_), "synchronize");
    Note(cudaGetLastError(), "kernel launch");
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  // ---- products -----------------------------------------------------------------------------
  void MatmulForward(float* y, const float* x, const float* W, int64_t M, int64_t N,
                     int64_t K) override {
    Gemm(false, true, M, N, K, x, K, W, K, 0.0f, y, N, false);
  }
  void MatmulBackward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                      int64_t M, int64_t N, int64_t K, bool accumulate_dx) override {
    if (dx != nullptr) Gemm(false, false, M, K, N, dy, N, W, K, accumulate_dx ? 1.0f : 0.0f, dx, K, false);
    if (dW != nullptr) Gemm(true, false, N, K, M, dy, N, x, K, 1.0f, dW, K, false);
  }
  void MatmulForwardBF16(float* y, const uint16_t* x, const uint16_t* W, int64_t M, int64_t N,
                         int64_t K) override {
    Gemm(false, true, M, N, K, x, K, W, K, 0.0f, y, N, true);
  }
  void MatmulBackwardBF16(float* dx, float* dW, const uint16_t* dy, const uint16_t* x,
                          const uint16_t* W, int64_t M, int64_t N, int64_t K,
                          bool accumulate_dx) override {
    if (dx != nullptr) Gemm(false, false, M, K, N, dy, N, W, K, accumulate_dx ? 1.0f : 0.0f, dx, K, true);
    if (dW != nullptr) Gemm(true, false, N, K, M, dy, N, x, K, 1.0f, dW, K, true);
  }
  void ConvertToBF16(uint16_t* dst, const float* src, size_t n) override {
    Use();
    ck::ConvertToBF16(dst, src, static_cast<int64_t>(n), compute_);
  }

  // ---- the rest -----------------------------------------------------------------------------
  void RmsNorm(float* out, const float* x, const float* w, int64_t rows, int64_t dim,
               float eps) override {
    Use();
    ck::RmsNorm(out, x, w, rows, dim, eps, compute_);
  }
  void RmsNormBackward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                       int64_t rows, int64_t dim, float eps, bool accumulate_dx) override {
    Use();
    float* rstd = Grow<float>(rstd_, static_cast<size_t>(rows));
    if (rstd == nullptr) return;
    ck::RmsNormBackward(dx, dw, dy, x, w, rows, dim, eps, accumulate_dx, rstd, compute_);
  }
  void Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int32_t* positions,
            float theta, bool backward) override {
    Use();
    ck::Rope(x, n, heads, head_dim, positions, theta, backward, compute_);
  }
  void SwiGLU(float* out, const float* gate, const float* up, int64_t rows,
              int64_t dim) override {
    Use();
    ck::SwiGLU(out, gate, up, rows * dim, compute_);
  }
  void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                      const float* up, int64_t rows, int64_t dim) override {
    Use();
    ck::SwiGLUBackward(dgate, dup, dout, gate, up, rows * dim, compute_);
  }
  void Add(float* y, const float* x, int64_t rows, int64_t dim) override {
    Use();
    ck::Add(y, x, rows * dim, compute_);
  }
  void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                        int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D) override {
    Use();
    if (!AttentionFits(T, D)) return;
    ck::AttentionForward(out, lse, q, k, v, B, T, H, KV, D, compute_);
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                         const float* k, const float* v, const float* out, const float* lse,
                         int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D) override {
    Use();
    if (!AttentionFits(T, D)) return;
    float* delta = Grow<float>(delta_, static_cast<size_t>(B * H * T));
    if (delta == nullptr) return;
    ck::AttentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, KV, D, delta, compute_);
  }
  double CrossEntropyLmHead(float* dx, float* dW, const float* x, const float* W,
                            const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                            int64_t chunk_tokens, float grad_scale) override {
    return CrossEntropy(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens, grad_scale, false);
  }
  double CrossEntropyLmHeadBF16(float* dx, float* dW, const uint16_t* x, const uint16_t* W,
                                const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                                int64_t chunk_tokens, float grad_scale) override {
    return CrossEntropy(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens, grad_scale, true);
  }

 private:
  struct Scratch {
    void* p = nullptr;
    size_t bytes = 0;
  };

  CudaDevice() = default;

  // The runtime's current device is per thread; every entry point may come from another thread.
  void Use() const { cudaSetDevice(ordinal_); }

  bool Note(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) {
      error_ = Status::Internal(fmt::format("{} {}: {} ({})", name_, what, cudaGetErrorString(e),
                                            cudaGetErrorName(e)));
    }
    return false;
  }
  void NoteBlas(cublasStatus_t s, const char* what) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) {
      error_ = Status::Internal(fmt::format("{} cuBLAS {}: status {}", name_, what,
                                            static_cast<int>(s)));
    }
  }

  // Device scratch of at least n elements, reallocated (after the queue drains) when too small.
  template <class T>
  T* Grow(Scratch& s, size_t n) {
    const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
    if (s.bytes < bytes) {
      Note(cudaStreamSynchronize(compute_), "synchronize");
      if (s.p != nullptr) cudaFree(s.p);
      s.p = nullptr;
      s.bytes = 0;
      if (!Note(cudaMalloc(&s.p, bytes), "scratch allocation")) return nullptr;
      s.bytes = bytes;
    }
    return static_cast<T*>(s.p);
  }

  bool AttentionFits(int64_t T, int64_t D) {
    if (T <= ck::AttentionMaxSeq(D, ordinal_)) return true;
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) {
      error_ = Status::FailedPrecondition(fmt::format(
          "{}: sequences of {} tokens with head_dim {} exceed the attention kernels' shared "
          "memory (at most {} tokens)",
          name_, T, D, ck::AttentionMaxSeq(D, ordinal_)));
    }
    return false;
  }

  // Row-major C[m, n] = op(A) op(B) * 1 + beta * C, lda/ldb/ldc row strides.
  void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
            const void* b, int64_t ldb, float beta, float* c, int64_t ldc, bool bf16) {
    Use();
    const float alpha = 1.0f;
    const cudaDataType_t t = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    NoteBlas(cublasGemmEx(blas_, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                          static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha,
                          b, t, static_cast<int>(ldb), a, t, static_cast<int>(lda), &beta, c,
                          CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT),
             "gemm");
  }

  double CrossEntropy(float* dx, float* dW, const void* x, const void* W, const int32_t* targets,
                      int64_t n, int64_t dim, int64_t vocab, int64_t chunk, float grad_scale,
                      bool bf16) {
    Use();
    const bool grad = dx != nullptr || dW != nullptr;
    const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
    chunk = std::min(chunk, n);
    float* logits = Grow<float>(logits_, static_cast<size_t>(chunk * vocab));
    uint16_t* d16 = bf16 && grad ? Grow<uint16_t>(dlogits16_, static_cast<size_t>(chunk * vocab))
                                 : nullptr;
    float* row_loss = Grow<float>(row_loss_, static_cast<size_t>(n));
    if (logits == nullptr || row_loss == nullptr || (bf16 && grad && d16 == nullptr)) return 0.0;
    const auto* xb = static_cast<const char*>(x);
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t r = std::min(chunk, n - c0);
      const void* xc = xb + static_cast<size_t>(c0 * dim) * elem;
      // logits[r, vocab] = x_c · W^T
      Gemm(false, true, r, vocab, dim, xc, dim, W, dim, 0.0f, logits, vocab, bf16);
      ck::CrossEntropyRows(logits, d16, row_loss + c0, targets + c0, r, vocab, grad_scale, grad,
                           compute_);
      const void* dl = bf16 ? static_cast<const void*>(d16) : static_cast<const void*>(logits);
      if (dx != nullptr) Gemm(false, false, r, dim, vocab, dl, vocab, W, dim, 0.0f, dx + c0 * dim, dim, bf16);
      if (dW != nullptr) Gemm(true, false, vocab, dim, r, dl, vocab, xc, dim, 1.0f, dW, dim, bf16);
    }
    losses_.resize(static_cast<size_t>(n));  // grown once: this runs every micro-batch
    Note(cudaMemcpyAsync(losses_.data(), row_loss, losses_.size() * sizeof(float),
                         cudaMemcpyDeviceToHost, compute_),
         "copy out");
    Note(cudaStreamSynchronize(compute_), "synchronize");
    double sum = 0.0;
    for (float l : losses_) sum += l;  // in token order
    return sum;
  }

  int ordinal_ = 0;
  int major_ = 0, minor_ = 0;
  std::string name_;
  cudaStream_t compute_ = nullptr;
  cudaStream_t transfer_ = nullptr;
  cudaStream_t download_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  Scratch rstd_, delta_, logits_, dlogits16_, row_loss_;
  std::vector<float> losses_;  // the per-token losses, on the host
  std::mutex mu_;
  Status error_;
};

}  // namespace

}  // namespace strata::runtime

// The plugin's one entry point (MakeCudaDevice in runtime/cpu_device.cc loads it): 0 and *out
// on success; otherwise the Status code and message of the failure.
extern "C" __attribute__((visibility("default"))) int strata_cuda_device_open(
    int ordinal, strata::runtime::Device** out, int* code, char* message, size_t message_len) {
  strata::StatusOr<std::unique_ptr<strata::runtime::Device>> d =
      strata::runtime::CudaDevice::Open(ordinal);
  if (d.ok()) {
    *out = d->release();
    return 0;
  }
  *code = static_cast<int>(d.status().code());
  std::snprintf(message, message_len, "%s", d.status().message().c_str());
  return 1;
}
