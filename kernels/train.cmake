# Training ops (kernels/train.h): backward of every op, chunked cross-entropy, AdamW. Included
# from kernels/CMakeLists.txt after strata_kernels is defined (OpenBLAS comes from ops.cmake).
target_sources(strata_kernels PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cpu/train.cc)
# -O3 vectorizes the lane-array loops (-fno-math-errno lets it vectorize sqrtf in AdamW, 4x);
# the exp-heavy row loops are also cloned for x86-64-v3/v4 with target_clones and picked at load
# time, so no ISA flag is needed here and the binary runs on any x86-64.
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu/train.cc PROPERTIES
  COMPILE_OPTIONS "-O3;-fno-math-errno")
