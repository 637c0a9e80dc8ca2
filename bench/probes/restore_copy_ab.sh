#!/usr/bin/env bash
# Probe behind BENCHMARKS §11 (streaming-store copies): alternates two strata binaries
# (/tmp/nt/strata-old, /tmp/nt/strata-new: build each commit and copy launcher/strata there) on
# the 200m shape, 2 ranks: snapshot time, then a rank crash and the restore's copy times.
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
W=/tmp/nt/w; mkdir -p $W
source $(cd "$(dirname "$0")/../.." && pwd)/bench/model_sizes.sh; bench_model_config 200m > $W/config.json
[[ -f $W/tokens.i32 ]] || /usr/bin/python3 -c "
import numpy as np
np.random.default_rng(0).integers(0, 8192, 1_000_000, dtype=np.int32).astype('<i4').tofile('$W/tokens.i32')"
ARGS=(--config $W/config.json --data $W/tokens.i32 --steps 4 --batch 4 --seq 128 --threads 1 --warmup 1 --json)
for v in old new old new old new old new; do
  S=/tmp/nt/strata-$v; R=ntcmp-$v-$$-$RANDOM
  mpirun --oversubscribe -np 2 $S train "${ARGS[@]}" --run $R-s > /dev/null 2> $W/s.err
  snap=$(grep -o "[0-9.]* s each.*GB/s per rank" $W/s.err | sed "s/(copy.*overlapped), //" | head -1)
  mpirun --oversubscribe -np 2 $S train "${ARGS[@]}" --run $R --fail-at-step 3 --fail-rank 1 > /dev/null 2>&1
  STRATA_LOG_LEVEL=debug STRATA_LOG_SUBSYS=ckpt mpirun --oversubscribe -np 2 $S train "${ARGS[@]}" --run $R --resume auto > /dev/null 2> $W/r.err
  rest=$(grep -o "restored in [0-9.]* s" $W/r.err | head -1)
  copy=$(grep -o "copy and checksum [0-9.]* s" $W/r.err | tr '\n' ' ')
  echo "$v: snapshot $snap | $rest | $copy"
done
