// Reduce kernels compiled for avx2 (flags set in kernels/CMakeLists.txt).
#define STRATA_REDUCE_NS avx2
#include "kernels/cpu/reduce_impl.inc"
