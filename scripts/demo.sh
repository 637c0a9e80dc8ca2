#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds strata, and runs the
# multi-rank allreduce benchmark (star, ring, tree and Open MPI's own MPI_Allreduce, over the mpi
# and tcp transports) on 4 ranks of this host, printing the latency table.
# (Until tensor-parallel inference lands, this benchmark is the main job.)
#   scripts/demo.sh [extra `strata bench allreduce` options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/common.sh"

"$ROOT/scripts/install-deps.sh"
BUILD="${STRATA_BUILD_DIR:-$ROOT/build}"
echo "demo.sh: building in $BUILD"
strata_build "$BUILD" strata
RANKS="${STRATA_DEMO_RANKS:-4}"
OUT="$BUILD/allreduce-demo.json"
echo "demo.sh: mpirun -np $RANKS strata bench allreduce (results also in $OUT)"
mpirun -np "$RANKS" --oversubscribe "$BUILD/launcher/strata" bench allreduce \
  --algorithms star,ring,tree,native --transport mpi,tcp --sizes 8,4096,65536,1048576 \
  --iters 100 --warmup 10 --out "$OUT" "$@"
