// One set of Linear and Attention kernels per instruction set ("avx512" also needs VNNI, for the
// q8_0 decode); ops.cc picks one at run time and does the threading (std::function and other
// shared inline code stay out of the ISA-flagged translation units, so the linker never keeps an
// AVX-512 copy of them for everyone).
#pragma once

#include <cstdint>

#include "base/thread_pool.h"
#include "kernels/ops.h"

namespace strata::kernels {

inline size_t MatVecScratchBytes(int64_t K) {
  return static_cast<size_t>(K) * sizeof(float) + static_cast<size_t>(K / 32 + 1) * sizeof(float);
}

struct OpsTable {
  // y[n] = dot(W[n], x) for n in [n0, n1): one token. K must be a multiple of 32 for q8_0.
  // scratch: MatVecScratchBytes(K) bytes, 64-byte aligned, for x rearranged or quantized (the
  // caller keeps it per thread, so a decode step allocates nothing).
  void (*matvec)(float* y, const float* x, const void* w, WeightType wt, int64_t K, int64_t n0,
                 int64_t n1, void* scratch);
  // dst[(n - n0) * K + k] = W[n, k] as f32 for n in [n0, n1).
  void (*rows_to_f32)(float* dst, const void* w, WeightType wt, int64_t K, int64_t n0, int64_t n1);
  // One (token, head) of attention: out = softmax(q . k[j] * scale) over j < len, times v[j].
  // k and v point at kv head 0 of row 0 of that head's cache; rows are kv_stride floats apart.
  // scratch holds len floats.
  void (*attend)(float* out, const float* q, const float* k, const float* v, int64_t kv_stride,
                 int64_t head_dim, int64_t len, float scale, float* scratch);
  const char* isa;
};

namespace generic {
extern const OpsTable kOpsTable;
}
namespace avx2 {
extern const OpsTable kOpsTable;
}
namespace avx512 {
extern const OpsTable kOpsTable;
}

// Whether this CPU can run `table` (generic: always).
bool OpsTableSupported(const OpsTable& table);

// Linear and Attention with an explicit kernel set: the public functions call these with the
// dispatcher's pick; tests call them with every set the CPU supports.
void LinearWith(const OpsTable& table, float* y, const float* x, const void* w, WeightType wt,
                int64_t M, int64_t N, int64_t K, ThreadPool* pool);
void AttentionWith(const OpsTable& table, float* out, const float* q, const float* k_cache,
                   const float* v_cache, int64_t n_tokens, int64_t n_heads, int64_t n_kv_heads,
                   int64_t head_dim, const int32_t* positions, ThreadPool* pool);

}  // namespace strata::kernels
