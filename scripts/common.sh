# Shared by scripts/test.sh and scripts/demo.sh: environment for Open MPI on small machines.
# Sourced, not run.

# Running as root (containers, CI) needs Open MPI's explicit consent.
if [[ $(id -u) -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# More ranks than cores: let ranks yield instead of spinning (latencies go from us to ms otherwise).
export OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1

# strata_build BUILD_DIR TARGET: configure (warnings are errors, tests and benchmarks on, so
# test.sh and demo.sh share one build folder without reconfiguring it back and forth) and build
# TARGET ("all" for everything).
strata_build() {
  local dir="$1" target="$2"
  local jobs="${STRATA_BUILD_JOBS:-$(nproc)}"
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTRATA_WERROR=ON \
    -DSTRATA_BUILD_TESTS=ON -DSTRATA_BUILD_BENCH=ON >/dev/null
  cmake --build "$dir" -j "$jobs" --target "$target"
}
