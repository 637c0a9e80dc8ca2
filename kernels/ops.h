// Inference math on raw row-major memory: linear layers (f32, bf16 and q8_0 weights), RMSNorm,
// RoPE, softmax, SwiGLU and causal grouped-query attention. Linear and Attention are compiled once
// per instruction set (kernels/cpu/ops_<isa>.cc) and picked at run time, so one binary runs on any
// x86-64; the elementwise ops are cheap next to them and have one portable implementation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/thread_pool.h"

namespace strata::kernels {

enum class WeightType { kF32, kBF16, kQ8_0 };

const char* WeightTypeName(WeightType t);

// Bytes of a [out_features, in_features] weight of type t. q8_0 stores blocks of 32 weights along
// the in dimension (see kernels/quant.h), so in_features must then be a multiple of 32.
size_t WeightBytes(WeightType t, int64_t out_features, int64_t in_features);

// y[m, n] = sum_k x[m, k] * W[n, k] for m < M (tokens), n < N (out features), k < K (in).
// W is [N, K] as Hugging Face stores it (bf16 as raw bits, q8_0 as rows of kernels/quant.h). M == 1 (decode)
// streams W once, split by rows over the pool. f32 and bf16 multiply in f32; q8_0 on the avx512
// path quantizes x per 32-block to int16 and uses VNNI integer dot products (relative error
// ~1e-5, far below q8_0's own), on avx2/generic it widens the weights to f32. M > 1 (prefill):
// q8_0 on the avx512 path quantizes x per token and 32-block to int8 (as ggml's q8_0 x q8_0: an
// error as large as the q8_0 weights' own, ~1e-3 rms of the output's scale) and multiplies
// with VNNI vpdpbusd over 32-row panels of W repacked per call, so each weight load serves six
// tokens; f32 calls oneDNN sgemm once per thread on its rows; bf16 (and q8_0 on avx2/generic)
// converts 64-row blocks of W to f32 for sgemm. W is read once per call; each sgemm runs on the
// calling thread alone because the pool does the threading.
// `pool` may be null (caller only); do not call from inside that pool's ParallelFor. y must not
// alias x.
void Linear(float* y, const float* x, const void* w, WeightType wt, int64_t M, int64_t N, int64_t K,
            ThreadPool* pool);

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, per row of `dim`. out may alias x.
void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim, float eps);

// Hugging Face Llama rotary embedding (rotate_half: pairs (i, i + head_dim/2)), in place on
// x[n_tokens, n_heads, head_dim]; token t is at positions[t]; inv_freq[i] = theta^(-2i/head_dim).
void Rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const int32_t* positions,
          float theta);

// Numerically stable softmax of each row, in place.
void Softmax(float* x, int64_t rows, int64_t cols);

// out[i] = silu(gate[i]) * up[i]. out may alias gate or up.
void SwiGLU(float* out, const float* gate, const float* up, int64_t n);

// Causal grouped-query attention for n_tokens new tokens whose keys and values are already in the
// caches. q and out are [n_tokens, n_heads, head_dim]; k_cache and v_cache are
// [max_seq, n_kv_heads, head_dim] f32. Token t attends to cache rows 0..positions[t], or with a
// sliding window of `window` > 0 tokens (Mistral's sliding_window) to the last `window` of them,
// itself included: rows max(0, positions[t] - window + 1)..positions[t], as transformers masks
// it. Head h reads kv head h / (n_heads / n_kv_heads); scores are scaled by 1/sqrt(head_dim).
// Parallel over (token, head) on `pool` (null: caller only); scratch is allocated per call.
void Attention(float* out, const float* q, const float* k_cache, const float* v_cache,
               int64_t n_tokens, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
               const int32_t* positions, int64_t window, ThreadPool* pool);

// The instruction set the dispatcher picked: "avx512" (F, BW, VL, VNNI), "avx2" (with FMA, F16C)
// or "generic".
const char* OpsIsa();

}  // namespace strata::kernels
