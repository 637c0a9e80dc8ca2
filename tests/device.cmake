# Training devices (runtime/device.h): the CPU made discrete against the shared-memory CPU, bit
# for bit; CUDA ops and the executor on CUDA against the CPU (skipped, saying why, without a GPU).
strata_add_test(device_test SOURCES device_test.cc DEPS strata_runtime strata_memory)
