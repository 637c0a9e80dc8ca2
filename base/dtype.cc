#include "base/dtype.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <type_traits>

namespace strata {
namespace {

constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16,
                                DType::kI8,  DType::kI32, DType::kI64};

// Rounds an integer to f32 with round-to-odd: exact values stay, inexact ones take whichever of
// the two neighbouring floats has an odd last mantissa bit. Because f32 carries at least two more
// bits than f16 and bf16, rounding that result to nearest even again gives the correctly rounded
// 16-bit value; going through an ordinary nearest-even f32 would round twice and can be off by one
// ulp on ties.
float IntToF32RoundToOdd(int64_t x) {
  float f = static_cast<float>(x);
  constexpr int64_t kExactLimit = int64_t{1} << 24;
  if (x >= -kExactLimit && x <= kExactLimit) return f;
  int cmp;  // sign of x - f, computed without overflowing int64
  if (f >= 0x1p63f) {
    cmp = -1;  // x <= INT64_MAX < 2^63 <= f
  } else {
    auto fi = static_cast<int64_t>(f);
    cmp = (x > fi) - (x < fi);
  }
  if (cmp == 0 || (dtype_internal::FloatBits(f) & 1u) != 0) return f;
  // Adjacent floats alternate in parity, so the neighbour towards x is the odd one.
  return std::nextafter(f, cmp > 0 ? std::numeric_limits<float>::infinity()
                                   : -std::numeric_limits<float>::infinity());
}

template <class I>
I SaturateFloat(float v) {
  if (std::isnan(v)) return 0;
  // nearbyint in the default rounding mode rounds ties to even. The integer limits are powers of
  // two (minus one), so comparing in double is exact where it matters: for i64 the max converts to
  // 2^63, and anything that large saturates.
  double r = std::nearbyint(static_cast<double>(v));
  if (r <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(r);
}

template <class I>
I SaturateInt(int64_t v) {
  return static_cast<I>(
      std::clamp<int64_t>(v, std::numeric_limits<I>::min(), std::numeric_limits<I>::max()));
}

// Per type: how an element is stored, loaded (as float for float types, int64 for integers) and
// stored back from either.
template <DType T>
struct Traits;

template <>
struct Traits<DType::kF32> {
  using Storage = float;
  static float Load(float v) { return v; }
  static float FromFloat(float v) { return v; }
  static float FromInt(int64_t v) { return static_cast<float>(v); }
};

template <>
struct Traits<DType::kF16> {
  using Storage = uint16_t;
  static float Load(uint16_t v) { return F16ToF32(v); }
  static uint16_t FromFloat(float v) { return F32ToF16(v); }
  static uint16_t FromInt(int64_t v) { return F32ToF16(IntToF32RoundToOdd(v)); }
};

template <>
struct Traits<DType::kBF16> {
  using Storage = uint16_t;
  static float Load(uint16_t v) { return BF16ToF32(v); }
  static uint16_t FromFloat(float v) { return F32ToBF16(v); }
  static uint16_t FromInt(int64_t v) { return F32ToBF16(IntToF32RoundToOdd(v)); }
};

template <class I>
struct IntTraits {
  using Storage = I;
  static int64_t Load(I v) { return v; }
  static I FromFloat(float v) { return SaturateFloat<I>(v); }
  static I FromInt(int64_t v) { return SaturateInt<I>(v); }
};
template <>
struct Traits<DType::kI8> : IntTraits<int8_t> {};
template <>
struct Traits<DType::kI32> : IntTraits<int32_t> {};
template <>
struct Traits<DType::kI64> : IntTraits<int64_t> {};

template <DType S, DType D>
void ConvertTyped(const void* src, void* dst, size_t count) {
  const auto* in = static_cast<const typename Traits<S>::Storage*>(src);
  auto* out = static_cast<typename Traits<D>::Storage*>(dst);
  for (size_t i = 0; i < count; ++i) {
    auto v = Traits<S>::Load(in[i]);
    if constexpr (std::is_same_v<decltype(v), float>) {
      out[i] = Traits<D>::FromFloat(v);
    } else {
      out[i] = Traits<D>::FromInt(v);
    }
  }
}

template <DType S>
void ConvertFrom(const void* src, void* dst, DType dst_type, size_t count) {
  switch (dst_type) {
    case DType::kF32: return ConvertTyped<S, DType::kF32>(src, dst, count);
    case DType::kF16: return ConvertTyped<S, DType::kF16>(src, dst, count);
    case DType::kBF16: return ConvertTyped<S, DType::kBF16>(src, dst, count);
    case DType::kI8: return ConvertTyped<S, DType::kI8>(src, dst, count);
    case DType::kI32: return ConvertTyped<S, DType::kI32>(src, dst, count);
    case DType::kI64: return ConvertTyped<S, DType::kI64>(src, dst, count);
  }
  STRATA_CHECK_MSG(false, "invalid destination dtype {}", static_cast<int>(dst_type));
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) ==
           std::tolower(static_cast<unsigned char>(y));
  });
}

}  // namespace

const char* DTypeName(DType type) {
  switch (type) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kI8: return "i8";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

StatusOr<DType> ParseDType(std::string_view name) {
  for (DType type : kAllDTypes) {
    if (EqualsIgnoreCase(name, DTypeName(type))) return type;
  }
  return Status::InvalidArgument(
      fmt::format("unknown dtype '{}' (valid: f32, f16, bf16, i8, i32, i64)", name));
}

void ConvertBuffer(const void* src, DType src_type, void* dst, DType dst_type, size_t count) {
  if (count == 0) return;
  STRATA_CHECK(src != nullptr && dst != nullptr);
  if (src_type == dst_type) {
    // A plain copy keeps NaN payloads bit for bit; memmove allows src == dst.
    std::memmove(dst, src, count * DTypeSize(src_type));
    return;
  }
  switch (src_type) {
    case DType::kF32: return ConvertFrom<DType::kF32>(src, dst, dst_type, count);
    case DType::kF16: return ConvertFrom<DType::kF16>(src, dst, dst_type, count);
    case DType::kBF16: return ConvertFrom<DType::kBF16>(src, dst, dst_type, count);
    case DType::kI8: return ConvertFrom<DType::kI8>(src, dst, dst_type, count);
    case DType::kI32: return ConvertFrom<DType::kI32>(src, dst, dst_type, count);
    case DType::kI64: return ConvertFrom<DType::kI64>(src, dst, dst_type, count);
  }
  STRATA_CHECK_MSG(false, "invalid source dtype {}", static_cast<int>(src_type));
}

}  // namespace strata
