// One Reduce2 implementation per instruction set; reduce.cc picks one at run time.
#pragma once

#include <cstddef>

#include "base/dtype.h"
#include "kernels/reduce.h"

namespace strata::kernels {
namespace generic {
void Reduce2(void* dst, const void* a, const void* b, size_t n, DType dtype, ReduceOp op);
}
namespace avx2 {
void Reduce2(void* dst, const void* a, const void* b, size_t n, DType dtype, ReduceOp op);
}
namespace avx512 {
void Reduce2(void* dst, const void* a, const void* b, size_t n, DType dtype, ReduceOp op);
}
}  // namespace strata::kernels
