// The compute device of the streaming training executor (runtime/trainer.h): where a layer's
// forward and backward run, and how weights reach it and gradients come back.
//
// Host memory stays the authoritative store (memory/param_store.h). A device only ever holds
// working copies: the two staged layers, the activations of one micro-batch, one layer's
// gradients, the LM head. Two kinds:
// - the CPU (MakeCpuDevice): computes on host memory with the kernels of kernels/train.h, split
//   over the pool. host_memory() is true, so the executor reads weights from the store in place
//   and accumulates gradients straight into it. MakeCpuDevice(pool, /*discrete=*/true) gives the
//   same CPU with separate memory, Upload/Download copies and host_memory() false: the data path
//   a GPU takes, runnable (and testable, bit for bit) on any machine.
// - CUDA (MakeCudaDevice, built when the toolkit is found): cuBLAS for the products,
//   kernels/cuda/ for the rest, one compute stream and one transfer stream, page-locked staging.
//
// Every op has the semantics of its kernels/train.h (or kernels/ops.h) namesake, on device
// pointers, enqueued on the device's compute queue in call order. Ops do not return errors: a
// device with asynchronous failures (CUDA) keeps the first one and Check() reports it; the
// executor calls Check() at the end of every step. The CPU device is synchronous and never fails
// after allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "base/thread_pool.h"

namespace strata::runtime {

// A point in a device's compute queue.
class DeviceFence {
 public:
  virtual ~DeviceFence() = default;
  // Blocks until everything enqueued on the compute queue before the fence has run.
  virtual void Wait() = 0;
};

class Device {
 public:
  virtual ~Device() = default;

  // "cpu", "cpu (discrete)", "cuda:0 (NVIDIA H200, sm_90)".
  virtual std::string name() const = 0;
  // True when device pointers are host pointers the executor may hand any host array as.
  virtual bool host_memory() const = 0;
  // OK when the *BF16 ops can run here; FailedPrecondition saying why otherwise.
  virtual Status Bf16Support() const = 0;

  // ---- memory -------------------------------------------------------------------------------
  // Device memory (64-byte aligned at least), uninitialized. ResourceExhausted when it runs out.
  virtual StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Release(void* p) = 0;
  // Bytes of device memory free now, for a launcher to refuse a run that cannot fit before any
  // work; 0 when device memory is host memory (the host RAM check covers it).
  virtual size_t FreeMemory() const = 0;
  // Host memory the device copies from and to fastest (CUDA: page-locked).
  virtual StatusOr<void*> AllocateHost(size_t bytes) = 0;
  virtual void ReleaseHost(void* p) = 0;

  // Host -> device on the transfer queue, which runs beside the compute queue; returns once the
  // bytes are on the device. Meant for a staging thread. dst must not be in use by compute: wait
  // on a fence recorded after its last use first.
  virtual void Upload(void* dst, const void* src, size_t bytes) = 0;
  // Host -> device on the compute queue, ordered with the ops; src may be reused on return.
  virtual void CopyIn(void* dst, const void* src, size_t bytes) = 0;
  // Device -> host on a queue of its own, beside compute and transfer; returns once dst holds
  // the bytes. src must be complete: wait on a fence recorded after its last write first. Meant
  // for a thread that drains results while compute goes on.
  virtual void Download(void* dst, const void* src, size_t bytes) = 0;
  // Device -> host on the compute queue; returns once dst holds the bytes (so it waits for every
  // op enqueued before it).
  virtual void CopyOut(void* dst, const void* src, size_t bytes) = 0;
  // Sets bytes to zero, on the compute queue.
  virtual void Zero(void* p, size_t bytes) = 0;
  // A fence at the current end of the compute queue; null when ops complete before they return.
  virtual std::unique_ptr<DeviceFence> RecordFence() = 0;
  // Waits for the compute queue and returns the first asynchronous failure, if any.
  virtual Status Check() = 0;

  // ---- ops ----------------------------------------------------------------------------------
  // y[M, N] = x[M, K] · W[N, K]^T; backward dx = dy · W (or +=), dW += dy^T · x (null skips).
  virtual void MatmulForward(float* y, const float* x, const float* W, int64_t M, int64_t N,
                             int64_t K) = 0;
  virtual void MatmulBackward(float* dx, float* dW, const float* dy, const float* x,
                              const float* W, int64_t M, int64_t N, int64_t K,
                              bool accumulate_dx) = 0;
  virtual void MatmulForwardBF16(float* y, const uint16_t* x, const uint16_t* W, int64_t M,
                                 int64_t N, int64_t K) = 0;
  virtual void MatmulBackwardBF16(float* dx, float* dW, const uint16_t* dy, const uint16_t* x,
                                  const uint16_t* W, int64_t M, int64_t N, int64_t K,
                                  bool accumulate_dx) = 0;
  virtual void ConvertToBF16(uint16_t* dst, const float* src, size_t n) = 0;

  virtual void RmsNorm(float* out, const float* x, const float* w, int64_t rows, int64_t dim,
                       float eps) = 0;
  virtual void RmsNormBackward(float* dx, float* dw, const float* dy, const float* x,
                               const float* w, int64_t rows, int64_t dim, float eps,
                               bool accumulate_dx) = 0;
  // In place on x[n, heads, head_dim]; positions[n] on the device. backward rotates back.
  virtual void Rope(float* x, int64_t n, int64_t heads, int64_t head_dim,
                    const int32_t* positions, float theta, bool backward) = 0;
  // out[rows, dim] = silu(gate) * up; the backward may overwrite gate and up with their grads.
  virtual void SwiGLU(float* out, const float* gate, const float* up, int64_t rows,
                      int64_t dim) = 0;
  virtual void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                              const float* up, int64_t rows, int64_t dim) = 0;
  // y[rows, dim] += x.
  virtual void Add(float* y, const float* x, int64_t rows, int64_t dim) = 0;
  virtual void AttentionForward(float* out, float* lse, const float* q, const float* k,
                                const float* v, int64_t B, int64_t T, int64_t H, int64_t KV,
                                int64_t D) = 0;
  virtual void AttentionBackward(float* dq, float* dk, float* dv, const float* dout,
                                 const float* q, const float* k, const float* v,
                                 const float* out, const float* lse, int64_t B, int64_t T,
                                 int64_t H, int64_t KV, int64_t D) = 0;
  // kernels::CrossEntropyLmHead(BF16): targets[n] on the device; returns the summed loss (so it
  // waits for the queue).
  virtual double CrossEntropyLmHead(float* dx, float* dW, const float* x, const float* W,
                                    const int32_t* targets, int64_t n, int64_t dim,
                                    int64_t vocab, int64_t chunk_tokens, float grad_scale) = 0;
  virtual double CrossEntropyLmHeadBF16(float* dx, float* dW, const uint16_t* x,
                                        const uint16_t* W, const int32_t* targets, int64_t n,
                                        int64_t dim, int64_t vocab, int64_t chunk_tokens,
                                        float grad_scale) = 0;
};

// Device memory that goes back to its device when it goes out of scope.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static StatusOr<DeviceBuffer> Make(Device* device, size_t bytes);
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  Device* device_ = nullptr;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// The CPU, computing on host memory over `pool` (null: the caller's thread). discrete: separate
// allocations and real copies, as a GPU would have (see the top of the file).
std::unique_ptr<Device> MakeCpuDevice(ThreadPool* pool, bool discrete = false);
// CUDA device `ordinal`. FailedPrecondition when strata was built without CUDA; Unavailable when
// there is no such GPU or no working driver (the message says which).
StatusOr<std::unique_ptr<Device>> MakeCudaDevice(int ordinal);
// "cpu", "cuda" (GPU 0), "cuda:N". InvalidArgument for anything else.
StatusOr<std::unique_ptr<Device>> MakeDevice(std::string_view spec, ThreadPool* pool);

}  // namespace strata::runtime
