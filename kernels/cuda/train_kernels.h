// CUDA kernels of the training step (built only with CUDA): everything runtime/cuda_device.cc
// needs besides cuBLAS's matrix products. Each launcher enqueues on `stream` and returns at once;
// launch errors surface through cudaGetLastError / the stream, which the device checks.
//
// Semantics follow kernels/train.h and kernels/ops.h on row-major f32 device memory (bf16 as raw
// uint16_t bits). Every kernel is deterministic: fixed work partitions and summation orders, no
// floating-point atomics, so a run gives the same bits every time on the same GPU.
// These are straightforward kernels (one block per row, or per query of a head), not tuned ones:
// the products, which dominate, go to cuBLAS.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace strata::kernels::cuda {

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w.
void RmsNorm(float* out, const float* x, const float* w, int64_t rows, int64_t dim, float eps,
             cudaStream_t stream);
// dx (overwritten, or added when accumulate_dx), dw += sum over rows. rstd_scratch: rows floats.
void RmsNormBackward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                     int64_t rows, int64_t dim, float eps, bool accumulate_dx,
                     float* rstd_scratch, cudaStream_t stream);
// Hugging Face rotate_half RoPE in place on x[n, heads, head_dim]; backward rotates back.
void Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int32_t* positions,
          float theta, bool backward, cudaStream_t stream);
void SwiGLU(float* out, const float* gate, const float* up, int64_t n, cudaStream_t stream);
// dgate may alias gate and dup up.
void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                    const float* up, int64_t n, cudaStream_t stream);
// y += x.
void Add(float* y, const float* x, int64_t n, cudaStream_t stream);
// Round to nearest even, NaN kept a NaN (base/dtype.h F32ToBF16).
void ConvertToBF16(uint16_t* dst, const float* src, int64_t n, cudaStream_t stream);

// Causal GQA over B sequences of T tokens (kernels::AttentionTrainForward): q, out [B*T, H, D];
// k, v [B*T, KV, D]; lse [B, H, T]. Needs (D + T) floats of shared memory per block.
void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                      int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                      cudaStream_t stream);
// Its backward; delta_scratch: B*H*T floats. dq, dk, dv overwritten; dk/dv sum the query heads
// of a group in head order.
void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                       const float* k, const float* v, const float* out, const float* lse,
                       int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                       float* delta_scratch, cudaStream_t stream);
// Largest T the attention kernels take for head_dim D on this GPU (shared memory per block).
int64_t AttentionMaxSeq(int64_t D, int device);

// One chunk of the chunked cross-entropy: logits [rows, vocab] (f32) become, when `grad`,
// grad_scale * (softmax - onehot(target)) in place (zero rows for targets < 0), also written as
// bf16 into dlogits16 when it is not null; row_loss[rows] receives -log p(target) (0 when
// ignored).
void CrossEntropyRows(float* logits, uint16_t* dlogits16, float* row_loss,
                      const int32_t* targets, int64_t rows, int64_t vocab, float grad_scale,
                      bool grad, cudaStream_t stream);

}  // namespace strata::kernels::cuda
