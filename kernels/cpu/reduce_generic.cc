// Reduce kernels compiled for generic (flags set in kernels/CMakeLists.txt).
#define STRATA_REDUCE_NS generic
#include "kernels/cpu/reduce_impl.inc"
