#include "kernels/quant.h"

#include <math.h>

#include <cstring>

#include "base/check.h"
#include "base/dtype.h"

namespace strata::kernels {

void QuantizeRowsQ8_0(const float* src, void* dst, int64_t rows, int64_t cols) {
  STRATA_CHECK_EQ(cols % kQ8BlockSize, 0);
  const int64_t nb = cols / kQ8BlockSize;
  for (int64_t r = 0; r < rows; ++r) {
    auto* q = const_cast<int8_t*>(Q8RowValues(dst, cols, r));
    auto* d_out = reinterpret_cast<uint8_t*>(q + cols);  // f16 scales; may be 2-byte unaligned
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = src + r * cols + b * kQ8BlockSize;
      float amax = 0.0f;
      for (int i = 0; i < kQ8BlockSize; ++i) amax = fmaxf(amax, fabsf(x[i]));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      const uint16_t h = F32ToF16(d);
      std::memcpy(d_out + b * 2, &h, 2);
      for (int i = 0; i < kQ8BlockSize; ++i) {
        q[b * kQ8BlockSize + i] = static_cast<int8_t>(roundf(x[i] * id));  // |x * id| <= 127
      }
    }
  }
}

void DequantizeRowsQ8_0(const void* src, float* dst, int64_t rows, int64_t cols) {
  STRATA_CHECK_EQ(cols % kQ8BlockSize, 0);
  const int64_t nb = cols / kQ8BlockSize;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* q = Q8RowValues(src, cols, r);
    const auto* d_in = reinterpret_cast<const uint8_t*>(q + cols);
    for (int64_t b = 0; b < nb; ++b) {
      uint16_t h;
      std::memcpy(&h, d_in + b * 2, 2);
      const float d = F16ToF32(h);
      for (int i = 0; i < kQ8BlockSize; ++i) {
        dst[r * cols + b * kQ8BlockSize + i] = d * q[b * kQ8BlockSize + i];
      }
    }
  }
}

}  // namespace strata::kernels
