#!/usr/bin/env bash
# Probe behind BENCHMARKS §11 (the benchmark's cache drop): crash, then optionally the disk
# write and/or drop_caches, then the memory resume, printing its copy times. Needs the 200m
# config and tokens that restore_copy_ab.sh writes to /tmp/nt/w.
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
W=/tmp/nt/w; S=$(cd "$(dirname "$0")/../.." && pwd)/build/launcher/strata
ARGS=(--config $W/config.json --data $W/tokens.i32 --steps 4 --batch 4 --seq 128 --threads 1 --warmup 1 --json)
for pre in none dd drop dd+drop none dd+drop; do
  R=ntcmp2-$$-$RANDOM
  mpirun --oversubscribe -np 2 $S train "${ARGS[@]}" --run $R --fail-at-step 3 --fail-rank 1 > /dev/null 2>&1
  case $pre in *dd*) for f in /dev/shm/strata-snap-$R-r*-s0; do dd if=$f of=$W/ck-$(basename $f) bs=4M conv=fsync status=none; done;; esac
  case $pre in *drop*) sync; echo 3 > /proc/sys/vm/drop_caches;; esac
  STRATA_LOG_LEVEL=debug STRATA_LOG_SUBSYS=ckpt mpirun --oversubscribe -np 2 $S train "${ARGS[@]}" --run $R --resume auto > /dev/null 2> $W/r.err
  rm -f $W/ck-*
  echo "$pre: $(grep -o "restored in [0-9.]* s" $W/r.err | head -1) | $(grep -o "copy and checksum [0-9.]* s" $W/r.err | grep -v " 0.000" | tr '\n' ' ')"
done
