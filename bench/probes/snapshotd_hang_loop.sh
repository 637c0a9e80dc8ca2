#!/usr/bin/env bash
# Probe behind BENCHMARKS §11 (snapshotd hung mid-run): train_fault_test's scenario 6 N times
# (argument, default 6), one line per run: exit code, time, losses identical, snapshots.
# scenario 6 in a loop: N runs; prints per-run wall time and outcome
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
STRATA=$(cd "$(dirname "$0")/../.." && pwd)/build/launcher/strata; SRC=$(cd "$(dirname "$0")/../.." && pwd)
WORK=/tmp/h6/w; rm -rf $WORK; mkdir -p $WORK
MPIRUN=(timeout 150 mpirun --oversubscribe -np 2)
/usr/bin/python3 "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
for i in 1 2 3; do cat "$SRC/README.md"; done > "$WORK/corpus.txt"
LONG=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps 3000 --batch 4 --seq 32 --lr 1e-3 --warmup 10 --json --threads 1)
"${MPIRUN[@]}" "$STRATA" train "${LONG[@]}" --snapshot-every 0 > "$WORK/long-ref.jsonl" 2> /dev/null
for n in $(seq 1 ${1:-6}); do
  run="h6-$$-$n"; t0=$(date +%s.%N)
  STRATA_SNAPSHOTD_RPC_TIMEOUT_S=2 "${MPIRUN[@]}" "$STRATA" train "${LONG[@]}" --run "$run" > "$WORK/long.jsonl" 2> "$WORK/long-$n.err" &
  bg=$!
  until [[ $(grep -c '"step"' "$WORK/long.jsonl" 2> /dev/null || true) -ge $((50 + n * 97 % 400)) ]]; do kill -0 "$bg" 2>/dev/null || break; sleep 0.05; done
  "$STRATA" chaos hang-snapshotd --run "$run" > /dev/null
  wait "$bg"; rc=$?
  t1=$(date +%s.%N)
  same=no; cmp -s <(/usr/bin/python3 -c "import json,sys; [print(json.loads(l)['loss']) for l in open(sys.argv[1])]" "$WORK/long-ref.jsonl") <(/usr/bin/python3 -c "import json,sys; [print(json.loads(l)['loss']) for l in open(sys.argv[1])]" "$WORK/long.jsonl") && same=yes
  snaps=$(grep -o "[0-9]* snapshots of" "$WORK/long-$n.err" | head -1)
  repl=$(grep -c "does not answer; killed" "$WORK/long-$n.err")
  printf "run %d rc=%d %.1fs same=%s snaps='%s' replaced=%s\n" $n $rc $(echo "$t1-$t0"|bc) $same "$snaps" $repl
  "$STRATA" chaos kill-snapshotd --run "$run" >/dev/null 2>&1; rm -f /dev/shm/strata-snap-"$run"-* 
done
