#!/usr/bin/env bash
# What in-memory snapshots cost and what they buy, in one run on this host (2 ranks, mpirun):
#  1. step time of `strata train` with a snapshot every step vs none (same model, batch, data);
#  2. snapshot bytes/s per rank (copy + CRC-32C + publish, overlapped with the next step);
#  3. recovery after a rank crash: the time to restore the state from snapshotd memory;
#  4. the same state as a conventional checkpoint on local disk: write + fsync time, and the
#     restore time reading it back with O_DIRECT (no page cache).
#  5. with NODES=N (N >= 2, root): node loss on N network-namespace nodes x 1 rank
#     (scripts/netns-cluster.sh), snapshots erasure-coded across them: node 2 is taken down
#     after step 2 (strata chaos kill-node) and the relaunch rebuilds its state from the others;
#     prints the rebuild (erasure decoding) time and the whole restore time.
#   bench/snapshot_bench.sh STRATA_BINARY [SIZE]     SIZE: 50m (default), 100m or 200m
# Environment: THREADS (per rank, default 1), BATCH (8), SEQ (256), STEPS (6), NODES (0: skip 5),
# KILL_AFTER (2: the node goes down once this many steps are done; a larger state per node
# needs more, since each version is group-committed only when its parity is across the nodes).
set -euo pipefail
STRATA="$1"; SIZE="${2:-50m}"
THREADS="${THREADS:-1}"; BATCH="${BATCH:-8}"; SEQ="${SEQ:-256}"; STEPS="${STEPS:-6}"
WORK="$(mktemp -d /var/tmp/strata-snap-bench-XXXXXX)"  # on disk, not tmpfs
RUN="snapbench$$"
NODES="${NODES:-0}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
export STRATA_NETNS_PREFIX="sb$$-h" STRATA_NETNS_STATE="/tmp/strata-netns-sb$$"
cleanup() {
  "$STRATA" chaos kill-snapshotd --run "$RUN" > /dev/null 2>&1 || true
  rm -f /dev/shm/strata-snap-"$RUN"-* /tmp/strata-snapshotd-"$RUN".* /tmp/strata-snapshotd-"$RUN"-[12].*
  if [[ -d "$STRATA_NETNS_STATE" ]]; then
    for i in $(seq 1 "$NODES"); do
      ip netns exec "$STRATA_NETNS_PREFIX$i" "$STRATA" chaos kill-node --run "$RUN-nodes" \
        --shm-tag "n$((i - 1))" > /dev/null 2>&1 || true
    done
    "$SRC/scripts/netns-cluster.sh" down "$NODES" > /dev/null 2>&1 || true
  fi
  rm -f /tmp/strata-snapshotd-"$RUN"-nodes.*
  rm -rf "$WORK"
}
trap cleanup EXIT
# 200m: ~1.1 GiB of state per rank with 2 ranks (12 bytes per parameter of its half), the
# issue's "1 GiB per node" recovery case.
source "$SRC/bench/model_sizes.sh"
CFG="$(bench_model_config "$SIZE")"
echo "$CFG" > "$WORK/config.json"
/usr/bin/python3 -c "
import numpy as np
np.random.default_rng(0).integers(0, 8192, 1_000_000, dtype=np.int32).astype('<i4').tofile('$WORK/tokens.i32')"
MPIRUN=(mpirun --oversubscribe -np 2)
ARGS=(--config "$WORK/config.json" --data "$WORK/tokens.i32" --steps "$STEPS" --batch "$BATCH"
      --seq "$SEQ" --threads "$THREADS" --warmup 1 --json)

median_step() {
  /usr/bin/python3 -c "
import json, statistics, sys
rows = [json.loads(l) for l in open('$1') if l.strip()]
print(statistics.median(r['step_s'] for r in rows[1:]))"
}
# Interleaved, twice each, so drifting load hits both alike.
for i in 1 2; do
  "${MPIRUN[@]}" "$STRATA" train "${ARGS[@]}" --snapshot-every 0 > "$WORK/off$i.jsonl" 2> /dev/null
  "${MPIRUN[@]}" "$STRATA" train "${ARGS[@]}" --run "$RUN-$i" --snapshot-every 1 \
    > "$WORK/on$i.jsonl" 2> "$WORK/on$i.err"
done
off=$(/usr/bin/python3 -c "print(min($(median_step "$WORK/off1.jsonl"), $(median_step "$WORK/off2.jsonl")))")
on=$(/usr/bin/python3 -c "print(min($(median_step "$WORK/on1.jsonl"), $(median_step "$WORK/on2.jsonl")))")
echo "step time, no snapshots:        ${off} s"
echo "step time, snapshot every step: ${on} s  ($(/usr/bin/python3 -c "print(f'{($on / $off - 1) * 100:+.1f}%')"))"
grep "snapshots of" "$WORK/on1.err" | sed 's/^strata train: /per rank: /'

# Recovery after a rank crash: rank 1 dies after step 3, the relaunch restores from memory.
"${MPIRUN[@]}" "$STRATA" train "${ARGS[@]}" --run "$RUN" --fail-at-step 3 --fail-rank 1 \
  > /dev/null 2>&1 || true
# The same state as a conventional checkpoint: each rank's shard files (weights, m, v slices) are
# exactly what the snapshot slots hold; write them to local disk with fsync, read with O_DIRECT.
# Taken from the crashed run's shared memory now: the relaunch below frees it when it ends.
total=0
for f in /dev/shm/strata-snap-"$RUN"-r*-s0; do
  n=$(stat -c %s "$f")
  total=$((total + n))
done
start=$(date +%s.%N)
for f in /dev/shm/strata-snap-"$RUN"-r*-s0; do
  dd if="$f" of="$WORK/ckpt-$(basename "$f")" bs=4M conv=fsync status=none
done
mid=$(date +%s.%N)

# The relaunch restores from snapshotd memory. (Before the page cache is dropped for the disk
# read below, not after: a drop_caches right before it made its first-touch faults on the other
# ranks' slots 3-8x slower, 0.07 -> 0.22-0.61 s, which no real crash is preceded by.)
"${MPIRUN[@]}" "$STRATA" train "${ARGS[@]}" --run "$RUN" --resume auto \
  > /dev/null 2> "$WORK/resume.err"
grep "resumed after" "$WORK/resume.err" | sed 's/^strata train: /rank crash: /'
# With STRATA_LOG_LEVEL=debug STRATA_LOG_SUBSYS=ckpt: where each rank's read went.
grep "read snapshot version" "$WORK/resume.err" || true

# The disk copy read back with O_DIRECT (from the device, whatever the page cache holds; the
# cache is dropped as well so that nothing of it helps).
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
rstart=$(date +%s.%N)
for f in "$WORK"/ckpt-*; do dd if="$f" of=/dev/null bs=4M iflag=direct status=none; done
end=$(date +%s.%N)
/usr/bin/python3 - "$total" "$start" "$mid" "$rstart" "$end" <<'PY'
import sys
total, start, mid, rstart, end = int(sys.argv[1]), *map(float, sys.argv[2:])
gib = total / 2**30
print(f"disk checkpoint of the same {gib:.2f} GiB (2 ranks): write+fsync {mid - start:.2f} s "
      f"({total / (mid - start) / 1e9:.2f} GB/s), O_DIRECT read {end - rstart:.2f} s "
      f"({total / (end - rstart) / 1e9:.2f} GB/s)")
PY

# Node loss: N namespace nodes x 1 rank; node 2 goes down after step 2, its state is rebuilt.
if [[ "$NODES" -ge 2 ]]; then
  "$SRC/scripts/netns-cluster.sh" up "$NODES" > /dev/null
  NARGS=(--config "$WORK/config.json" --data "$WORK/tokens.i32" --steps "$STEPS"
         --batch "$NODES" --seq "$SEQ" --threads "$THREADS" --warmup 1 --json --run "$RUN-nodes")
  nodes_launch() { "$SRC/scripts/netns-cluster.sh" run "$NODES" 1 -- "$STRATA" train "${NARGS[@]}" "$@"; }
  nodes_launch > "$WORK/nodes-broken.jsonl" 2> "$WORK/nodes-broken.err" &
  bg=$!
  until [[ $(grep -c '"step"' "$WORK/nodes-broken.jsonl" 2> /dev/null || true) -ge "${KILL_AFTER:-2}" ]]; do
    kill -0 "$bg" 2> /dev/null || break
    sleep 0.05
  done
  ip netns exec "${STRATA_NETNS_PREFIX}2" "$STRATA" chaos kill-node --run "$RUN-nodes" > /dev/null
  wait "$bg" || true
  nodes_launch --resume auto > /dev/null 2> "$WORK/nodes-resume.err" ||
    { cat "$WORK/nodes-resume.err"; exit 1; }
  grep "resumed after\|rebuilt by erasure decoding (" "$WORK/nodes-resume.err" |
    sed "s/^strata train: /node loss ($NODES nodes x 1 rank): /"
fi
