// Reduce kernels against a scalar reference computed in double and rounded once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "base/dtype.h"
#include "kernels/reduce.h"

namespace strata::kernels {
namespace {

// Random values of the dtype, as raw bytes, plus their float values.
std::vector<uint8_t> RandomBuffer(DType dt, size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  std::vector<float> f(n);
  for (float& x : f) x = dist(rng);
  std::vector<uint8_t> out(n * DTypeSize(dt));
  ConvertBuffer(f.data(), DType::kF32, out.data(), dt, n);
  return out;
}

double ValueAt(const std::vector<uint8_t>& b, DType dt, size_t i) {
  switch (dt) {
    case DType::kF32: { float v; std::memcpy(&v, &b[i * 4], 4); return v; }
    case DType::kBF16: { uint16_t v; std::memcpy(&v, &b[i * 2], 2); return BF16ToF32(v); }
    case DType::kF16: { uint16_t v; std::memcpy(&v, &b[i * 2], 2); return F16ToF32(v); }
    case DType::kI8: return static_cast<int8_t>(b[i]);
    case DType::kI32: { int32_t v; std::memcpy(&v, &b[i * 4], 4); return v; }
    case DType::kI64: { int64_t v; std::memcpy(&v, &b[i * 8], 8); return static_cast<double>(v); }
  }
  return 0;
}

// The expected element: exact combination, rounded to the dtype once (like the kernel, which
// widens halves to f32 where the sum of two halves is exact).
std::vector<uint8_t> Expected(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                              DType dt, ReduceOp op, size_t n) {
  std::vector<uint8_t> out(a.size());
  for (size_t i = 0; i < n; ++i) {
    const double x = ValueAt(a, dt, i), y = ValueAt(b, dt, i);
    const double r = op == ReduceOp::kSum ? x + y : std::max(x, y);
    uint8_t* dst = &out[i * DTypeSize(dt)];
    switch (dt) {
      case DType::kF32: { float v = static_cast<float>(r); std::memcpy(dst, &v, 4); break; }
      case DType::kBF16: { uint16_t v = F32ToBF16(static_cast<float>(r)); std::memcpy(dst, &v, 2); break; }
      case DType::kF16: { uint16_t v = F32ToF16(static_cast<float>(r)); std::memcpy(dst, &v, 2); break; }
      case DType::kI8: { int8_t v = static_cast<int8_t>(static_cast<uint8_t>(static_cast<int64_t>(r))); std::memcpy(dst, &v, 1); break; }
      case DType::kI32: { int32_t v = static_cast<int32_t>(static_cast<uint32_t>(static_cast<int64_t>(r))); std::memcpy(dst, &v, 4); break; }
      case DType::kI64: { int64_t v = static_cast<int64_t>(r); std::memcpy(dst, &v, 8); break; }
    }
  }
  return out;
}

class ReduceTest : public ::testing::TestWithParam<std::tuple<DType, ReduceOp, size_t>> {};

TEST_P(ReduceTest, MatchesScalarReference) {
  const auto [dt, op, n] = GetParam();
  std::mt19937 rng(static_cast<unsigned>(n) * 7 + static_cast<unsigned>(dt));
  const std::vector<uint8_t> a = RandomBuffer(dt, n, rng);
  const std::vector<uint8_t> b = RandomBuffer(dt, n, rng);
  const std::vector<uint8_t> want = Expected(a, b, dt, op, n);

  std::vector<uint8_t> into = a;
  ReduceInto(into.data(), b.data(), n, dt, op);
  EXPECT_EQ(into, want) << DTypeName(dt) << " " << ReduceOpName(op) << " n=" << n
                        << " isa=" << ReduceIsa();

  std::vector<uint8_t> two(a.size(), 0xAB);
  Reduce2(two.data(), a.data(), b.data(), n, dt, op);
  EXPECT_EQ(two, want);
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, ReduceTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16, DType::kF16, DType::kI8,
                                         DType::kI32, DType::kI64),
                       ::testing::Values(ReduceOp::kSum, ReduceOp::kMax),
                       // Sizes around vector widths so every tail path runs.
                       ::testing::Values(0, 1, 7, 15, 16, 17, 33, 64, 1000, 4099)));

TEST(Reduce, IntegerSumWrapsInsteadOfUndefinedBehaviour) {
  int32_t a[1] = {INT32_MAX};
  const int32_t b[1] = {1};
  ReduceInto(a, b, 1, DType::kI32, ReduceOp::kSum);
  EXPECT_EQ(a[0], INT32_MIN);
}

TEST(Reduce, Bf16SumRoundsToNearestEven) {
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1+2^-7: ties to even gives 1.
  uint16_t a[1] = {F32ToBF16(1.0f)};
  const uint16_t b[1] = {F32ToBF16(std::ldexp(1.0f, -8))};
  ReduceInto(a, b, 1, DType::kBF16, ReduceOp::kSum);
  EXPECT_EQ(a[0], 0x3F80);
}

// Infinities, NaNs (quiet and signalling payloads), signed zeros and subnormals through the
// vector and tail paths of the half-precision kernels, bit for bit against base's conversions.
TEST(Reduce, HalfPrecisionSpecialValuesMatchScalarConversions) {
  const std::vector<uint16_t> specials_bf16 = {0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1, 0x0000,
                                               0x8000, 0x0001, 0x8001, 0x7F7F, 0xFF7F, 0x3F80};
  const std::vector<uint16_t> specials_f16 = {0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE01, 0x0000,
                                              0x8000, 0x0001, 0x8001, 0x7BFF, 0xFBFF, 0x3C00};
  for (DType dt : {DType::kBF16, DType::kF16}) {
    const auto& sp = dt == DType::kBF16 ? specials_bf16 : specials_f16;
    std::vector<uint16_t> a, b;
    for (uint16_t x : sp) {
      for (uint16_t y : sp) {
        a.push_back(x);
        b.push_back(y);
      }
    }
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      std::vector<uint16_t> got = a;
      ReduceInto(got.data(), b.data(), a.size(), dt, op);
      for (size_t i = 0; i < a.size(); ++i) {
        const float x = dt == DType::kBF16 ? BF16ToF32(a[i]) : F16ToF32(a[i]);
        const float y = dt == DType::kBF16 ? BF16ToF32(b[i]) : F16ToF32(b[i]);
        const float r = op == ReduceOp::kSum ? x + y : (x > y ? x : y);
        const uint16_t want = dt == DType::kBF16 ? F32ToBF16(r) : F32ToF16(r);
        if (std::isnan(r)) {
          const float g = dt == DType::kBF16 ? BF16ToF32(got[i]) : F16ToF32(got[i]);
          EXPECT_TRUE(std::isnan(g)) << DTypeName(dt) << " " << i;
        } else {
          EXPECT_EQ(got[i], want) << DTypeName(dt) << " " << ReduceOpName(op) << " a=" << a[i]
                                  << " b=" << b[i];
        }
      }
    }
  }
}

TEST(Reduce, ParseOp) {
  EXPECT_EQ(*ParseReduceOp("sum"), ReduceOp::kSum);
  EXPECT_EQ(*ParseReduceOp("max"), ReduceOp::kMax);
  EXPECT_EQ(ParseReduceOp("avg").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata::kernels
