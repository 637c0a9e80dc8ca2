#!/usr/bin/env bash
# Installs what is missing, builds strata (warnings are errors) and runs every test:
# GoogleTest units, multi-rank tests under mpirun (2, 3, 4 and 8 ranks), fault-injection tests.
# With CI=true (or STRATA_TEST_ASAN=1) the unit and fault tests run a second time in an
# AddressSanitizer build (build-asan/).
#   scripts/test.sh                 everything
#   scripts/test.sh -L unit         only tests with a CTest label (unit, mpi, fault)
# Extra arguments go to ctest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/common.sh"

"$ROOT/scripts/install-deps.sh"
BUILD="${STRATA_BUILD_DIR:-$ROOT/build}"
echo "test.sh: building in $BUILD"
strata_build "$BUILD" all
echo "test.sh: running tests"
(cd "$BUILD" && ctest --output-on-failure --timeout 900 "$@")

if [[ "${STRATA_TEST_ASAN:-${CI:-false}}" == "1" || "${STRATA_TEST_ASAN:-${CI:-false}}" == "true" ]]; then
  ASAN_BUILD="$ROOT/build-asan"
  echo "test.sh: AddressSanitizer build in $ASAN_BUILD"
  cmake -S "$ROOT" -B "$ASAN_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSTRATA_SANITIZE=address \
    -DSTRATA_WERROR=ON -DSTRATA_WITH_CUDA=OFF -DSTRATA_BUILD_BENCH=OFF >/dev/null
  cmake --build "$ASAN_BUILD" -j "${STRATA_BUILD_JOBS:-$(nproc)}"
  # Open MPI's own allocations are reported as leaks at exit; memory errors still abort.
  (cd "$ASAN_BUILD" && ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure --timeout 900 -L unit)
fi
