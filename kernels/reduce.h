// Elementwise reductions used by collectives: dst = op(dst, src) over raw memory.
#pragma once

#include <cstddef>
#include <string_view>

#include "base/dtype.h"
#include "base/status.h"

namespace strata::kernels {

enum class ReduceOp { kSum, kMax };

const char* ReduceOpName(ReduceOp op);
StatusOr<ReduceOp> ParseReduceOp(std::string_view name);

// Whether `op` is defined for `dtype` (sum and max are defined for every dtype).
bool ReduceSupported(DType dtype, ReduceOp op);

// dst[i] = op(dst[i], src[i]) for i in [0, count). bf16/f16 are widened to f32, combined and
// rounded to nearest-even once per element; integers wrap on overflow like unsigned arithmetic.
// dst and src may not partially overlap.
void ReduceInto(void* dst, const void* src, size_t count, DType dtype, ReduceOp op);

// dst[i] = op(a[i], b[i]). dst may alias a or b.
void Reduce2(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op);

// The instruction set the dispatcher picked on this CPU: "avx512", "avx2" or "generic".
const char* ReduceIsa();

}  // namespace strata::kernels
