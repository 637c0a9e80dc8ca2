#include "kernels/reduce.h"

#include <cstdint>
#include <string>

#include "kernels/cpu/reduce_table.h"

namespace strata::kernels {
namespace {

using Reduce2Fn = void (*)(void*, const void*, const void*, size_t, DType, ReduceOp);

struct Impl {
  Reduce2Fn fn;
  const char* isa;
};

// Picked once: one binary runs on any x86-64 and uses the widest vectors the CPU has.
Impl PickImpl() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return {&avx512::Reduce2, "avx512"};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {&avx2::Reduce2, "avx2"};
  }
  return {&generic::Reduce2, "generic"};
}

const Impl& GetImpl() {
  static const Impl impl = PickImpl();
  return impl;
}

}  // namespace

void F16Tail(uint16_t* dst, const uint16_t* a, const uint16_t* b, size_t n, bool max) {
  for (size_t i = 0; i < n; ++i) {
    const float x = F16ToF32(a[i]);
    const float y = F16ToF32(b[i]);
    dst[i] = F32ToF16(max ? (x > y ? x : y) : x + y);
  }
}

const char* ReduceOpName(ReduceOp op) { return op == ReduceOp::kSum ? "sum" : "max"; }

StatusOr<ReduceOp> ParseReduceOp(std::string_view name) {
  if (name == "sum") return ReduceOp::kSum;
  if (name == "max") return ReduceOp::kMax;
  return Status::InvalidArgument("unknown reduce op '" + std::string(name) + "' (valid: sum, max)");
}

bool ReduceSupported(DType, ReduceOp) { return true; }

void ReduceInto(void* dst, const void* src, size_t count, DType dtype, ReduceOp op) {
  GetImpl().fn(dst, dst, src, count, dtype, op);
}

void Reduce2(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op) {
  GetImpl().fn(dst, a, b, count, dtype, op);
}

const char* ReduceIsa() { return GetImpl().isa; }

}  // namespace strata::kernels
