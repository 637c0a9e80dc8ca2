// Linear and attention kernels compiled for avx512 (flags set in kernels/ops.cmake).
#define STRATA_OPS_NS avx512
#include "kernels/cpu/ops_impl.inc"
