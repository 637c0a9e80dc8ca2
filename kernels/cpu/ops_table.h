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
  // q8_0 with M > 1 (prefill) in int8 (null where the ISA lacks VNNI: Linear then widens the
  // weights to f32 for sgemm). quantize_x_u8 writes tokens [m0, m1) of x [M, K] as u8 (int8 + 128)
  // into xq [M, K] and their per-32-block scales into xd [M, K / 32]. gemm_q8 computes
  // y[m, n] (row stride N) for every m < M and n in [n0, n1) from them; scratch holds
  // GemmQ8ScratchBytes(K), 64-byte aligned, for one repacked 32-row panel of W.
  void (*quantize_x_u8)(uint8_t* xq, float* xd, const float* x, int64_t m0, int64_t m1,
                        int64_t K);
  void (*gemm_q8)(float* y, const uint8_t* xq, const float* xd, const void* w, int64_t M,
                  int64_t N, int64_t K, int64_t n0, int64_t n1, void* scratch);
  // out[i] = silu(gate[i]) * up[i] (kernels::SwiGLU); out may alias gate or up.
  void (*swiglu)(float* out, const float* gate, const float* up, int64_t n);
  const char* isa;
};

// Rows per gemm_q8 panel (the unit its callers split N by); bytes per 32-block of a packed panel
// (8 vectors of 4 weights x 32 rows, then 32 scales and 32 offset corrections); a panel's bytes.
inline constexpr int64_t kGemmQ8PanelRows = 32;
inline constexpr int64_t kGemmQ8PanelBlockBytes = 8 * 128 + 128 + 128;
inline size_t GemmQ8ScratchBytes(int64_t K) {
  return static_cast<size_t>(K / 32 * kGemmQ8PanelBlockBytes);
}

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
                   int64_t head_dim, const int32_t* positions, int64_t window,
                   ThreadPool* pool);

}  // namespace strata::kernels
