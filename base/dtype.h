// Element types and conversions between them. The scalar 16-bit float conversions are inline
// because kernels and collectives call them per element in their inner loops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include <fmt/format.h>

#include "base/status.h"

namespace strata {

enum class DType : uint8_t { kF32, kF16, kBF16, kI8, kI32, kI64 };

constexpr size_t DTypeSize(DType type) {
  switch (type) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kI8: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
  }
  return 0;
}

constexpr bool IsFloating(DType type) {
  return type == DType::kF32 || type == DType::kF16 || type == DType::kBF16;
}

// "f32", "f16", "bf16", "i8", "i32", "i64".
const char* DTypeName(DType type);

// Inverse of DTypeName (case-insensitive); the error lists the valid names.
StatusOr<DType> ParseDType(std::string_view name);

namespace dtype_internal {
// memcpy rather than std::bit_cast so the functions below stay usable from code that is compiled
// in other modes; compilers turn it into a register move.
inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
}  // namespace dtype_internal

// f32 -> bf16, round to nearest even. NaN stays NaN (made quiet, sign and top payload bits kept);
// infinities stay infinite; finite values above the bf16 range round to infinity.
inline uint16_t F32ToBF16(float f) {
  uint32_t u = dtype_internal::FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // Truncating could clear every payload bit and turn the NaN into infinity.
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  // Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry out of the mantissa bumps
  // the exponent, which is exactly right (up to infinity at the top).
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Exact: every bf16 value is an f32 value.
inline float BF16ToF32(uint16_t h) {
  return dtype_internal::BitsFloat(static_cast<uint32_t>(h) << 16);
}

// f32 -> IEEE binary16, round to nearest even, with subnormals. Values at or above 65520 (halfway
// between 65504, the largest finite half, and 2^16) become infinity; NaN stays NaN (quiet, sign and
// top payload bits kept).
inline uint16_t F32ToF16(float f) {
  uint32_t x = dtype_internal::FloatBits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 and inf
  if (ax >= 0x38800000u) {
    // Normal half (>= 2^-14): rebias the exponent from 127 to 15, then drop 13 mantissa bits with
    // round-to-nearest-even; a carry into the exponent is again the right answer.
    uint32_t v = ax - 0x38000000u;
    v += 0xfffu + ((v >> 13) & 1u);
    return static_cast<uint16_t>(sign | (v >> 13));
  }
  // At most 2^-25, half the smallest subnormal: rounds to (signed) zero, the tie included.
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);
  // Subnormal half: the result is value / 2^-24 rounded to an integer. With the implicit bit the
  // f32 significand is mant * 2^(e - 150), so the integer is mant >> (126 - e), shift in [14, 24].
  uint32_t e = ax >> 23;
  uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126 - e;
  uint32_t q = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // q may reach 0x400, the smallest normal
  return static_cast<uint16_t>(sign | q);
}

// Exact: every binary16 value is an f32 value. NaN payloads are kept (a signaling NaN stays
// signaling).
inline float F16ToF32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalize, moving the leading one into the implicit position.
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return dtype_internal::BitsFloat(bits);
}

// Converts `count` elements from `src` (of `src_type`) to `dst` (of `dst_type`). The buffers must
// not overlap unless they are the same buffer with the same type.
//  - Float to float and integer to float round to nearest even, each correctly rounded once (an
//    integer is not rounded to f32 first and then again to f16/bf16). Out-of-range values become
//    infinity; NaN stays NaN.
//  - Float to integer rounds to nearest with ties to even (2.5 -> 2, 3.5 -> 4, as std::nearbyint
//    in the default rounding mode), saturates to the integer range, and maps NaN to 0.
//  - Integer to integer saturates.
void ConvertBuffer(const void* src, DType src_type, void* dst, DType dst_type, size_t count);

}  // namespace strata

template <>
struct fmt::formatter<strata::DType> : fmt::formatter<std::string_view> {
  auto format(strata::DType type, fmt::format_context& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(strata::DTypeName(type), ctx);
  }
};
