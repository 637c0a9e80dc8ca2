#!/usr/bin/env bash
# Installs what is missing, builds strata (warnings are errors) and runs every test:
# GoogleTest units, multi-rank tests under mpirun (2, 3, 4 and 8 ranks), fault-injection tests.
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
cd "$BUILD"
ctest --output-on-failure --timeout 900 "$@"
