#include "kernels/quant.h"

#include <math.h>

#include "base/check.h"
#include "base/dtype.h"

namespace strata::kernels {

void QuantizeRowsQ8_0(const float* src, void* dst, int64_t rows, int64_t cols) {
  STRATA_CHECK_EQ(cols % kQ8BlockSize, 0);
  const int64_t nb = rows * cols / kQ8BlockSize;
  auto* out = static_cast<BlockQ8_0*>(dst);
  for (int64_t b = 0; b < nb; ++b) {
    const float* x = src + b * kQ8BlockSize;
    float amax = 0.0f;
    for (int i = 0; i < kQ8BlockSize; ++i) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].d = F32ToF16(d);
    for (int i = 0; i < kQ8BlockSize; ++i) {
      out[b].qs[i] = static_cast<int8_t>(roundf(x[i] * id));  // |x * id| <= 127
    }
  }
}

void DequantizeRowsQ8_0(const void* src, float* dst, int64_t rows, int64_t cols) {
  STRATA_CHECK_EQ(cols % kQ8BlockSize, 0);
  const int64_t nb = rows * cols / kQ8BlockSize;
  const auto* in = static_cast<const BlockQ8_0*>(src);
  for (int64_t b = 0; b < nb; ++b) {
    const float d = F16ToF32(in[b].d);
    for (int i = 0; i < kQ8BlockSize; ++i) dst[b * kQ8BlockSize + i] = d * in[b].qs[i];
  }
}

}  // namespace strata::kernels
