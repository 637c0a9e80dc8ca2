// Dispatch, threading and the elementwise ops. Compiled with the project's generic flags: the
// per-ISA kernels in ops_<isa>.cc do only single-threaded work on ranges.
#include "kernels/ops.h"

#include <math.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/check.h"
#include "kernels/cpu/ops_table.h"
#include "kernels/cpu/sgemm.h"
#include "kernels/quant.h"

namespace strata::kernels {
namespace {

const OpsTable& PickTable() {
  if (OpsTableSupported(avx512::kOpsTable)) return avx512::kOpsTable;
  if (OpsTableSupported(avx2::kOpsTable)) return avx2::kOpsTable;
  return generic::kOpsTable;
}

const OpsTable& Table() {
  static const OpsTable& table = PickTable();
  return table;
}

void ParallelOrInline(ThreadPool* pool, size_t n, size_t min_chunk,
                      const std::function<void(size_t, size_t)>& fn) {
  if (pool == nullptr || pool->size() == 1) {
    if (n > 0) fn(0, n);
    return;
  }
  pool->ParallelFor(n, fn, min_chunk);
}

// Prefill converts this many weight rows at a time to f32 before sgemm: 64 rows of K = 5632 is
// 1.4 MiB per thread, small enough to stay in L2/L3 while sgemm reads it.
constexpr int64_t kPrefillRows = 64;

}  // namespace

bool OpsTableSupported(const OpsTable& table) {
  __builtin_cpu_init();
  if (&table == &avx512::kOpsTable) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx2");
  }
  if (&table == &avx2::kOpsTable) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return true;
}

const char* WeightTypeName(WeightType t) {
  switch (t) {
    case WeightType::kF32: return "f32";
    case WeightType::kBF16: return "bf16";
    case WeightType::kQ8_0: return "q8_0";
  }
  return "?";
}

size_t WeightBytes(WeightType t, int64_t out_features, int64_t in_features) {
  const auto n = static_cast<size_t>(out_features);
  const auto k = static_cast<size_t>(in_features);
  switch (t) {
    case WeightType::kF32: return n * k * 4;
    case WeightType::kBF16: return n * k * 2;
    case WeightType::kQ8_0:
      STRATA_CHECK_EQ(in_features % kQ8BlockSize, 0);
      return n * Q8RowBytes(in_features);
  }
  return 0;
}

void LinearWith(const OpsTable& table, float* y, const float* x, const void* w, WeightType wt,
                int64_t M, int64_t N, int64_t K, ThreadPool* pool) {
  STRATA_CHECK(M >= 0 && N >= 0 && K >= 0);
  if (wt == WeightType::kQ8_0) STRATA_CHECK_EQ(K % kQ8BlockSize, 0);
  if (M == 0 || N == 0) return;
  if (M == 1) {
    // Rows split over the pool; 64 rows per chunk at least so small layers stay on one thread.
    ParallelOrInline(pool, static_cast<size_t>(N), 64, [&](size_t b, size_t e) {
      // Per thread, grown once: decode calls this 7 times per layer per token.
      thread_local AlignedBuffer scratch;
      if (scratch.size() < MatVecScratchBytes(K)) scratch.Resize(MatVecScratchBytes(K));
      table.matvec(y, x, w, wt, K, static_cast<int64_t>(b), static_cast<int64_t>(e),
                   scratch.data());
    });
    return;
  }
  if (wt == WeightType::kQ8_0 && table.gemm_q8 != nullptr) {
    // x quantized once per call by the pool's threads; the caller's buffer, grown once.
    const int64_t nb = K / kQ8BlockSize;
    thread_local AlignedBuffer xbuf;
    const size_t xq_bytes = (static_cast<size_t>(M * K) + 63) / 64 * 64;
    const size_t need = xq_bytes + static_cast<size_t>(M * nb) * sizeof(float);
    if (xbuf.size() < need) xbuf.Resize(need);
    auto* xq = xbuf.as<uint8_t>();
    auto* xd = reinterpret_cast<float*>(xq + xq_bytes);
    ParallelOrInline(pool, static_cast<size_t>(M), 4, [&](size_t b, size_t e) {
      table.quantize_x_u8(xq, xd, x, static_cast<int64_t>(b), static_cast<int64_t>(e), K);
    });
    const int64_t panels = (N + kGemmQ8PanelRows - 1) / kGemmQ8PanelRows;
    ParallelOrInline(pool, static_cast<size_t>(panels), 1, [&](size_t b, size_t e) {
      thread_local AlignedBuffer panel;
      if (panel.size() < GemmQ8ScratchBytes(K)) panel.Resize(GemmQ8ScratchBytes(K));
      table.gemm_q8(y, xq, xd, w, M, N, K, static_cast<int64_t>(b) * kGemmQ8PanelRows,
                    std::min(N, static_cast<int64_t>(e) * kGemmQ8PanelRows), panel.data());
    });
    return;
  }
  if (wt == WeightType::kF32) {
    // Nothing to convert: one sgemm per thread over its share of the rows, so the GEMM packs x
    // once per thread instead of once per 64 rows (x is as large as 64 rows of W at M = 64).
    const int64_t parts = pool == nullptr ? 1 : static_cast<int64_t>(pool->size());
    ParallelOrInline(pool, static_cast<size_t>(parts), 1, [&](size_t b, size_t e) {
      for (auto p = static_cast<int64_t>(b); p < static_cast<int64_t>(e); ++p) {
        const int64_t n0 = N * p / parts / 16 * 16;
        const int64_t n1 = p + 1 == parts ? N : N * (p + 1) / parts / 16 * 16;
        if (n1 <= n0) continue;
        cpu::Sgemm(false, true, M, n1 - n0, K, 1.0f, x, K, static_cast<const float*>(w) + n0 * K,
                   K, 0.0f, y + n0, N);
      }
    });
    return;
  }
  const int64_t blocks = (N + kPrefillRows - 1) / kPrefillRows;
  ParallelOrInline(pool, static_cast<size_t>(blocks), 1, [&](size_t b, size_t e) {
    thread_local AlignedBuffer scratch;
    const size_t need = wt == WeightType::kF32 ? 0 : kPrefillRows * K * sizeof(float);
    if (scratch.size() < need) scratch.Resize(need);
    for (size_t blk = b; blk < e; ++blk) {
      const int64_t n0 = static_cast<int64_t>(blk) * kPrefillRows;
      const int64_t n1 = std::min(N, n0 + kPrefillRows);
      const float* wf;
      if (wt == WeightType::kF32) {
        wf = static_cast<const float*>(w) + n0 * K;
      } else {
        table.rows_to_f32(scratch.as<float>(), w, wt, K, n0, n1);
        wf = scratch.as<float>();
      }
      cpu::Sgemm(false, true, M, n1 - n0, K, 1.0f, x, K, wf, K, 0.0f, y + n0, N);
    }
  });
}

void Linear(float* y, const float* x, const void* w, WeightType wt, int64_t M, int64_t N, int64_t K,
            ThreadPool* pool) {
  LinearWith(Table(), y, x, w, wt, M, N, K, pool);
}

void AttentionWith(const OpsTable& table, float* out, const float* q, const float* k_cache,
                   const float* v_cache, int64_t n_tokens, int64_t n_heads, int64_t n_kv_heads,
                   int64_t head_dim, const int32_t* positions, int64_t window, ThreadPool* pool) {
  STRATA_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0);
  STRATA_CHECK(window >= 0);
  const int64_t group = n_heads / n_kv_heads;
  const int64_t kv_stride = n_kv_heads * head_dim;
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  int64_t max_len = 0;
  for (int64_t t = 0; t < n_tokens; ++t) {
    STRATA_CHECK(positions[t] >= 0);
    max_len = std::max<int64_t>(max_len, positions[t] + 1);
  }
  if (window > 0) max_len = std::min(max_len, window);
  ParallelOrInline(pool, static_cast<size_t>(n_tokens * n_heads), 1, [&](size_t b, size_t e) {
    thread_local std::vector<float> scratch;  // per thread, grown once: no allocation per token
    if (scratch.size() < static_cast<size_t>(max_len)) scratch.resize(static_cast<size_t>(max_len));
    for (size_t i = b; i < e; ++i) {
      const int64_t t = static_cast<int64_t>(i) / n_heads;
      const int64_t h = static_cast<int64_t>(i) % n_heads;
      const int64_t kvh = h / group;
      const int64_t off = (t * n_heads + h) * head_dim;
      // The visible keys are one contiguous run of cache rows, so a window is an offset.
      const int64_t first = window > 0 ? std::max<int64_t>(0, positions[t] + 1 - window) : 0;
      const int64_t row0 = first * kv_stride + kvh * head_dim;
      table.attend(out + off, q + off, k_cache + row0, v_cache + row0, kv_stride, head_dim,
                   positions[t] + 1 - first, scale, scratch.data());
    }
  });
}

void Attention(float* out, const float* q, const float* k_cache, const float* v_cache,
               int64_t n_tokens, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
               const int32_t* positions, int64_t window, ThreadPool* pool) {
  AttentionWith(Table(), out, q, k_cache, v_cache, n_tokens, n_heads, n_kv_heads, head_dim,
                positions, window, pool);
}

void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim,
             float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    double ss = 0.0;  // double: the sum of squares of a few thousand floats loses bits in f32
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(dim)) + eps);
    for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

void Rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const int32_t* positions,
          float theta) {
  STRATA_CHECK_EQ(head_dim % 2, 0);
  const int64_t half = head_dim / 2;
  thread_local std::vector<float> cos_v, sin_v;  // grown once; Rope runs twice per layer
  if (cos_v.size() < static_cast<size_t>(half)) {
    cos_v.resize(static_cast<size_t>(half));
    sin_v.resize(static_cast<size_t>(half));
  }
  for (int64_t t = 0; t < n_tokens; ++t) {
    // The same float32 steps as transformers' LlamaRotaryEmbedding, so large positions agree.
    for (int64_t i = 0; i < half; ++i) {
      const float inv_freq =
          1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
      const float angle = static_cast<float>(positions[t]) * inv_freq;
      cos_v[static_cast<size_t>(i)] = cosf(angle);
      sin_v[static_cast<size_t>(i)] = sinf(angle);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (t * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        const float c = cos_v[static_cast<size_t>(i)];
        const float s = sin_v[static_cast<size_t>(i)];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void Softmax(float* x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * cols;
    float mx = -INFINITY;
    for (int64_t i = 0; i < cols; ++i) mx = std::max(mx, v[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < cols; ++i) {
      v[i] = expf(v[i] - mx);
      sum += v[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < cols; ++i) v[i] *= inv;
  }
}

void SwiGLU(float* out, const float* gate, const float* up, int64_t n) {
  Table().swiglu(out, gate, up, n);
}

const char* OpsIsa() { return Table().isa; }

}  // namespace strata::kernels
