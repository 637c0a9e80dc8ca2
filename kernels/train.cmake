# Training ops (kernels/train.h): backward of every op, chunked cross-entropy, AdamW. Included
# from kernels/CMakeLists.txt after strata_kernels is defined (OpenBLAS comes from ops.cmake).
target_sources(strata_kernels PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cpu/train.cc
                                      ${CMAKE_CURRENT_LIST_DIR}/cpu/sgemm.cc)
# The training GEMMs go through oneDNN's sgemm (Debian's libdnnl-dev): it picks its AVX-512 /
# AMX kernels from the CPU itself, where OpenBLAS follows OPENBLAS_CORETYPE (environments that
# pin Haswell lose ~2x on AVX-512 machines). Its OpenMP runtime is held to one thread per
# calling thread: the pool does the threading.
find_package(dnnl CONFIG REQUIRED)
find_package(OpenMP REQUIRED COMPONENTS CXX)
target_link_libraries(strata_kernels PRIVATE DNNL::dnnl OpenMP::OpenMP_CXX)
# -O3 vectorizes the lane-array loops (-fno-math-errno lets it vectorize sqrtf in AdamW, 4x);
# the exp-heavy row loops are also cloned for x86-64-v3/v4 with target_clones and picked at load
# time, so no ISA flag is needed here and the binary runs on any x86-64.
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu/train.cc PROPERTIES
  COMPILE_OPTIONS "-O3;-fno-math-errno")
