// q8_0 weight quantization, bit-compatible with ggml's GGML_TYPE_Q8_0: each row is cut into
// blocks of 32 consecutive values; a block stores an f16 scale d and 32 int8 q, value = d * q.
#pragma once

#include <cstdint>

namespace strata::kernels {

inline constexpr int64_t kQ8BlockSize = 32;

struct BlockQ8_0 {
  uint16_t d;      // f16 bits of the scale
  int8_t qs[32];   // quantized values
};
static_assert(sizeof(BlockQ8_0) == 34, "q8_0 blocks are 34 bytes, as in ggml");

// Quantizes rows x cols floats (cols a multiple of 32) into rows * cols / 32 blocks:
// d = max|x| / 127, q = round(x / d) (nearest, halves away from zero). Each value comes back
// within |d|/2 plus the f16 rounding of d (at most 127 * |d| * 2^-11).
void QuantizeRowsQ8_0(const float* src, void* dst, int64_t rows, int64_t cols);
void DequantizeRowsQ8_0(const void* src, float* dst, int64_t rows, int64_t cols);

}  // namespace strata::kernels
