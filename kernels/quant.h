// q8_0 weight quantization: each row is cut into blocks of 32 consecutive values; a block has an
// f16 scale d and 32 int8 q, value = d * q (ggml's GGML_TYPE_Q8_0 values and scales). The bytes are
// laid out per row, not per block: a row of K weights is its K int8 values, then its K / 32 f16
// scales. Rows stay self-contained, so matrices stored back to back are one matrix with more rows
// (decode multiplies q, k and v as one), and a row's values are one contiguous run that the
// decode kernel reads 64 bytes at a time: ggml's interleaved 34-byte blocks cost it two unaligned
// half loads per pair of blocks and a word shuffle per eight scales, and capped one core at
// 70 GB/s in L2 against 110 with this layout (docs/DECISIONS.md, "q8_0 rows: values, then scales").
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata::kernels {

inline constexpr int64_t kQ8BlockSize = 32;

// Bytes of one q8_0 row of `cols` values (a multiple of 32): 34 per block of 32, as in ggml.
inline constexpr size_t Q8RowBytes(int64_t cols) {
  return static_cast<size_t>(cols) + static_cast<size_t>(cols / kQ8BlockSize) * 2;
}
// Row r of a q8_0 matrix with `cols` columns: its values, and its f16 scales (bits).
inline const int8_t* Q8RowValues(const void* w, int64_t cols, int64_t r) {
  return static_cast<const int8_t*>(w) + static_cast<size_t>(r) * Q8RowBytes(cols);
}
inline const uint16_t* Q8RowScales(const void* w, int64_t cols, int64_t r) {
  return reinterpret_cast<const uint16_t*>(Q8RowValues(w, cols, r) + cols);
}

// Quantizes rows x cols floats (cols a multiple of 32) into rows * Q8RowBytes(cols) bytes:
// d = max|x| / 127, q = round(x / d) (nearest, halves away from zero). Each value comes back
// within |d|/2 plus the f16 rounding of d (at most 127 * |d| * 2^-11).
void QuantizeRowsQ8_0(const float* src, void* dst, int64_t rows, int64_t cols);
void DequantizeRowsQ8_0(const void* src, float* dst, int64_t rows, int64_t cols);

}  // namespace strata::kernels
