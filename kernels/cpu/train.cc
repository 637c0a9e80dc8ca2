// kernels/train.h: training forward/backward ops on raw f32 memory.
//
// Matrix products go to oneDNN (kernels/cpu/sgemm.h: sgemm in f32, the bf16 matmul primitive in
// bf16; one thread per call); the pool threads each take fixed slices of the output. Attention works on blocks of kAttnBlock query
// rows against all the keys they can see, through sgemm, so per thread at most two
// [kAttnBlock, T] row-block scratch matrices exist, never a [T, T] one; the backward rebuilds
// the probabilities from the forward's log-sum-exp. Elementwise loops are written with fixed lane
// arrays so GCC vectorizes them without -ffast-math (summation order stays fixed, so results are
// deterministic), and the hottest ones are cloned per instruction set with target_clones
// (picked at load time through ifunc, so the binary still runs on any x86-64).
#include "kernels/train.h"

#include <math.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <functional>
#include <mutex>
#include <type_traits>
#include <vector>

#include "base/check.h"
#include "base/dtype.h"
#include "kernels/cpu/sgemm.h"

// AVX2+FMA and AVX-512 clones of the exp-heavy row loops next to the portable one. Sanitizer
// builds keep only the portable one: ifunc resolvers run during relocation, before the sanitizer
// runtime is up.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define STRATA_TRAIN_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STRATA_TRAIN_CLONES
#endif

namespace strata::kernels {
namespace {

int PoolSize(ThreadPool* pool) { return pool == nullptr ? 1 : pool->size(); }

void ParallelOrInline(ThreadPool* pool, size_t n, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  if (pool == nullptr || pool->size() == 1 || n == 1) {
    fn(0, n);
    return;
  }
  pool->ParallelFor(n, fn, 1);
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C on the calling thread (oneDNN): f32
// operands through sgemm, bf16 ones (uint16_t bits) through the bf16 matmul, C f32 in both.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  cpu::Sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  cpu::GemmBF16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Splits [0, n) into `parts` near-equal slices aligned to `align` (the last takes the rest).
struct Slices {
  int64_t n, step;
  Slices(int64_t n_, int64_t parts, int64_t align) : n(n_) {
    const int64_t per = (n_ + parts - 1) / std::max<int64_t>(parts, 1);
    step = std::max<int64_t>(align, (per + align - 1) / align * align);
  }
  int64_t count() const { return n == 0 ? 0 : (n + step - 1) / step; }
  int64_t begin(int64_t i) const { return i * step; }
  int64_t end(int64_t i) const { return std::min(n, (i + 1) * step); }
};

// Vectorizable exp (Cephes expf polynomial, ~2 ulp): GCC does not vectorize calls to expf without
// -ffast-math. Inputs are clamped to [-87, 88] so 2^n stays a normal float; exp(-87) ~ 1.6e-38
// stands in for 0, which no sum here can tell apart.
inline float ExpF(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round x * log2(e) to the nearest integer by the 1.5 * 2^23 trick (no rint: SSE2 lacks it).
  constexpr float kMagic = 12582912.0f;
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kMagic);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((ni + 127) << 23);
}

constexpr int kLanes = 16;

inline float RowMax(const float* x, int64_t n) {
  float acc[kLanes];
  for (float& a : acc) a = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], x[i + j]);
  }
  for (; i < n; ++i) acc[0] = std::max(acc[0], x[i]);
  float m = acc[0];
  for (int j = 1; j < kLanes; ++j) m = std::max(m, acc[j]);
  return m;
}

// y[i] = exp(x[i] - shift) (y may alias x); returns the sum in a fixed lane order.
inline float ExpShiftSum(float* y, const float* x, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float e = ExpF(x[i + j] - shift);
      y[i + j] = e;
      acc[j] += e;
    }
  }
  for (; i < n; ++i) {
    const float e = ExpF(x[i] - shift);
    y[i] = e;
    acc[0] += e;
  }
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// ---- attention row kernels ----------------------------------------------------------------------
// Forward: s[0..n) holds one query row's scaled scores against keys 0..n-1, of which 0..visible-1
// are causal-visible. Overwrites s with the probabilities (0 beyond visible) and returns the
// log-sum-exp of the visible scores.
STRATA_TRAIN_CLONES
float SoftmaxRowCausal(float* s, int64_t visible, int64_t n) {
  const float mx = RowMax(s, visible);
  const float sum = ExpShiftSum(s, s, visible, mx);
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < visible; ++j) s[j] *= inv;
  for (int64_t j = visible; j < n; ++j) s[j] = 0.0f;
  return mx + logf(sum);
}

// Backward: s holds scaled scores of one row, dp the row of dO · V^T. Writes p = exp(s - lse)
// (0 beyond visible) into s and dS = p * (dp - delta) into dp.
STRATA_TRAIN_CLONES
void AttnGradRow(float* s, float* dp, int64_t visible, int64_t n, float lse, float delta) {
  for (int64_t j = 0; j < visible; ++j) {
    const float p = ExpF(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
  for (int64_t j = visible; j < n; ++j) {
    s[j] = 0.0f;
    dp[j] = 0.0f;
  }
}

// Cross-entropy on one row of logits (overwritten by the gradient (softmax - onehot) * scale, or
// zeros when target < 0). Returns -log p(target) (0 when ignored).
STRATA_TRAIN_CLONES
double CrossEntropyRow(float* z, int64_t vocab, int32_t target, float scale) {
  if (target < 0) {
    std::memset(z, 0, static_cast<size_t>(vocab) * sizeof(float));
    return 0.0;
  }
  const float mx = RowMax(z, vocab);
  const float zt = z[target];
  const float sum = ExpShiftSum(z, z, vocab, mx);
  const float k = scale / sum;
  for (int64_t j = 0; j < vocab; ++j) z[j] *= k;
  z[target] -= scale;
  return static_cast<double>(mx) + log(static_cast<double>(sum)) - static_cast<double>(zt);
}

// Per-thread scratch grown to the largest call seen, then reused.
float* Scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

constexpr int64_t kAttnBlock = 64;  // query rows per block: causal waste is one half-tile/block

// Per-thread [kAttnBlock, T] score and dP blocks, shared by the attention forward and backward.
thread_local std::vector<float> t_attn_s, t_attn_dp;

}  // namespace

// ---- matrix products ----------------------------------------------------------------------------

namespace {

// T: float (sgemm) or uint16_t (bf16 operands); outputs are f32 either way.
template <class T>
void MatmulForwardT(float* y, const T* x, const T* W, int64_t M, int64_t N, int64_t K,
                    ThreadPool* pool) {
  STRATA_CHECK(M >= 0 && N >= 0 && K >= 0);
  if (M == 0 || N == 0) return;
  const int p = PoolSize(pool);
  // Slice whichever output dimension is longer: rows of y (tokens) or columns (W rows).
  if (M >= N) {
    const Slices s(M, p, 16);
    ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
      for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
        Gemm(false, true, s.end(i) - s.begin(i), N, K, 1.0f, x + s.begin(i) * K, K, W, K, 0.0f,
             y + s.begin(i) * N, N);
      }
    });
  } else {
    const Slices s(N, p, 16);
    ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
      for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
        Gemm(false, true, M, s.end(i) - s.begin(i), K, 1.0f, x, K, W + s.begin(i) * K, K, 0.0f,
             y + s.begin(i), N);
      }
    });
  }
}

template <class T>
void MatmulBackwardT(float* dx, float* dW, const T* dy, const T* x, const T* W, int64_t M,
                     int64_t N, int64_t K, ThreadPool* pool, bool accumulate_dx) {
  STRATA_CHECK(M >= 0 && N >= 0 && K >= 0);
  if (M == 0 || K == 0) return;
  const int p = PoolSize(pool);
  // dx[M, K] = dy[M, N] · W[N, K]; sliced over its rows (or columns when M is short).
  if (dx != nullptr) {
    const float beta = accumulate_dx ? 1.0f : 0.0f;
    if (M >= K) {
      const Slices s(M, p, 16);
      ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
        for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
          Gemm(false, false, s.end(i) - s.begin(i), K, N, 1.0f, dy + s.begin(i) * N, N, W, K,
               beta, dx + s.begin(i) * K, K);
        }
      });
    } else {
      const Slices s(K, p, 16);
      ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
        for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
          Gemm(false, false, M, s.end(i) - s.begin(i), N, 1.0f, dy, N, W + s.begin(i), K, beta,
               dx + s.begin(i), K);
        }
      });
    }
  }
  // dW[N, K] += dy^T[N, M] · x[M, K]; sliced over rows of dW (or columns when N is short). The
  // summed dimension M (tokens) is never split.
  if (dW != nullptr && N > 0) {
    if (N >= K) {
      const Slices s(N, p, 16);
      ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
        for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
          Gemm(true, false, s.end(i) - s.begin(i), K, M, 1.0f, dy + s.begin(i), N, x, K, 1.0f,
               dW + s.begin(i) * K, K);
        }
      });
    } else {
      const Slices s(K, p, 16);
      ParallelOrInline(pool, static_cast<size_t>(s.count()), [&](size_t b, size_t e) {
        for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
          Gemm(true, false, N, s.end(i) - s.begin(i), M, 1.0f, dy, N, x + s.begin(i), K, 1.0f,
               dW + s.begin(i), K);
        }
      });
    }
  }
}

// f32 -> bf16 over one contiguous run; cloned per ISA so the loop vectorizes where it can.
STRATA_TRAIN_CLONES
void ToBF16Run(uint16_t* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = F32ToBF16(src[i]);
}

}  // namespace

void MatmulForward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K,
                   ThreadPool* pool) {
  MatmulForwardT(y, x, W, M, N, K, pool);
}

void MatmulBackward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                    int64_t M, int64_t N, int64_t K, ThreadPool* pool, bool accumulate_dx) {
  MatmulBackwardT(dx, dW, dy, x, W, M, N, K, pool, accumulate_dx);
}

void MatmulForwardBF16(float* y, const uint16_t* x, const uint16_t* W, int64_t M, int64_t N,
                       int64_t K, ThreadPool* pool) {
  MatmulForwardT(y, x, W, M, N, K, pool);
}

void MatmulBackwardBF16(float* dx, float* dW, const uint16_t* dy, const uint16_t* x,
                        const uint16_t* W, int64_t M, int64_t N, int64_t K, ThreadPool* pool,
                        bool accumulate_dx) {
  MatmulBackwardT(dx, dW, dy, x, W, M, N, K, pool, accumulate_dx);
}

void ConvertToBF16(uint16_t* dst, const float* src, size_t n, ThreadPool* pool) {
  // Elementwise, so the split cannot change a bit; runs of 16 Ki elements amortize the fork.
  constexpr size_t kRun = 16384;
  const size_t runs = (n + kRun - 1) / kRun;
  ParallelOrInline(pool, runs, [&](size_t b, size_t e) {
    ToBF16Run(dst + b * kRun, src + b * kRun, std::min(n, e * kRun) - b * kRun);
  });
}

// ---- elementwise / row ops ----------------------------------------------------------------------

void RmsNormBackward(float* dx, float* dweight, const float* dy, const float* x,
                     const float* weight, int64_t rows, int64_t dim, float eps,
                     bool accumulate_dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* g = dy + r * dim;
    float* o = dx + r * dim;
    // rstd as the forward (kernels::RmsNorm) computes it: the sum of squares in double (over 8
    // lanes here so it vectorizes; rounded to float, it is the forward's value but for the odd
    // last-bit tie).
    double lanes[8] = {};
    int64_t k8 = 0;
    for (; k8 + 8 <= dim; k8 += 8) {
      for (int j = 0; j < 8; ++j) lanes[j] += static_cast<double>(xr[k8 + j]) * xr[k8 + j];
    }
    for (; k8 < dim; ++k8) lanes[0] += static_cast<double>(xr[k8]) * xr[k8];
    double ss = 0.0;
    for (double l : lanes) ss += l;
    const float inv = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(dim)) + eps);
    // out_i = x_i * inv * w_i; d inv / d x_j = -inv^3 x_j / dim, so
    // dx_j = inv * g_j w_j - inv^3 / dim * x_j * sum_i(g_i w_i x_i).
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) acc[j] += g[i + j] * weight[i + j] * xr[i + j];
    }
    for (; i < dim; ++i) acc[0] += g[i] * weight[i] * xr[i];
    float gwx = 0.0f;
    for (int j = 0; j < kLanes; ++j) gwx += acc[j];
    const float c = inv * inv * inv * gwx / static_cast<float>(dim);
    if (accumulate_dx) {
      for (int64_t k = 0; k < dim; ++k) o[k] += inv * g[k] * weight[k] - c * xr[k];
    } else {
      for (int64_t k = 0; k < dim; ++k) o[k] = inv * g[k] * weight[k] - c * xr[k];
    }
    if (dweight != nullptr) {
      for (int64_t k = 0; k < dim; ++k) dweight[k] += g[k] * xr[k] * inv;
    }
  }
}

void RopeBackward(float* dx, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                  const int32_t* positions, float theta) {
  STRATA_CHECK_EQ(head_dim % 2, 0);
  const int64_t half = head_dim / 2;
  thread_local std::vector<float> cos_v, sin_v;
  float* cs = Scratch(cos_v, static_cast<size_t>(half));
  float* sn = Scratch(sin_v, static_cast<size_t>(half));
  for (int64_t t = 0; t < n_tokens; ++t) {
    // The same float32 angle as kernels::Rope, so forward and backward rotate by exactly -angle.
    for (int64_t i = 0; i < half; ++i) {
      const float inv_freq =
          1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
      const float angle = static_cast<float>(positions[t]) * inv_freq;
      cs[i] = cosf(angle);
      sn[i] = sinf(angle);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = dx + (t * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * cs[i] + b * sn[i];
        v[i + half] = b * cs[i] - a * sn[i];
      }
    }
  }
}

STRATA_TRAIN_CLONES
void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                    const float* up, int64_t n) {
  // silu(g) = g * s, s = sigmoid(g); d silu / dg = s * (1 + g * (1 - s)).
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float u = up[i];
    const float d = dout[i];
    const float s = 1.0f / (1.0f + ExpF(-g));
    dup[i] = d * g * s;
    dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
  }
}

void EmbeddingForward(float* out, const float* table, const int32_t* ids, int64_t n_tokens,
                      int64_t dim) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    STRATA_CHECK(ids[t] >= 0);
    std::memcpy(out + t * dim, table + static_cast<int64_t>(ids[t]) * dim,
                static_cast<size_t>(dim) * sizeof(float));
  }
}

void EmbeddingBackward(float* dtable, const float* dout, const int32_t* ids, int64_t n_tokens,
                       int64_t dim) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    STRATA_CHECK(ids[t] >= 0);
    float* row = dtable + static_cast<int64_t>(ids[t]) * dim;
    const float* g = dout + t * dim;
    for (int64_t i = 0; i < dim; ++i) row[i] += g[i];
  }
}

// ---- attention ----------------------------------------------------------------------------------

void AttentionTrainForward(float* out, float* lse, const float* q, const float* k,
                           const float* v, int64_t B, int64_t T, int64_t H, int64_t KV,
                           int64_t D, ThreadPool* pool) {
  STRATA_CHECK(KV > 0 && H % KV == 0 && T >= 0 && D > 0);
  if (B == 0 || T == 0) return;
  const int64_t group = H / KV;
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const int64_t blocks = (T + kAttnBlock - 1) / kAttnBlock;
  // Units (sequence, head, query block). Later blocks cost more (more visible keys), but each
  // contiguous chunk of units spans whole heads, so the pool's chunks stay balanced.
  ParallelOrInline(pool, static_cast<size_t>(B * H * blocks), [&](size_t ub, size_t ue) {
    float* s = Scratch(t_attn_s, static_cast<size_t>(kAttnBlock * T));
    for (auto u = static_cast<int64_t>(ub); u < static_cast<int64_t>(ue); ++u) {
      const int64_t b = u / (H * blocks);
      const int64_t h = (u / blocks) % H;
      const int64_t i0 = (u % blocks) * kAttnBlock;
      const int64_t i1 = std::min(T, i0 + kAttnBlock);
      const int64_t rows = i1 - i0, nk = i1;  // keys 0..i1-1 are visible to some row
      const int64_t kvh = h / group;
      const float* qb = q + ((b * T + i0) * H + h) * D;
      const float* kb = k + (b * T * KV + kvh) * D;
      const float* vb = v + (b * T * KV + kvh) * D;
      Gemm(false, true, rows, nk, D, scale, qb, H * D, kb, KV * D, 0.0f, s, nk);
      float* l = lse + (b * H + h) * T;
      for (int64_t r = 0; r < rows; ++r) {
        l[i0 + r] = SoftmaxRowCausal(s + r * nk, i0 + r + 1, nk);
      }
      Gemm(false, false, rows, D, nk, 1.0f, s, nk, vb, KV * D, 0.0f,
           out + ((b * T + i0) * H + h) * D, H * D);
    }
  });
}

void AttentionTrainBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                            const float* k, const float* v, const float* out, const float* lse,
                            int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                            ThreadPool* pool) {
  STRATA_CHECK(KV > 0 && H % KV == 0 && T >= 0 && D > 0);
  if (B == 0 || T == 0) return;
  const int64_t group = H / KV;
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const int64_t blocks = (T + kAttnBlock - 1) / kAttnBlock;
  const size_t zero_row = static_cast<size_t>(D) * sizeof(float);

  // One query head h of sequence b: writes its dq rows and ADDS its contribution to dk/dv rows
  // dkb/dvb (row stride ldkv), query block by query block.
  auto head = [&](int64_t b, int64_t h, float* dkb, float* dvb, int64_t ldkv, float* s,
                  float* dp) {
    const int64_t kv_off = (b * T * KV + h / group) * D;
    const float* kb = k + kv_off;
    const float* vb = v + kv_off;
    const float* l = lse + (b * H + h) * T;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kAttnBlock;
      const int64_t i1 = std::min(T, i0 + kAttnBlock);
      const int64_t rows = i1 - i0, nk = i1;
      const int64_t q_off = ((b * T + i0) * H + h) * D;
      const float* qb = q + q_off;
      const float* dob = dout + q_off;
      const float* ob = out + q_off;
      Gemm(false, true, rows, nk, D, scale, qb, H * D, kb, KV * D, 0.0f, s, nk);
      Gemm(false, true, rows, nk, D, 1.0f, dob, H * D, vb, KV * D, 0.0f, dp, nk);
      for (int64_t r = 0; r < rows; ++r) {
        // delta_i = sum_j P_ij dP_ij = dO_i · O_i.
        const float delta = Dot(dob + r * H * D, ob + r * H * D, D);
        AttnGradRow(s + r * nk, dp + r * nk, i0 + r + 1, nk, l[i0 + r], delta);
      }
      // dQ = scale * dS · K; dK += scale * dS^T · Q; dV += P^T · dO.
      Gemm(false, false, rows, D, nk, scale, dp, nk, kb, KV * D, 0.0f, dq + q_off, H * D);
      Gemm(true, false, nk, D, rows, scale, dp, nk, qb, H * D, 1.0f, dkb, ldkv);
      Gemm(true, false, nk, D, rows, 1.0f, s, nk, dob, H * D, 1.0f, dvb, ldkv);
    }
  };

  if (group == 1 || B * KV >= PoolSize(pool)) {
    // One unit per (sequence, kv head): it owns that kv head's dk/dv rows and accumulates the
    // group's query heads into them in a fixed order (no races, no atomics, no extra memory).
    ParallelOrInline(pool, static_cast<size_t>(B * KV), [&](size_t ub, size_t ue) {
      float* s = Scratch(t_attn_s, static_cast<size_t>(kAttnBlock * T));
      float* dp = Scratch(t_attn_dp, static_cast<size_t>(kAttnBlock * T));
      for (auto u = static_cast<int64_t>(ub); u < static_cast<int64_t>(ue); ++u) {
        const int64_t b = u / KV, kvh = u % KV;
        const int64_t kv_off = (b * T * KV + kvh) * D;
        for (int64_t t = 0; t < T; ++t) {
          std::memset(dk + kv_off + t * KV * D, 0, zero_row);
          std::memset(dv + kv_off + t * KV * D, 0, zero_row);
        }
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          head(b, h, dk + kv_off, dv + kv_off, KV * D, s, dp);
        }
      }
    });
    return;
  }
  // Fewer (sequence, kv head) pairs than threads: one unit per query head instead, each into its
  // own [T, D] dk/dv partial (scratch of the calling thread, reused), then the group's partials
  // are summed in head order. Deterministic and the same for any pool size.
  thread_local std::vector<float> part_buf;
  const int64_t per_head = T * D;
  float* part = Scratch(part_buf, static_cast<size_t>(2 * B * H * per_head));
  float* pk = part;
  float* pv = part + B * H * per_head;
  ParallelOrInline(pool, static_cast<size_t>(B * H), [&](size_t ub, size_t ue) {
    float* s = Scratch(t_attn_s, static_cast<size_t>(kAttnBlock * T));
    float* dp = Scratch(t_attn_dp, static_cast<size_t>(kAttnBlock * T));
    for (auto u = static_cast<int64_t>(ub); u < static_cast<int64_t>(ue); ++u) {
      std::memset(pk + u * per_head, 0, static_cast<size_t>(per_head) * sizeof(float));
      std::memset(pv + u * per_head, 0, static_cast<size_t>(per_head) * sizeof(float));
      head(u / H, u % H, pk + u * per_head, pv + u * per_head, D, s, dp);
    }
  });
  ParallelOrInline(pool, static_cast<size_t>(B * T), [&](size_t ub, size_t ue) {
    for (auto u = static_cast<int64_t>(ub); u < static_cast<int64_t>(ue); ++u) {
      const int64_t b = u / T, t = u % T;
      for (int64_t kvh = 0; kvh < KV; ++kvh) {
        float* dkr = dk + ((b * T + t) * KV + kvh) * D;
        float* dvr = dv + ((b * T + t) * KV + kvh) * D;
        std::memset(dkr, 0, zero_row);
        std::memset(dvr, 0, zero_row);
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          const float* sk = pk + (b * H + h) * per_head + t * D;
          const float* sv = pv + (b * H + h) * per_head + t * D;
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] += sk[d];
            dvr[d] += sv[d];
          }
        }
      }
    }
  });
}

// ---- loss ---------------------------------------------------------------------------------------

namespace {

template <class T>
double CrossEntropyLmHeadT(float* dx, float* dW, const T* x, const T* W,
                           const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                           int64_t chunk_tokens, float grad_scale, ThreadPool* pool) {
  constexpr bool kBF16 = std::is_same_v<T, uint16_t>;
  STRATA_CHECK(n >= 0 && dim > 0 && vocab > 0 && chunk_tokens > 0);
  const int p = PoolSize(pool);
  const int64_t chunk = std::min(chunk_tokens, std::max<int64_t>(n, 1));
  // Scratch owned by the calling thread (the one that runs the step), reused across calls.
  thread_local std::vector<float> logits_buf;
  thread_local std::vector<double> loss_buf;
  float* logits = Scratch(logits_buf, static_cast<size_t>(chunk * vocab));
  // bf16: the chunk's dlogits rounded for the backward products (f32: the logits buffer itself).
  thread_local std::vector<uint16_t> dlogits_buf;
  const bool grads = dx != nullptr || dW != nullptr;
  uint16_t* dlogits16 = nullptr;  // the calling thread's buffer, which the pool's threads fill
  const T* dlogits = nullptr;
  if constexpr (kBF16) {
    if (grads && dlogits_buf.size() < static_cast<size_t>(chunk * vocab)) {
      dlogits_buf.resize(static_cast<size_t>(chunk * vocab));
    }
    dlogits16 = dlogits_buf.data();
    dlogits = dlogits16;
  } else {
    dlogits = logits;
  }
  if (loss_buf.size() < static_cast<size_t>(chunk)) loss_buf.resize(static_cast<size_t>(chunk));
  double* row_loss = loss_buf.data();
  const Slices vs(vocab, p, 16);
  const Slices ds(dim, p, 16);
  double total = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t rows = std::min(chunk, n - c0);
    const T* xc = x + c0 * dim;
    // logits[rows, vocab] = xc · W^T, sliced over vocab.
    ParallelOrInline(pool, static_cast<size_t>(vs.count()), [&](size_t b, size_t e) {
      for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
        Gemm(false, true, rows, vs.end(i) - vs.begin(i), dim, 1.0f, xc, dim,
             W + vs.begin(i) * dim, dim, 0.0f, logits + vs.begin(i), vocab);
      }
    });
    // Softmax, loss and dlogits = (p - onehot) * grad_scale, per row.
    ParallelOrInline(pool, static_cast<size_t>(rows), [&](size_t b, size_t e) {
      for (size_t r = b; r < e; ++r) {
        const int32_t tgt = targets[c0 + static_cast<int64_t>(r)];
        STRATA_CHECK(tgt < vocab);
        float* z = logits + static_cast<int64_t>(r) * vocab;
        row_loss[r] = CrossEntropyRow(z, vocab, tgt, grad_scale);
        if constexpr (kBF16) {
          if (grads) ToBF16Run(dlogits16 + static_cast<int64_t>(r) * vocab, z, static_cast<size_t>(vocab));
        }
      }
    });
    for (int64_t r = 0; r < rows; ++r) total += row_loss[r];  // fixed order
    // dx[rows, dim] = dlogits · W sliced over dim; dW[vocab, dim] += dlogits^T · xc sliced over
    // vocab. Both sum over a dimension no thread splits, in one fork-join.
    const int64_t n_dx = dx != nullptr ? ds.count() : 0;
    const int64_t n_dw = dW != nullptr ? vs.count() : 0;
    ParallelOrInline(pool, static_cast<size_t>(n_dx + n_dw), [&](size_t b, size_t e) {
      for (auto i = static_cast<int64_t>(b); i < static_cast<int64_t>(e); ++i) {
        if (i < n_dx) {
          Gemm(false, false, rows, ds.end(i) - ds.begin(i), vocab, 1.0f, dlogits, vocab,
               W + ds.begin(i), dim, 0.0f, dx + c0 * dim + ds.begin(i), dim);
        } else {
          const int64_t j = i - n_dx;
          Gemm(true, false, vs.end(j) - vs.begin(j), dim, rows, 1.0f, dlogits + vs.begin(j),
               vocab, xc, dim, 1.0f, dW + vs.begin(j) * dim, dim);
        }
      }
    });
  }
  return total;
}

}  // namespace

double CrossEntropyLmHead(float* dx, float* dW, const float* x, const float* W,
                          const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                          int64_t chunk_tokens, float grad_scale, ThreadPool* pool) {
  return CrossEntropyLmHeadT(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens, grad_scale,
                             pool);
}

double CrossEntropyLmHeadBF16(float* dx, float* dW, const uint16_t* x, const uint16_t* W,
                              const int32_t* targets, int64_t n, int64_t dim, int64_t vocab,
                              int64_t chunk_tokens, float grad_scale, ThreadPool* pool) {
  return CrossEntropyLmHeadT(dx, dW, x, W, targets, n, dim, vocab, chunk_tokens, grad_scale,
                             pool);
}

// ---- optimizer ----------------------------------------------------------------------------------

void AdamWUpdate(float* w, float* m, float* v, const float* g, size_t n, const AdamWParams& p) {
  STRATA_CHECK(p.step >= 1);
  // Scalars in double as torch computes them in Python; the per-element math in f32 as torch does.
  const double bc1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(p.step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(p.step));
  const auto decay = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);
  const auto step_size = static_cast<float>(static_cast<double>(p.lr) / bc1);
  const auto bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float b1 = p.beta1, b2 = p.beta2, eps = p.eps, gs = p.grad_scale;
  const float a1 = 1.0f - b1, a2 = 1.0f - b2;
  for (size_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mi = b1 * m[i] + a1 * gi;
    const float vi = b2 * v[i] + a2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    w[i] = w[i] * decay - step_size * (mi / denom);
  }
}

double SumSquares(const float* x, size_t n) {
  // Blocks of 4096 summed in f64 over 8 lanes, blocks added in order: the result depends only on
  // n, never on how a caller splits work around it.
  constexpr size_t kBlock = 4096;
  double total = 0.0;
  for (size_t b0 = 0; b0 < n; b0 += kBlock) {
    const size_t b1 = std::min(n, b0 + kBlock);
    double acc[8] = {};
    size_t i = b0;
    for (; i + 8 <= b1; i += 8) {
      for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(x[i + j]) * x[i + j];
    }
    for (; i < b1; ++i) acc[0] += static_cast<double>(x[i]) * x[i];
    double s = 0.0;
    for (double a : acc) s += a;
    total += s;
  }
  return total;
}

}  // namespace strata::kernels
