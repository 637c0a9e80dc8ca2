# kernels/train.h: every backward against PyTorch autograd and finite differences, determinism.
strata_add_test(kernels_train_test SOURCES kernels_train_test.cc DEPS strata_kernels)
target_compile_definitions(kernels_train_test PRIVATE
  STRATA_SOURCE_DIR="${PROJECT_SOURCE_DIR}" STRATA_PYTHON="/usr/bin/python3")
