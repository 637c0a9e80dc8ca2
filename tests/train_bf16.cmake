# Mixed precision (strata train --precision bf16): the bf16 GEMM and conversion, the executor in
# bf16 against f32, and the command end to end. Each skips, saying why, where oneDNN cannot run
# bf16 (a CPU without AVX-512); with AVX-512 but no AVX512-BF16 oneDNN emulates and they run.
strata_add_test(gemm_bf16_test SOURCES gemm_bf16_test.cc DEPS strata_kernels)
strata_add_test(train_bf16_test SOURCES train_bf16_test.cc DEPS strata_runtime strata_memory)
add_test(NAME strata_train_bf16_cli COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/train_bf16_cli_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR})
set_tests_properties(strata_train_bf16_cli PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi" TIMEOUT 600 SKIP_RETURN_CODE 77)
