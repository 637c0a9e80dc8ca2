# Shared by scripts/test.sh and scripts/demo.sh: environment for Open MPI on small machines.
# Sourced, not run.

# Running as root (containers, CI) needs Open MPI's explicit consent.
if [[ $(id -u) -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# More ranks than cores: let ranks yield instead of spinning (latencies go from us to ms otherwise).
export OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1

strata_build() {  # strata_build BUILD_DIR [cmake args...]
  local dir="$1"; shift
  local jobs="${STRATA_BUILD_JOBS:-$(nproc)}"
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
}
