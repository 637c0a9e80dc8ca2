# Tensor-parallel inference matrix (N = 1..4 ranks, uneven --ratios, star/ring/tree allreduce)
# against one rank, and 32 greedy tokens against PyTorch, through strata shard + mpirun strata
# infer.
add_test(NAME strata_infer_matrix COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/infer_matrix_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR})
set_tests_properties(strata_infer_matrix PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi" TIMEOUT 300 PROCESSORS 4)

# The same against PyTorch and across 1-3 ranks for a Mistral-style model whose sliding_window (6)
# is shorter than the prompt.
add_test(NAME strata_infer_sliding_window COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/infer_matrix_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR} 6)
set_tests_properties(strata_infer_sliding_window PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi" TIMEOUT 300 PROCESSORS 3)
