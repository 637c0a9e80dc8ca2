// Linear and attention kernels compiled for generic (flags set in kernels/ops.cmake).
#define STRATA_OPS_NS generic
#include "kernels/cpu/ops_impl.inc"
