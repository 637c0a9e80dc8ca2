// Training math on raw row-major f32 memory: the forward ops a training step needs beyond
// kernels/ops.h, every op's hand-written backward, chunked cross-entropy over the LM head, and
// AdamW. There is no autograd graph: the executor (runtime/trainer) calls forward, keeps what the
// backward below asks for (or recomputes it), and calls the backward in reverse.
//
// Conventions:
// - Gradients of weights ACCUMULATE (+=) into their output, so micro-batches and layer sharing
//   add up; gradients of activations OVERWRITE their output unless the comment says otherwise.
// - Results are deterministic: identical inputs give identical bits run to run, whatever the
//   thread timing (fixed work partitions, fixed summation order). oneDNN sgemm (kernels/cpu/sgemm.h)
//   does the matrix products single-threaded per call; the pool's threads each take a
//   fixed slice of the OUTPUT rows, never a slice of the summed dimension, so for a given pool
//   size the result does not depend on timing.
// - `pool` may be null (caller's thread only). Kernels never allocate per call beyond per-thread
//   scratch that is reused.
// - Mixed precision (`--precision bf16`): the *BF16 variants take bf16 operands (uint16_t raw
//   bits, from ConvertToBF16) and multiply with f32 accumulation into f32 outputs
//   (kernels/cpu/sgemm.h GemmBF16); weight gradients still accumulate in f32. Everything else
//   (norms, RoPE, attention and its softmax, the loss, AdamW) is f32 in both precisions. Call
//   them only where kernels::cpu::GemmBF16Support() is OK.
#pragma once
#include <cstddef>
#include <cstdint>
#include "base/thread_pool.h"

namespace strata::kernels {

// ---- matrix products (oneDNN sgemm) -----------------------------------------------------------
// y[M, N] = x[M, K] · W[N, K]^T (W as Hugging Face stores it). y overwritten.
void MatmulForward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K,
                   ThreadPool* pool);
// Backward of MatmulForward given dy[M, N]:
//   dx[M, K] = dy · W       (overwritten; or added when accumulate_dx; skipped when dx is null)
//   dW[N, K] += dy^T · x    (skipped when dW is null)
void MatmulBackward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                    int64_t M, int64_t N, int64_t K, ThreadPool* pool,
                    bool accumulate_dx = false);
// The same products with bf16 operands: x [M, K], W [N, K] and (backward) dy [M, N] are bf16;
// y, dx and dW are f32 (dW accumulated in f32). Same slicing over the pool as the f32 ones.
void MatmulForwardBF16(float* y, const uint16_t* x, const uint16_t* W, int64_t M, int64_t N,
                       int64_t K, ThreadPool* pool);
void MatmulBackwardBF16(float* dx, float* dW, const uint16_t* dy, const uint16_t* x,
                        const uint16_t* W, int64_t M, int64_t N, int64_t K, ThreadPool* pool,
                        bool accumulate_dx = false);
// dst[i] = bf16(src[i]), round to nearest even (bit-identical to base/dtype.h F32ToBF16 on every
// CPU), split over the pool.
void ConvertToBF16(uint16_t* dst, const float* src, size_t n, ThreadPool* pool);

// ---- elementwise / row ops ---------------------------------------------------------------------
// Forward is kernels::RmsNorm (ops.h). Backward of out = x * rsqrt(mean(x^2) + eps) * weight:
//   dx[rows, dim] overwritten (or added when accumulate_dx), dweight[dim] += sum over rows.
void RmsNormBackward(float* dx, float* dweight, const float* dy, const float* x,
                     const float* weight, int64_t rows, int64_t dim, float eps,
                     bool accumulate_dx = false);
// Forward is kernels::Rope (ops.h). RoPE is a rotation, so its backward rotates dy by the
// negative angle, in place on dx[n_tokens, n_heads, head_dim].
void RopeBackward(float* dx, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                  const int32_t* positions, float theta);
// Forward is kernels::SwiGLU (ops.h): out = silu(gate) * up. dgate, dup overwritten. dgate may
// alias gate and dup may alias up (the forward inputs are read before being overwritten, element
// by element).
void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                    const float* up, int64_t n);
// out[t, :] = table[ids[t], :].
void EmbeddingForward(float* out, const float* table, const int32_t* ids, int64_t n_tokens,
                      int64_t dim);
// dtable[ids[t], :] += dout[t, :], tokens in order 0..n_tokens-1 (deterministic).
void EmbeddingBackward(float* dtable, const float* dout, const int32_t* ids, int64_t n_tokens,
                       int64_t dim);

// ---- causal grouped-query attention over whole sequences (no KV cache) -------------------------
// B sequences of T tokens, each attending causally within itself (token t sees 0..t).
// q, out: [B*T, H, D]; k, v: [B*T, KV, D]; head h reads kv head h / (H / KV); scores scaled by
// 1/sqrt(D). lse[B, H, T] receives each row's log-sum-exp of the scaled scores, which the
// backward needs to rebuild the probabilities without storing the [T, T] matrix.
// Parallel over (sequence, head) on `pool`.
void AttentionTrainForward(float* out, float* lse, const float* q, const float* k,
                           const float* v, int64_t B, int64_t T, int64_t H, int64_t KV,
                           int64_t D, ThreadPool* pool);
// Backward of AttentionTrainForward (flash-attention style: P is recomputed from q, k and lse).
// dq [B*T, H, D], dk and dv [B*T, KV, D] are overwritten; dk/dv sum over the H/KV query heads
// sharing a kv head in a fixed order. `out` and `lse` are the forward's outputs.
void AttentionTrainBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                            const float* k, const float* v, const float* out, const float* lse,
                            int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                            ThreadPool* pool);

// ---- loss ------------------------------------------------------------------------------------
// Cross-entropy of logits = x · W^T (x [n, dim] final-normed hidden states, W [vocab, dim] the LM
// head) against targets[n], computed `chunk_tokens` rows at a time so the full [n, vocab] logits
// never exist (scratch is chunk_tokens * vocab floats). Targets < 0 are ignored (no loss, no
// gradient). Returns the SUM of -log p(target) over counted tokens, in double. The gradient of
// (grad_scale * that sum) is written: dx [n, dim] overwritten, dW [vocab, dim] accumulated.
// grad_scale is typically 1 / (tokens in the global batch). dx or dW may be null to skip.
double CrossEntropyLmHead(float* dx, float* dW, const float* x, const float* W,
                          const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                          int64_t chunk_tokens, float grad_scale, ThreadPool* pool);
// The same with bf16 x and W: logits accumulate in f32, softmax and loss are f32, and each
// chunk's dlogits are rounded to bf16 (a second scratch of chunk_tokens * vocab halves) for the
// two backward products, whose results (dx, and dW accumulated) are f32.
double CrossEntropyLmHeadBF16(float* dx, float* dW, const uint16_t* x, const uint16_t* W,
                              const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                              int64_t chunk_tokens, float grad_scale, ThreadPool* pool);

// ---- optimizer -------------------------------------------------------------------------------
// torch.optim.AdamW semantics (decoupled weight decay, bias correction, eps outside the sqrt):
//   g' = g * grad_scale            (grad_scale carries gradient clipping)
//   w -= lr * weight_decay * w
//   m = beta1 * m + (1 - beta1) * g'
//   v = beta2 * v + (1 - beta2) * g'^2
//   w -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
// step counts from 1.
struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;
  float grad_scale = 1.0f;
};
void AdamWUpdate(float* w, float* m, float* v, const float* g, size_t n, const AdamWParams& p);
// Sum of x[i]^2 in double, with a fixed blocking so the result does not depend on threads.
double SumSquares(const float* x, size_t n);

}  // namespace strata::kernels
