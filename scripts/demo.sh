#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds strata, then
#  1. builds a small random-weight Llama locally (a real Hugging Face folder with a SentencePiece
#     tokenizer; no downloads), shards it for 2 ranks and generates text on 2 ranks with tensor
#     parallelism (the weights are random until training lands, so the text is gibberish);
#  2. runs the allreduce benchmark (star, ring, tree and Open MPI's own MPI_Allreduce over the
#     mpi and tcp transports) on 4 ranks of this host and prints its table.
#   scripts/demo.sh [extra `strata bench allreduce` options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/common.sh"

"$ROOT/scripts/install-deps.sh"
BUILD="${STRATA_BUILD_DIR:-$ROOT/build}"
echo "demo.sh: building in $BUILD"
strata_build "$BUILD" strata
STRATA="$BUILD/launcher/strata"

WORK="$BUILD/demo"
rm -rf "$WORK"
mkdir -p "$WORK"
echo "demo.sh: making a small random Llama in $WORK/model"
/usr/bin/python3 "$ROOT/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
"$STRATA" shard --model "$WORK/model" --ranks 2 --out "$WORK/shards-2"
echo "demo.sh: mpirun -np 2 strata infer (tensor-parallel, star allreduce, window of 2 blocks)"
mpirun -np 2 --oversubscribe "$STRATA" infer --shards "$WORK/shards-2" \
  --prompt "Once upon a time" --max-tokens 32 --seed 1

RANKS="${STRATA_DEMO_RANKS:-4}"
OUT="$BUILD/allreduce-demo.json"
echo "demo.sh: mpirun -np $RANKS strata bench allreduce (results also in $OUT)"
mpirun -np "$RANKS" --oversubscribe "$STRATA" bench allreduce \
  --algorithms star,ring,tree,native --transport mpi,tcp --sizes 8,4096,65536,1048576 \
  --iters 100 --warmup 10 --out "$OUT" "$@"
