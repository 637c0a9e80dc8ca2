// Linear and attention kernels compiled for avx2 (flags set in kernels/ops.cmake).
#define STRATA_OPS_NS avx2
#include "kernels/cpu/ops_impl.inc"
