// Reduce kernels compiled for avx512 (flags set in kernels/CMakeLists.txt).
#define STRATA_REDUCE_NS avx512
#include "kernels/cpu/reduce_impl.inc"
