#include "kernels/cuda/train_kernels.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace strata::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kAttnThreads = 128;
// Dynamic shared memory a block may use without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

__device__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A block-wide sum (or max) every thread receives, in a fixed order (so deterministic).
// blockDim.x is a multiple of 32; `red` is 32 floats of shared memory.
template <bool kMax>
__device__ float BlockReduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? WarpMax(v) : WarpSum(v);
  __syncthreads();  // a previous reduction may still be reading red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  float r = lane < warps ? red[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? WarpMax(r) : WarpSum(r);
}

__device__ uint16_t ToBF16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

unsigned Blocks(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);  // grid-stride beyond that
}

__global__ void RmsNormKernel(float* out, const float* x, const float* w, int dim, float eps) {
  __shared__ float red[32];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* o = out + static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = BlockReduce<false>(ss, red);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

__global__ void RmsNormBackwardRows(float* dx, float* rstd, const float* dy, const float* x,
                                    const float* w, int dim, float eps, bool accumulate) {
  __shared__ float red[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * dim;
  const float *xr = x + off, *g = dy + off;
  float* o = dx + off;
  float ss = 0.0f, gwx = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    ss += xr[i] * xr[i];
    gwx += g[i] * w[i] * xr[i];
  }
  ss = BlockReduce<false>(ss, red);
  gwx = BlockReduce<false>(gwx, red);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
  // dx_j = inv * g_j w_j - inv^3 / dim * x_j * sum_i(g_i w_i x_i)
  const float c = inv * inv * inv * gwx / static_cast<float>(dim);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = inv * g[i] * w[i] - c * xr[i];
    o[i] = accumulate ? o[i] + v : v;
  }
  if (threadIdx.x == 0) rstd[blockIdx.x] = inv;
}

// dw[c] += sum over rows of dy * x * rstd, one thread per column, rows in order.
__global__ void RmsNormBackwardWeight(float* dw, const float* dy, const float* x,
                                      const float* rstd, int64_t rows, int dim) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  float acc = 0.0f;
  for (int64_t r = 0; r < rows; ++r) acc += dy[r * dim + c] * x[r * dim + c] * rstd[r];
  dw[c] += acc;
}

__global__ void RopeKernel(float* x, int64_t n, int heads, int head_dim, const int32_t* pos,
                           float theta, bool backward) {
  const int half = head_dim / 2;
  const int64_t total = n * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t th = idx / half;  // token * heads + head
    const int64_t t = th / heads;
    // The float32 steps of transformers' LlamaRotaryEmbedding (and kernels::Rope).
    const float inv_freq =
        1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    const float angle = static_cast<float>(pos[t]) * inv_freq;
    const float c = cosf(angle), s = sinf(angle);
    float* v = x + th * head_dim;
    const float a = v[i], b = v[i + half];
    if (backward) {
      v[i] = a * c + b * s;
      v[i + half] = b * c - a * s;
    } else {
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

__global__ void SwiGLUKernel(float* out, const float* g, const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    out[i] = gi / (1.0f + expf(-gi)) * u[i];
  }
}

__global__ void SwiGLUBackwardKernel(float* dg, float* du, const float* dout, const float* g,
                                     const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i], ui = u[i], d = dout[i];
    const float s = 1.0f / (1.0f + expf(-gi));
    du[i] = d * gi * s;
    dg[i] = d * ui * s * (1.0f + gi * (1.0f - s));
  }
}

__global__ void AddKernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

__global__ void ToBF16Kernel(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = ToBF16(src[i]);
  }
}

// One block per (query t, head h, sequence b). Shared: q row (D) and the row's scores (T).
__global__ void AttnForwardKernel(float* out, float* lse, const float* q, const float* k,
                                  const float* v, int T, int H, int KV, int D, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* qs = sm;
  float* p = sm + D;
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (H / KV);
  const int64_t row = static_cast<int64_t>(b) * T + t;
  const float* qr = q + (row * H + h) * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) qs[i] = qr[i];
  __syncthreads();
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const float* kr = k + ((static_cast<int64_t>(b) * T + j) * KV + kvh) * D;
    float s = 0.0f;
    for (int i = 0; i < D; ++i) s += qs[i] * kr[i];
    s *= scale;
    p[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = BlockReduce<true>(mx, red);
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = BlockReduce<false>(sum, red);  // its barriers also publish p
  const float inv = 1.0f / sum;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= t; ++j) acc += p[j] * v[((static_cast<int64_t>(b) * T + j) * KV + kvh) * D + i];
    out[(row * H + h) * D + i] = acc * inv;
  }
  if (threadIdx.x == 0) lse[(static_cast<int64_t>(b) * H + h) * T + t] = mx + logf(sum);
}

// dq for one (t, h, b), and delta = dout . out for it (the dk/dv kernel needs every delta).
// Shared: q row, dout row (2D) and dS over the keys (T).
__global__ void AttnBackwardQKernel(float* dq, float* delta, const float* dout, const float* q,
                                    const float* k, const float* v, const float* out,
                                    const float* lse, int T, int H, int KV, int D, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* qs = sm;
  float* gs = sm + D;
  float* ds = sm + 2 * D;
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (H / KV);
  const int64_t row = static_cast<int64_t>(b) * T + t;
  const int64_t qoff = (row * H + h) * D;
  float dl = 0.0f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qs[i] = q[qoff + i];
    gs[i] = dout[qoff + i];
    dl += dout[qoff + i] * out[qoff + i];
  }
  dl = BlockReduce<false>(dl, red);  // also publishes qs, gs
  const int64_t srow = (static_cast<int64_t>(b) * H + h) * T + t;
  if (threadIdx.x == 0) delta[srow] = dl;
  const float l = lse[srow];
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const int64_t koff = ((static_cast<int64_t>(b) * T + j) * KV + kvh) * D;
    float s = 0.0f, dp = 0.0f;
    for (int i = 0; i < D; ++i) {
      s += qs[i] * k[koff + i];
      dp += gs[i] * v[koff + i];
    }
    const float pr = expf(s * scale - l);
    ds[j] = pr * (dp - dl);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= t; ++j) acc += ds[j] * k[((static_cast<int64_t>(b) * T + j) * KV + kvh) * D + i];
    dq[qoff + i] = acc * scale;
  }
}

// dk, dv for one (key j, kv head, b): the query heads of the group in order, queries t >= j.
// Shared: k and v rows (2D), accumulators (2D), P and dS over the queries (2T).
__global__ void AttnBackwardKVKernel(float* dk, float* dv, const float* dout, const float* q,
                                     const float* k, const float* v, const float* lse,
                                     const float* delta, int T, int H, int KV, int D,
                                     float scale) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = sm + D;
  float* dka = sm + 2 * D;
  float* dva = sm + 3 * D;
  float* ps = sm + 4 * D;
  float* dss = ps + T;
  const int j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = H / KV;
  const int64_t koff = ((static_cast<int64_t>(b) * T + j) * KV + kvh) * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    ks[i] = k[koff + i];
    vs[i] = v[koff + i];
    dka[i] = 0.0f;
    dva[i] = 0.0f;
  }
  __syncthreads();
  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    for (int t = j + threadIdx.x; t < T; t += blockDim.x) {
      const int64_t qoff = ((static_cast<int64_t>(b) * T + t) * H + h) * D;
      float s = 0.0f, dp = 0.0f;
      for (int i = 0; i < D; ++i) {
        s += q[qoff + i] * ks[i];
        dp += dout[qoff + i] * vs[i];
      }
      const int64_t srow = (static_cast<int64_t>(b) * H + h) * T + t;
      const float pr = expf(s * scale - lse[srow]);
      ps[t] = pr;
      dss[t] = pr * (dp - delta[srow]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      float ak = 0.0f, av = 0.0f;
      for (int t = j; t < T; ++t) {
        const int64_t qoff = ((static_cast<int64_t>(b) * T + t) * H + h) * D;
        ak += dss[t] * q[qoff + i];
        av += ps[t] * dout[qoff + i];
      }
      dka[i] += ak * scale;
      dva[i] += av;
    }
    __syncthreads();  // ps and dss are refilled for the next head
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    dk[koff + i] = dka[i];
    dv[koff + i] = dva[i];
  }
}

__global__ void CrossEntropyRowsKernel(float* logits, uint16_t* d16, float* row_loss,
                                       const int32_t* targets, int vocab, float scale,
                                       bool grad) {
  __shared__ float red[32];
  float* l = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  uint16_t* h = d16 ? d16 + static_cast<int64_t>(blockIdx.x) * vocab : nullptr;
  const int tgt = targets[blockIdx.x];
  if (tgt < 0) {
    if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
    if (grad) {
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        l[i] = 0.0f;
        if (h) h[i] = 0;
      }
    }
    return;
  }
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, l[i]);
  mx = BlockReduce<true>(mx, red);
  float sum = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(l[i] - mx);
  sum = BlockReduce<false>(sum, red);
  const float lse = mx + logf(sum);
  const float lt = l[tgt];
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - lt;
  if (!grad) return;
  __syncthreads();  // every thread has read l[tgt] before it is overwritten
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float g = (expf(l[i] - lse) - (i == tgt ? 1.0f : 0.0f)) * scale;
    l[i] = g;
    if (h) h[i] = ToBF16(g);
  }
}

// Lets `kernel` use `bytes` of dynamic shared memory when that is above the default.
template <class K>
void AllowShared(K kernel, size_t bytes) {
  if (bytes > kDefaultSharedBytes) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
  }
}

}  // namespace

void RmsNorm(float* out, const float* x, const float* w, int64_t rows, int64_t dim, float eps,
             cudaStream_t stream) {
  if (rows == 0) return;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      out, x, w, static_cast<int>(dim), eps);
}

void RmsNormBackward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                     int64_t rows, int64_t dim, float eps, bool accumulate_dx,
                     float* rstd_scratch, cudaStream_t stream) {
  if (rows == 0) return;
  RmsNormBackwardRows<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      dx, rstd_scratch, dy, x, w, static_cast<int>(dim), eps, accumulate_dx);
  if (dw != nullptr) {
    RmsNormBackwardWeight<<<static_cast<unsigned>((dim + kThreads - 1) / kThreads), kThreads, 0,
                            stream>>>(dw, dy, x, rstd_scratch, rows, static_cast<int>(dim));
  }
}

void Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int32_t* positions,
          float theta, bool backward, cudaStream_t stream) {
  const int64_t total = n * heads * (head_dim / 2);
  if (total == 0) return;
  RopeKernel<<<Blocks(total, kThreads), kThreads, 0, stream>>>(
      x, n, static_cast<int>(heads), static_cast<int>(head_dim), positions, theta, backward);
}

void SwiGLU(float* out, const float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  SwiGLUKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(out, gate, up, n);
}

void SwiGLUBackward(float* dgate, float* dup, const float* dout, const float* gate,
                    const float* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  SwiGLUBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dgate, dup, dout, gate, up,
                                                                     n);
}

void Add(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  AddKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(y, x, n);
}

void ConvertToBF16(uint16_t* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  ToBF16Kernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dst, src, n);
}

int64_t AttentionMaxSeq(int64_t D, int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    optin = static_cast<int>(kDefaultSharedBytes);
  }
  // The dk/dv kernel needs the most: 4D + 2T floats (plus 32 for the reductions' static array).
  const int64_t floats = optin / static_cast<int64_t>(sizeof(float)) - 32;
  return (floats - 4 * D) / 2;
}

void AttentionForward(float* out, float* lse, const float* q, const float* k, const float* v,
                      int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                      cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(D + T) * sizeof(float);
  AllowShared(AttnForwardKernel, shared);
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(H), static_cast<unsigned>(B));
  AttnForwardKernel<<<grid, kAttnThreads, shared, stream>>>(
      out, lse, q, k, v, static_cast<int>(T), static_cast<int>(H), static_cast<int>(KV),
      static_cast<int>(D), 1.0f / sqrtf(static_cast<float>(D)));
}

void AttentionBackward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                       const float* k, const float* v, const float* out, const float* lse,
                       int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D,
                       float* delta_scratch, cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const size_t shared_q = static_cast<size_t>(2 * D + T) * sizeof(float);
  AllowShared(AttnBackwardQKernel, shared_q);
  const dim3 grid_q(static_cast<unsigned>(T), static_cast<unsigned>(H), static_cast<unsigned>(B));
  AttnBackwardQKernel<<<grid_q, kAttnThreads, shared_q, stream>>>(
      dq, delta_scratch, dout, q, k, v, out, lse, static_cast<int>(T), static_cast<int>(H),
      static_cast<int>(KV), static_cast<int>(D), scale);
  const size_t shared_kv = static_cast<size_t>(4 * D + 2 * T) * sizeof(float);
  AllowShared(AttnBackwardKVKernel, shared_kv);
  const dim3 grid_kv(static_cast<unsigned>(T), static_cast<unsigned>(KV),
                     static_cast<unsigned>(B));
  AttnBackwardKVKernel<<<grid_kv, kAttnThreads, shared_kv, stream>>>(
      dk, dv, dout, q, k, v, lse, delta_scratch, static_cast<int>(T), static_cast<int>(H),
      static_cast<int>(KV), static_cast<int>(D), scale);
}

void CrossEntropyRows(float* logits, uint16_t* dlogits16, float* row_loss,
                      const int32_t* targets, int64_t rows, int64_t vocab, float grad_scale,
                      bool grad, cudaStream_t stream) {
  if (rows == 0) return;
  CrossEntropyRowsKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, dlogits16, row_loss, targets, static_cast<int>(vocab), grad_scale, grad);
}

}  // namespace strata::kernels::cuda
