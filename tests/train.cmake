# Training: the executor and data-parallel step against PyTorch (tests/reference/train_ref.py),
# and strata train end to end on 1 and 2 ranks.
strata_add_test(train_test SOURCES train_test.cc DEPS strata_parallel)
target_compile_definitions(train_test PRIVATE
  STRATA_SOURCE_DIR="${PROJECT_SOURCE_DIR}" STRATA_PYTHON="/usr/bin/python3")
add_test(NAME strata_train_cli COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/train_cli_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR})
set_tests_properties(strata_train_cli PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi" TIMEOUT 600)
# Fault injection: rank crash, snapshotd killed, node memory lost (disk fallback), corruption;
# every resume is checked byte for byte against an unbroken run.
add_test(NAME strata_train_fault COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/train_fault_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR})
set_tests_properties(strata_train_fault PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi;fault" TIMEOUT 600)
# Node loss across 3 network-namespace "nodes" (scripts/netns-cluster.sh): one node rebuilt by
# erasure decoding from the survivors, two nodes (more than m) back to disk; every resume checked
# byte for byte against an unbroken run. Skipped (77) where namespaces cannot be created.
add_test(NAME strata_train_ec_fault COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/train_ec_fault_test.sh
         $<TARGET_FILE:strata> ${PROJECT_SOURCE_DIR})
set_tests_properties(strata_train_ec_fault PROPERTIES
  ENVIRONMENT "${STRATA_MPI_TEST_ENV}" LABELS "mpi;fault;netns" TIMEOUT 300
  SKIP_RETURN_CODE 77)
