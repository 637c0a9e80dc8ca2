# Linear, attention and elementwise kernels (kernels/ops.h, kernels/quant.h). Included from
# kernels/CMakeLists.txt after strata_kernels is defined.
# Prefill sgemm goes through oneDNN (kernels/cpu/sgemm.h, linked in train.cmake).
target_sources(strata_kernels PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cpu/ops.cc
  ${CMAKE_CURRENT_LIST_DIR}/cpu/quant.cc
  ${CMAKE_CURRENT_LIST_DIR}/cpu/ops_generic.cc
  ${CMAKE_CURRENT_LIST_DIR}/cpu/ops_avx2.cc
  ${CMAKE_CURRENT_LIST_DIR}/cpu/ops_avx512.cc)
# -O3 lets GCC vectorize the plain loops (attention's weighted sum of V) for each target.
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu/ops_generic.cc PROPERTIES
  COMPILE_OPTIONS "-O3")
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu/ops_avx2.cc PROPERTIES
  COMPILE_OPTIONS "-O3;-mavx2;-mfma;-mf16c")
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu/ops_avx512.cc PROPERTIES
  COMPILE_OPTIONS "-O3;-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni;-mavx2;-mfma;-mf16c")
